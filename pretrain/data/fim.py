"""Fill-in-the-middle on whole documents, before packing, as DeepSeek-Coder-V2 and bigcode do it.

A document (token ids, no BOS/EOS; the caller adds both) becomes, with probability
`fim_rate`,

  PSM: <begin> prefix <hole> suffix <end> middle
  SPM: <begin> <hole> suffix <end> prefix middle   (bigcode's SPM, with probability `spm_rate`)

The two cuts are character positions drawn uniformly on the document's text, as
bigcode draws them. Rather than decode and re-tokenize the whole document, each cut
re-tokenizes only the few bytes around it: the smallest run of tokens around the cut
whose edges are character boundaries (byte-level BPE tokens may end inside a
character) is replaced by the tokens of its text left and right of the cut. Every
other token is the original one, and prefix + middle + suffix stand for exactly the
document's bytes. This needs byte-exact documents, which `prepare` guarantees;
anything else raises ValueError.

Random draws, in order, per document: `rng.random()` (FIM or not, always drawn);
for FIM documents only, `rng.integers(0, n_chars + 1, size=2)` (the cuts) and
`rng.random()` (SPM or not).
"""

from __future__ import annotations

import numpy as np

from pretrain.data.tokenizer import FimIds, Tokenizer

_NO_IDS = np.zeros(0, np.int32)


def transform(ids: np.ndarray, rng: np.random.Generator, tokenizer: Tokenizer, *, fim_rate: float,
              spm_rate: float) -> np.ndarray:
  """`ids` as a FIM example with probability `fim_rate`, else `ids` itself."""
  if rng.random() >= fim_rate:
    return ids
  fim = tokenizer.require_fim()
  doc = _DocumentBytes(np.asarray(ids, np.int32), tokenizer)
  char_lo, char_hi = np.sort(rng.integers(0, doc.n_chars + 1, size=2))
  spm = rng.random() < spm_rate
  prefix, middle, suffix = doc.split([doc.byte_offset(char_lo), doc.byte_offset(char_hi)])
  return np.concatenate([prompt(prefix, suffix, fim, spm=spm), middle]).astype(np.int32, copy=False)


def prompt(prefix_ids, suffix_ids, fim: FimIds, *, spm: bool = False) -> np.ndarray:
  """The FIM layout up to where the middle goes: what a model is asked to continue when infilling
  (the caller adds BOS, as for training documents)."""
  prefix, suffix = np.asarray(prefix_ids, np.int32), np.asarray(suffix_ids, np.int32)
  if spm:
    layout = [[fim.begin, fim.hole], suffix, [fim.end], prefix]
  else:
    layout = [[fim.begin], prefix, [fim.hole], suffix, [fim.end]]
  return np.concatenate([np.asarray(part, np.int32) for part in layout])


def restore(ids_out: np.ndarray, fim: FimIds) -> tuple[str, np.ndarray, np.ndarray, np.ndarray] | None:
  """(mode, prefix, middle, suffix) of a FIM document (no BOS/EOS), or None when it is not one.

  SPM writes prefix and middle as one run after <end>, so for 'spm' that run comes back
  as `middle` and `prefix` is empty. A PSM document with an empty prefix is token for
  token an SPM one and comes back as 'spm'; its parts are right either way.
  """
  ids = np.asarray(ids_out)
  if len(ids) < 3 or ids[0] != fim.begin:
    return None
  if not all(np.count_nonzero(ids == s) == 1 for s in (fim.begin, fim.hole, fim.end)):
    return None
  hole = int(np.flatnonzero(ids == fim.hole)[0])
  end = int(np.flatnonzero(ids == fim.end)[0])
  if end < hole:
    return None
  suffix = ids[hole + 1:end]
  if hole == 1:
    return "spm", ids[:0], ids[end + 1:], suffix
  return "psm", ids[1:hole], ids[end + 1:], suffix


class _DocumentBytes:
  """A document's text as bytes, and where its tokens and characters start in them."""

  def __init__(self, ids: np.ndarray, tokenizer: Tokenizer):
    lengths = tokenizer.byte_lengths[ids]
    if np.any(lengths == 0):
      bad = sorted(set(ids[lengths == 0].tolist()))
      raise ValueError(f"document holds token ids {bad[:8]} that stand for no text (special or unknown tokens); "
                       "FIM needs byte-exact documents")
    self.ids = ids
    self.tokenizer = tokenizer
    self.text = tokenizer.bytes_of(ids)
    try:
      self.text.decode()
    except UnicodeDecodeError as e:
      raise ValueError(f"document tokens do not spell valid UTF-8 ({e}); FIM needs byte-exact documents") from e
    self.token_starts = np.zeros(len(ids) + 1, np.int64)  # [n + 1], byte offset of each token, then the end
    np.cumsum(lengths, out=self.token_starts[1:])
    is_char_start = (np.frombuffer(self.text, np.uint8) & 0xC0) != 0x80  # not a UTF-8 continuation byte
    self.char_starts = np.flatnonzero(is_char_start)  # [n_chars]
    self.n_chars = len(self.char_starts)

  def byte_offset(self, char_pos: int) -> int:
    return int(self.char_starts[char_pos]) if char_pos < self.n_chars else len(self.text)

  def split(self, cuts: list[int]) -> list[np.ndarray]:
    """The tokens of the text between sorted byte offsets `cuts` (character boundaries)."""
    runs = [self._run_around(b) for b in cuts]
    parts: list[list[np.ndarray]] = [[]]
    done = 0  # tokens before this are placed
    i = 0
    while i < len(cuts):
      lo, hi = runs[i]
      group = [cuts[i]]
      while i + 1 < len(cuts) and runs[i + 1][0] < hi:  # overlapping runs are re-tokenized as one
        i += 1
        group.append(cuts[i])
        hi = max(hi, runs[i][1])
      parts[-1].append(self.ids[done:lo])
      edges = [int(self.token_starts[lo]), *group, int(self.token_starts[hi])]
      fragments = [self._encode(edges[j], edges[j + 1]) for j in range(len(edges) - 1)]
      parts[-1].append(fragments[0])
      parts.extend([fragment] for fragment in fragments[1:])
      done = hi
      i += 1
    parts[-1].append(self.ids[done:])
    return [np.concatenate(p) for p in parts]

  def _run_around(self, cut: int) -> tuple[int, int]:
    """Token range [lo, hi) to re-tokenize for a cut at byte `cut`; empty when it is a token boundary."""
    starts = self.token_starts
    hi = int(np.searchsorted(starts, cut))
    if starts[hi] == cut:
      return hi, hi
    lo = hi - 1
    while not self._is_char_start(int(starts[lo])):
      lo -= 1
    while not self._is_char_start(int(starts[hi])):
      hi += 1
    return lo, hi

  def _is_char_start(self, offset: int) -> bool:
    return offset == len(self.text) or (self.text[offset] & 0xC0) != 0x80

  def _encode(self, start: int, stop: int) -> np.ndarray:
    fragment = self.text[start:stop]
    if not fragment:
      return _NO_IDS
    ids = self.tokenizer.encode(fragment.decode())
    if self.tokenizer.bytes_of(ids) != fragment:
      raise ValueError(f"the tokenizer does not re-encode the text {fragment.decode()!r} byte for byte; "
                       "FIM needs a byte-exact tokenizer")
    return ids
