"""One tokenizer interface over sentencepiece `*.model` and Hugging Face `tokenizer.json` files.

Besides encode/decode, a `Tokenizer` knows the exact bytes of document text each id
stands for (`token_bytes`): byte-level BPE tokens through GPT-2's bytes<->unicode
table, sentencepiece pieces with '▁' as a space and `<0xNN>` as that byte, special
and control tokens as no bytes at all. FIM cuts documents at byte offsets computed
from them, so a prepared document must be byte-exact: its tokens' bytes are its
(normalized) text, which `is_byte_exact` checks. A document holding a special
token's string literally is therefore never byte-exact: it would smuggle a sentinel
into training.

Special ids are looked up from `SpecialTokens` strings, never hard-coded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import numpy as np

from pretrain.data.config import SpecialTokens
from pretrain.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class FimIds:
  """The fill-in-the-middle sentinels' token ids (data/fim.py), looked up in the tokenizer."""

  begin: int
  hole: int
  end: int

_SPACE_ESCAPE = "▁"  # U+2581: how sentencepiece and Metaspace write a space inside a piece
_FIM_FIELDS = ("fim_begin", "fim_hole", "fim_end")
DEEPSEEK_SPECIAL_TOKENS = SpecialTokens()  # the defaults
# The released models' FIM sentinels as (begin, hole, end) of PSM `begin prefix hole suffix end middle`:
# DeepSeek-Coder(-V2)'s (the defaults), Qwen2.5-Coder's and StarCoder's `prefix, suffix, middle`.
KNOWN_FIM_SENTINELS = (
    (SpecialTokens.fim_begin, SpecialTokens.fim_hole, SpecialTokens.fim_end),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
)
_KNOWN_SENTINEL_STRINGS = frozenset(token for sentinels in KNOWN_FIM_SENTINELS for token in sentinels) | {
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<fim_pad>", "<repo_name>", "<file_sep>"}


class Tokenizer:
  """The common part; `_SentencePiece` and `_HuggingFace` supply the backend methods."""

  kind: str

  def __init__(self, path: pathlib.Path, special_tokens: SpecialTokens, key: str):
    self.path = path
    self.special_tokens = special_tokens
    self._key = key
    self.token_bytes: list[bytes] = self._build_token_bytes(set(dataclasses.asdict(special_tokens).values()))
    self.byte_lengths = np.fromiter(map(len, self.token_bytes), np.int32, len(self.token_bytes))  # [vocab]
    self.bos_id = self._require_id("bos")
    self.eos_id = self._require_id("eos")
    self.pad_id = self._require_id("pad")
    self._fim_lookup = {name: self._id_of(getattr(special_tokens, name)) for name in _FIM_FIELDS}  # None: absent
    self._fim_ids = None if None in self._fim_lookup.values() else FimIds(*self._fim_lookup.values())

  # Backend methods.
  def encode(self, text: str) -> np.ndarray:
    """int32 ids of `text`; no BOS, EOS or other special tokens are added."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def normalize(self, text: str) -> str:
    """The text the tokens of `encode(text)` stand for; `prepare` tokenizes this."""
    raise NotImplementedError

  def _id_of(self, token: str) -> int | None:
    raise NotImplementedError

  def _build_token_bytes(self, special_strings: set[str]) -> list[bytes]:
    raise NotImplementedError

  # Common part.
  @property
  def vocab_size(self) -> int:
    return len(self.token_bytes)

  @property
  def fim_ids(self) -> FimIds | None:
    return self._fim_ids

  def token_id(self, token: str) -> int | None:
    """The id of the token spelled `token` (a special token's string), or None."""
    return self._id_of(token)

  def with_known_fim_sentinels(self) -> Tokenizer:
    """This tokenizer, or when its special tokens name no FIM sentinels it has, a copy naming the first
    of KNOWN_FIM_SENTINELS that it has (a released model's own); itself when it has none of them."""
    if self._fim_ids is not None:
      return self
    for sentinels in KNOWN_FIM_SENTINELS:
      if all(self._id_of(token) is not None for token in sentinels):
        tokens = dataclasses.replace(self.special_tokens, **dict(zip(_FIM_FIELDS, sentinels)))
        return load_tokenizer(self.path, tokens, key=self._key)
    return self

  def require_fim(self) -> FimIds:
    if self._fim_ids is not None:
      return self._fim_ids
    missing = [name for name, token_id in self._fim_lookup.items() if token_id is None]
    strings = ", ".join(repr(getattr(self.special_tokens, name)) for name in missing)
    raise ConfigError(f"{self._key}.special_tokens.{missing[0]}",
                      f"FIM needs sentinel token(s) {strings}, which the tokenizer {self.path} lacks; "
                      "name its own sentinels in special_tokens or set fim_rate to 0")

  def bytes_of(self, ids) -> bytes:
    """The document bytes `ids` stand for (special tokens stand for none)."""
    token_bytes = self.token_bytes
    return b"".join([token_bytes[i] for i in np.asarray(ids).tolist()])

  def is_byte_exact(self, text: str, ids) -> bool:
    """Whether `ids` stand for exactly the bytes of `normalize(text)`, with no special token among them."""
    lengths = self.byte_lengths[np.asarray(ids, np.int64)]
    expected = self.normalize(text).encode()
    if int(lengths.sum()) != len(expected) or (len(lengths) and lengths.min() == 0):  # cheap checks first
      return False
    return self.bytes_of(ids) == expected

  def describe(self) -> dict[str, Any]:
    return {
        "kind": self.kind,
        "path": str(self.path),
        "vocab_size": self.vocab_size,
        "bos_id": self.bos_id,
        "eos_id": self.eos_id,
        "pad_id": self.pad_id,
        "fim_ids": None if self._fim_ids is None else dataclasses.asdict(self._fim_ids),
        "special_tokens": dataclasses.asdict(self.special_tokens),
    }

  def __reduce__(self):  # data-loader workers get a copy by reloading the file
    return (_reload, (self.path, self.special_tokens, self._key))

  def _require_id(self, name: str) -> int:
    token = getattr(self.special_tokens, name)
    token_id = self._id_of(token)
    if token_id is None:
      raise ConfigError(f"{self._key}.special_tokens.{name}",
                        f"the tokenizer {self.path} has no token {token!r}")
    return token_id


class _SentencePiece(Tokenizer):
  kind = "sentencepiece"

  def __init__(self, path: pathlib.Path, special_tokens: SpecialTokens, key: str):
    import sentencepiece

    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises OSError or RuntimeError with its own text
      raise ConfigError(f"{key}.tokenizer", f"cannot read the sentencepiece model {path}: {e}") from e
    super().__init__(path, special_tokens, key)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(np.asarray(ids).tolist())

  def normalize(self, text: str) -> str:
    # The normalizer also escapes spaces as '▁'; pieces turn '▁' back into a space, so a
    # literal '▁' in the text comes back as a space too (and a dummy prefix as a leading one).
    return self._sp.normalize(text).replace(_SPACE_ESCAPE, " ")

  def _id_of(self, token: str) -> int | None:
    token_id = self._sp.piece_to_id(token)
    return token_id if self._sp.id_to_piece(token_id) == token else None  # absent pieces map to unk

  def _build_token_bytes(self, special_strings: set[str]) -> list[bytes]:
    sp = self._sp
    token_bytes = []
    for i, piece in enumerate(sp.id_to_piece(list(range(sp.get_piece_size())))):
      if sp.is_byte(i):
        token_bytes.append(bytes([int(piece[3:5], 16)]))  # '<0xNN>'
      elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or piece in special_strings:
        token_bytes.append(b"")
      else:
        token_bytes.append(piece.replace(_SPACE_ESCAPE, " ").encode())
    return token_bytes


class _HuggingFace(Tokenizer):
  kind = "huggingface"

  def __init__(self, path: pathlib.Path, special_tokens: SpecialTokens, key: str):
    import tokenizers

    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
      raise ConfigError(f"{key}.tokenizer", f"cannot read the tokenizer file {path}: {e}") from e
    super().__init__(path, special_tokens, key)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

  def normalize(self, text: str) -> str:
    normalizer = self._tok.normalizer
    return text if normalizer is None else normalizer.normalize_str(text)

  def _id_of(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def _build_token_bytes(self, special_strings: set[str]) -> list[bytes]:
    spec = json.loads(self._tok.to_str())
    decoders = _component_types(spec.get("decoder"))
    vocab = self._tok.get_vocab(with_added_tokens=True)  # token -> id; ids may have gaps
    token_bytes = [b""] * (max(vocab.values()) + 1)
    if "ByteLevel" in decoders:
      for token, i in vocab.items():
        token_bytes[i] = _byte_level_bytes(token)
    elif decoders & {"Metaspace", "ByteFallback", "Replace"}:  # sentencepiece-style tokenizer.json
      byte_fallback = spec.get("model", {}).get("byte_fallback", False)
      for token, i in vocab.items():
        if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
          token_bytes[i] = bytes([int(token[3:5], 16)])
        else:
          token_bytes[i] = token.replace(_SPACE_ESCAPE, " ").encode()
    else:
      for token, i in vocab.items():
        token_bytes[i] = token.encode()
    # Added tokens match raw text, not the byte alphabet; special ones stand for no text.
    for i, added in self._tok.get_added_tokens_decoder().items():
      # The released models' sentinels stand for no text even where their file does not mark them special
      # (Qwen2.5's FIM tokens): a document spelling one out must not smuggle it into training data.
      special = added.special or added.content in special_strings or added.content in _KNOWN_SENTINEL_STRINGS
      token_bytes[i] = b"" if special else added.content.encode()
    return token_bytes


def special_tokens_from_config(directory) -> SpecialTokens:
  """BOS/EOS/pad strings from a Hugging Face tokenizer_config.json in `directory`; DeepSeek's where there is
  none. A model without a BOS token (Qwen2) starts each text after EOS instead, as its pretraining packed
  documents."""
  file = pathlib.Path(directory) / "tokenizer_config.json"
  if not file.is_file():
    return SpecialTokens()
  try:
    values = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError("--tokenizer", f"{file}: cannot read JSON: {e}") from e

  def content(name: str) -> str | None:
    token = values.get(name) if isinstance(values, dict) else None
    return token.get("content") if isinstance(token, dict) else token

  eos = content("eos_token") or SpecialTokens.eos
  return dataclasses.replace(SpecialTokens(), bos=content("bos_token") or eos, eos=eos, pad=content("pad_token") or eos)


def load_tokenizer(path, special_tokens: SpecialTokens = DEEPSEEK_SPECIAL_TOKENS, *,
                   key: str = "config.data") -> Tokenizer:
  """Loads a sentencepiece `*.model`, a `tokenizer.json`, or a directory holding exactly one of them.

  `key` prefixes the config keys that errors name (`config.data.tokenizer`,
  `config.data.special_tokens.bos`).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    found = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix == ".model" or p.name == "tokenizer.json"))
    if len(found) != 1:
      what = "neither" if not found else "more than one: " + ", ".join(p.name for p in found)
      raise ConfigError(f"{key}.tokenizer", f"the directory {path} must hold exactly one sentencepiece *.model or "
                        f"tokenizer.json, it holds {what}; name the file instead")
    path = found[0]
  if not path.is_file():
    raise ConfigError(f"{key}.tokenizer", f"no tokenizer file at {path}")
  if path.suffix == ".model":
    return _SentencePiece(path, special_tokens, key)
  if path.suffix == ".json":
    return _HuggingFace(path, special_tokens, key)
  raise ConfigError(f"{key}.tokenizer", f"{path}: expected a sentencepiece *.model or a Hugging Face tokenizer.json")


def _reload(path: pathlib.Path, special_tokens: SpecialTokens, key: str) -> Tokenizer:
  return load_tokenizer(path, special_tokens, key=key)


def _component_types(component: dict | None) -> set[str]:
  """The `type`s of a tokenizer.json component, looking inside `Sequence`s."""
  if not component:
    return set()
  types = {component.get("type", "")}
  for inner in component.get("decoders", []) + component.get("normalizers", []) + component.get("pretokenizers", []):
    types |= _component_types(inner)
  return types


@functools.cache
def _unicode_to_byte() -> dict[int, int]:
  """GPT-2's table, inverted, for `str.translate`: the character byte-level BPE writes -> its byte.

  Characters below 256 outside the alphabet map to U+FFFF so that Latin-1 encoding fails on them.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  shifted = [b for b in range(256) if b not in printable]
  table = {b: 0xFFFF for b in shifted}
  table.update({b: b for b in printable})
  table.update({256 + n: b for n, b in enumerate(shifted)})
  return table


def _byte_level_bytes(token: str) -> bytes:
  try:
    return token.translate(_unicode_to_byte()).encode("latin-1")
  except UnicodeEncodeError:  # not in the byte alphabet (e.g. an added token's raw text)
    return token.encode()
