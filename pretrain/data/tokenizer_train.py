"""Training a byte-exact sentencepiece BPE tokenizer, and reading its training text from mixture inputs.

The model is lossless on any UTF-8 text (except the U+2581 '▁' character, which
sentencepiece reads as a space): byte fallback instead of <unk>, the identity
normalizer, no dummy prefix, whitespace kept as is. Its special tokens are the
`SpecialTokens` strings, so `load_tokenizer` finds them with the same config.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator

from pretrain.atomic_file import atomic_dir
from pretrain.data.config import SpecialTokens
from pretrain.schema import ConfigError

MODEL_NAME = "tokenizer.model"


def train_sentencepiece(texts: Iterable[str], out_dir, *, vocab_size: int, special_tokens: SpecialTokens,
                        model_type: str = "bpe", max_sentence_length: int = 16384,
                        seed_sentencepiece_size: int = 1_000_000, character_coverage: float = 0.9995,
                        num_threads: int = 0) -> pathlib.Path:
  """Trains on `texts` and writes `tokenizer.model` and `tokenizer.vocab` into the new `out_dir`.

  `out_dir` must not exist or be empty; it appears complete or not at all. Returns the
  model's path. Raises ValueError when the text is too small for `vocab_size` pieces.
  """
  import sentencepiece

  if max_sentence_length < 64:
    raise ValueError(f"max_sentence_length must be >= 64 bytes, got {max_sentence_length}")
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f"{out_dir} exists and is not an empty directory; refusing to overwrite a tokenizer")
  specials = {"bos_piece": special_tokens.bos, "eos_piece": special_tokens.eos, "unk_piece": "<unk>", "pad_id": -1}
  if special_tokens.pad != special_tokens.eos:  # else pad is EOS, with no piece of its own
    specials.update(pad_id=3, pad_piece=special_tokens.pad)
  errors: list[BaseException] = []  # sentencepiece reraises the iterator's errors as RuntimeError

  def sentences() -> Iterator[str]:
    try:
      yield from _sentences(texts, max_sentence_length)
    except BaseException as e:
      errors.append(e)
      raise

  with atomic_dir(out_dir) as tmp_dir:
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=sentences(),
          model_prefix=str(tmp_dir / "tokenizer"),
          vocab_size=vocab_size,
          model_type=model_type,
          byte_fallback=True,
          normalization_rule_name="identity",
          add_dummy_prefix=False,
          remove_extra_whitespaces=False,
          split_digits=True,
          allow_whitespace_only_pieces=True,
          user_defined_symbols=[special_tokens.fim_begin, special_tokens.fim_hole, special_tokens.fim_end],
          hard_vocab_limit=False,  # a soft limit: sentencepiece stops early on small corpora, checked below
          max_sentence_length=max_sentence_length,
          seed_sentencepiece_size=seed_sentencepiece_size,
          character_coverage=character_coverage,
          num_threads=num_threads or os.cpu_count() or 1,
          minloglevel=2,
          **specials,
      )
    except RuntimeError as e:
      if errors:
        raise errors[0] from None
      # What is left is sentencepiece refusing the settings, e.g. a vocab smaller than the characters.
      raise ConfigError("vocab_size", f"sentencepiece cannot train with vocab_size={vocab_size}: "
                        f"{str(e).rsplit('] ', 1)[-1]}") from e
    trained = sentencepiece.SentencePieceProcessor(model_file=str(tmp_dir / MODEL_NAME)).get_piece_size()
    if trained != vocab_size:
      raise ConfigError("vocab_size", f"sentencepiece made {trained} pieces, not the {vocab_size} asked for: "
                        "give it more text or ask for a smaller vocab_size")
  return out_dir / MODEL_NAME


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Runs of whole lines (newlines kept, so they become pieces) of at most `max_bytes` UTF-8 bytes.

  Sentencepiece skips longer sentences; a longer line is cut at character boundaries.
  """
  for text in texts:
    chunk: list[str] = []
    chunk_bytes = 0
    for line in text.splitlines(keepends=True):
      line_bytes = len(line.encode())
      if chunk and chunk_bytes + line_bytes > max_bytes:
        yield "".join(chunk)
        chunk, chunk_bytes = [], 0
      if line_bytes > max_bytes:
        yield from _cut_line(line, max_bytes)
        continue
      chunk.append(line)
      chunk_bytes += line_bytes
    if chunk:
      yield "".join(chunk)


def _cut_line(line: str, max_bytes: int) -> Iterator[str]:
  encoded = line.encode()
  start = 0
  while start < len(encoded):
    stop = min(start + max_bytes, len(encoded))
    while stop < len(encoded) and (encoded[stop] & 0xC0) == 0x80:  # not inside a character
      stop -= 1
    yield encoded[start:stop].decode()
    start = stop


def iter_texts_from_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike,
                          text_field: str = "text") -> Iterator[str]:
  """The documents of bare inputs (directories of source files, .jsonl[.gz], .parquet, globs), read
  exactly as `pretrain prepare --input` reads them (`sources.py`)."""
  from pretrain.data import sources
  from pretrain.data.mixture import Mixture

  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  return sources.mixture_texts(Mixture.from_inputs(paths, domain="text", text_field=text_field, key="inputs"))
