"""FIM on whole documents: rates, exact reconstruction, determinism, uniform character-level cuts, edge cases."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from tiny_tokenizers import (
  KINDS,
  SPECIALS,
  build_byte_level_bpe,
  sample_texts,
  tiny_tokenizer,
)

from pretrain.data import fim
from pretrain.data.tokenizer import load_tokenizer
from pretrain.schema import ConfigError

N_DOCS = 3000


@pytest.fixture(params=KINDS)
def tok(request, tmp_path_factory):
  return tiny_tokenizer(request.param, tmp_path_factory)


@functools.cache
def _docs(tok):
  texts = sample_texts(N_DOCS, seed=3)
  docs = [tok.encode(t) for t in texts]
  assert all(tok.is_byte_exact(t, d) for t, d in zip(texts, docs))  # what `prepare` guarantees
  return texts, docs


def _reassembled(tok, out, fim_ids) -> bytes:
  _, prefix, middle, suffix = fim.restore(out, fim_ids)
  return tok.bytes_of(prefix) + tok.bytes_of(middle) + tok.bytes_of(suffix)


def _common_prefix(a, b) -> int:
  n = min(len(a), len(b))
  differs = np.flatnonzero(a[:n] != b[:n])
  return int(differs[0]) if len(differs) else n


class _Draws:
  """Stands in for the Generator with chosen cuts (character positions) and SPM choice."""

  def __init__(self, cuts, spm=False):
    self.cuts, self.spm = cuts, spm
    self.randoms = [0.0, 0.0 if spm else 0.99]  # FIM yes, then SPM or not

  def random(self):
    return self.randoms.pop(0)

  def integers(self, low, high, size):
    assert (low, size) == (0, 2) and all(c < high for c in self.cuts)
    return np.array(self.cuts)


def test_rates_and_exact_reconstruction(tok):
  texts, docs = _docs(tok)
  ids = tok.require_fim()
  sentinels = [ids.begin, ids.hole, ids.end]
  rng = np.random.default_rng(0)
  modes = []
  for text, doc in zip(texts, docs):
    out = fim.transform(doc, rng, tok, fim_rate=0.5, spm_rate=0.3)
    assert out.dtype == np.int32
    restored = fim.restore(out, ids)
    if restored is None:
      assert np.array_equal(out, doc) and not np.isin(out, sentinels).any()
      continue
    mode, prefix, middle, suffix = restored
    modes.append(mode)
    assert [np.count_nonzero(out == s) for s in sentinels] == [1, 1, 1]
    assert len(out) >= len(doc) + 3 - 16  # fragments may tokenize a little differently
    assert _reassembled(tok, out, ids) == text.encode()
    assert tok.decode(np.concatenate([prefix, middle, suffix])) == text
    assert _common_prefix(np.concatenate([prefix, middle]), doc) >= len(prefix) - 12  # original tokens...
    assert _common_prefix(suffix[::-1], doc[::-1]) >= len(suffix) - 12  # ...except near the cuts
  assert abs(len(modes) / N_DOCS - 0.5) <= 0.02
  assert abs(modes.count("spm") / len(modes) - 0.3) <= 0.04  # a PSM doc with empty prefix reads as SPM


@pytest.mark.parametrize("fim_rate", [0.0, 1.0])
def test_rate_zero_and_one(tok, fim_rate):
  _, docs = _docs(tok)
  rng = np.random.default_rng(1)
  outs = [fim.transform(doc, rng, tok, fim_rate=fim_rate, spm_rate=0.5) for doc in docs[:500]]
  if fim_rate == 0:
    assert all(out is doc for out, doc in zip(outs, docs))
  else:
    assert all(fim.restore(out, tok.fim_ids) is not None for out in outs)


def test_same_seed_same_output(tok):
  _, docs = _docs(tok)

  def run(seed):
    rng = np.random.default_rng(seed)
    return [fim.transform(d, rng, tok, fim_rate=0.5, spm_rate=0.5) for d in docs[:300]]

  first, again, other = run(7), run(7), run(8)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_draw_order(tok):
  doc = tok.encode("数据 🙂 def f(x):\n\treturn x\n")
  n_chars = len("数据 🙂 def f(x):\n\treturn x\n")
  for fim_rate in (0.0, 1.0):
    rng, expected = np.random.default_rng(3), np.random.default_rng(3)
    fim.transform(doc, rng, tok, fim_rate=fim_rate, spm_rate=0.5)
    expected.random()
    if fim_rate:
      expected.integers(0, n_chars + 1, size=2)
      expected.random()
    assert rng.random() == expected.random()


def test_cuts_are_uniform_over_characters(tok):
  text = "".join(sample_texts(15, seed=4))  # ~4500 characters
  doc = tok.encode(text)
  n_chars, draws = len(text), 10_000
  rng = np.random.default_rng(5)
  cut_lo, cut_hi = np.empty(draws, np.int64), np.empty(draws, np.int64)
  for k in range(draws):
    _, prefix, middle, _ = fim.restore(fim.transform(doc, rng, tok, fim_rate=1.0, spm_rate=0.0), tok.fim_ids)
    cut_lo[k] = len(tok.bytes_of(prefix).decode())
    cut_hi[k] = cut_lo[k] + len(tok.bytes_of(middle).decode())
  # min and max of two uniform draws: means n/3 and 2n/3; pooled together, uniform.
  assert abs(cut_lo.mean() / n_chars - 1 / 3) < 0.01 and abs(cut_hi.mean() / n_chars - 2 / 3) < 0.01
  counts = np.bincount(np.concatenate([cut_lo, cut_hi]) * 20 // (n_chars + 1), minlength=20)
  expected = 2 * draws / 20
  assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 19 dof: p ~ 1e-4
  # Character level, not token level: most cuts fall inside a multi-character token.
  char_ends = np.cumsum([len(tok.token_bytes[i]) for i in doc])
  char_of_byte = np.cumsum([(b & 0xC0) != 0x80 for b in text.encode()])
  token_edges = set(char_of_byte[char_ends - 1].tolist()) | {0}
  inside = np.mean([c not in token_edges for c in cut_lo])
  assert inside > 0.3


def test_every_cut_on_a_short_unicode_document(tok):
  text = "数据🙂 x👨‍👩‍👧\tcafé é 한국어!"
  doc = tok.encode(text)
  fim_ids = tok.require_fim()
  n_chars = len(text)
  for lo in range(n_chars + 1):
    for hi in range(lo, n_chars + 1):
      for spm in (False, True):
        out = fim.transform(doc, _Draws([lo, hi], spm), tok, fim_rate=0.5, spm_rate=0.5)
        mode, prefix, middle, suffix = fim.restore(out, fim_ids)
        assert mode == ("spm" if spm or lo == 0 else "psm")
        assert tok.bytes_of(suffix).decode() == text[hi:]
        if mode == "psm":
          assert tok.bytes_of(prefix).decode() == text[:lo]
          assert tok.bytes_of(middle).decode() == text[lo:hi]
        else:
          assert tok.bytes_of(middle).decode() == text[:hi]


@pytest.mark.parametrize("text", ["", "x", "🙂", "👨‍👩‍👧"])
def test_tiny_documents(tok, text):
  doc = tok.encode(text)
  fim_ids = tok.require_fim()
  seen = set()
  for seed in range(30):
    out = fim.transform(doc, np.random.default_rng(seed), tok, fim_rate=1.0, spm_rate=0.5)
    _, prefix, _, suffix = fim.restore(out, fim_ids)
    assert _reassembled(tok, out, fim_ids) == text.encode()
    seen.add((len(tok.bytes_of(prefix)), len(tok.bytes_of(suffix))))
  if not text:
    assert np.array_equal(out, [fim_ids.begin, fim_ids.hole, fim_ids.end])
  else:
    assert len(seen) >= 2


def test_documents_that_are_not_byte_exact(tok):
  fim_ids = tok.require_fim()
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="stand for no text"):
    fim.transform(np.array([tok.bos_id, *tok.encode("abc")], np.int32), rng, tok, fim_rate=1.0, spm_rate=0.0)
  partial = next(i for i, b in enumerate(tok.token_bytes) if b and b[0] >= 0xC0 and len(b) == 1)  # a lead byte alone
  with pytest.raises(ValueError, match="UTF-8"):
    fim.transform(np.array([partial], np.int32), rng, tok, fim_rate=1.0, spm_rate=0.0)
  assert fim.restore(tok.encode("abc"), fim_ids) is None
  assert fim.restore(np.array([fim_ids.begin, fim_ids.end, fim_ids.hole]), fim_ids) is None


def test_fim_needs_sentinels_only_when_used(tmp_path):
  tok = load_tokenizer(build_byte_level_bpe(tmp_path, special_strings=(SPECIALS.bos, SPECIALS.eos)))
  doc = tok.encode("def f(): pass")
  assert fim.transform(doc, np.random.default_rng(0), tok, fim_rate=0.0, spm_rate=0.5) is doc
  with pytest.raises(ConfigError, match="fim"):
    fim.transform(doc, np.random.default_rng(0), tok, fim_rate=1.0, spm_rate=0.5)


def test_deepseek_sentinel_strings(tmp_path_factory):
  assert (SPECIALS.fim_begin, SPECIALS.fim_hole, SPECIALS.fim_end) == (
      "<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>")
  tok = tiny_tokenizer("huggingface", tmp_path_factory)
  text = "def add(a, b):\n    return a + b\n"
  out = fim.transform(tok.encode(text), _Draws([15, 27]), tok, fim_rate=1.0, spm_rate=0.0)
  # The paper's PSM layout; the caller adds BOS before and EOS after.
  prefix, middle, suffix = text[:15], text[15:27], text[27:]
  assert tok.decode(out) == f"{SPECIALS.fim_begin}{prefix}{SPECIALS.fim_hole}{suffix}{SPECIALS.fim_end}{middle}"
