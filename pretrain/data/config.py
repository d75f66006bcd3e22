"""Typed settings of the data side: special tokens, preparation rules, the training pipeline."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from pretrain.schema import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
  """Strings of the special tokens; their ids are looked up in the tokenizer, never hard-coded.

  Defaults are DeepSeek-V2's (U+FF5C '｜' and U+2581 '▁'); pad is EOS there.
  """

  bos: str = "<｜begin▁of▁sentence｜>"
  eos: str = "<｜end▁of▁sentence｜>"
  pad: str = "<｜end▁of▁sentence｜>"
  fim_begin: str = "<｜fim▁begin｜>"  # PSM: begin prefix hole suffix end middle
  fim_hole: str = "<｜fim▁hole｜>"
  fim_end: str = "<｜fim▁end｜>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodeFilters:
  """The DeepSeek-Coder-V2 paper's rules for source files; each drop is counted by rule."""

  max_avg_line_length: float = 100.0
  max_line_length: int = 1000
  min_alpha_fraction: float = 0.25
  xml_header: str = "<?xml version="  # dropped when in the first `xml_header_window` characters (not XSLT)
  xml_header_window: int = 100
  html_min_visible_fraction: float = 0.2
  html_min_visible_chars: int = 100
  json_yaml_min_chars: int = 50
  json_yaml_max_chars: int = 5000


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dedup:
  exact: bool = True  # content hash
  near: bool = True  # MinHash LSH
  shingle_size: int = 5  # words per shingle
  num_perm: int = 128
  threshold: float = 0.85  # estimated Jaccard similarity at which a document is a near duplicate

  def validate(self, key: str) -> None:
    if not 0.0 < self.threshold <= 1.0:
      raise ConfigError(f"{key}.threshold", f"must be within (0, 1], got {self.threshold}")
    if self.shingle_size < 1 or self.num_perm < 16:
      raise ConfigError(f"{key}.shingle_size", "shingle_size must be >= 1 and num_perm >= 16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prepare:
  filters: CodeFilters = dataclasses.field(default_factory=CodeFilters)
  dedup: Dedup = dataclasses.field(default_factory=Dedup)
  docs_per_shard: int = 2000
  workers: int = 0  # 0: every core
  skip_corrupt_records: bool = False  # count and skip an unreadable JSONL line / Parquet row instead of failing
  # A source file that is not UTF-8 is counted and skipped; with a codec name here ("cp1252", "latin-1",
  # "shift_jis") it is decoded with that instead, when that gives text without control characters. One
  # codec, not a guess per file: detection misreads the few accented letters of a mostly-ASCII file.
  fallback_encoding: str | None = None
  # "local": this host's process pool. "beam": an Apache Beam pipeline (pretrain/data/prepare_beam.py) run
  # with `beam_options` (e.g. "--runner=DataflowRunner", "--project=p", "--temp_location=gs://b/tmp"; none:
  # Beam's in-process DirectRunner). Both write the same shards and manifest.
  engine: str = "local"
  beam_options: tuple[str, ...] = ()

  def validate(self, key: str) -> None:
    if self.engine not in ("local", "beam"):
      raise ConfigError(f"{key}.engine", f"must be 'local' or 'beam', got {self.engine!r}")
    if self.beam_options and self.engine != "beam":
      raise ConfigError(f"{key}.beam_options", "set only with engine='beam'")
    if self.fallback_encoding is not None:
      try:
        b"a".decode(self.fallback_encoding)  # LookupError for an unknown codec and for bytes-to-bytes ones
      except UnicodeDecodeError:
        pass  # a text codec that needs more than one byte (utf-16)
      except LookupError:
        raise ConfigError(f"{key}.fallback_encoding", f"{self.fallback_encoding!r} is not a text encoding "
                          "Python knows (e.g. cp1252, latin-1, shift_jis)") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  mixture: str  # a data_mixtures/ file, FILE[:ARG]
  prepared_dir: str  # where `pretrain prepare` writes and the pipeline reads
  tokenizer: str  # tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face), or a directory with one
  # When `tokenizer` does not exist yet: train a sentencepiece BPE of this size on the mixture's inputs first
  # (the built-in default does; a real run uses its base model's tokenizer and leaves this None).
  train_tokenizer_vocab_size: int | None = None
  special_tokens: SpecialTokens = dataclasses.field(default_factory=SpecialTokens)
  prepare: Prepare = dataclasses.field(default_factory=Prepare)
  seq_len: int = 512
  global_batch_size: int = 8
  weights: dict[str, float] = dataclasses.field(default_factory=dict)  # per-stage override, by component name
  min_length: int | None = None  # per-stage override of every component's min_length
  add_bos: bool = True
  skip_corrupt_records: bool = False
  seed: int = 0
  # Independent input streams the global batch is drawn from (each a disjoint share of the documents,
  # giving a contiguous block of global_batch_size / streams rows). None: one per process. Fix it to
  # keep the data order the same when the process count changes (a multiple of it, dividing the batch).
  streams: int | None = None

  def validate(self, key: str) -> None:
    if self.streams is not None and self.streams < 1:
      raise ConfigError(f"{key}.streams", f"must be >= 1, got {self.streams}")
    if self.streams is not None and self.global_batch_size % self.streams:
      raise ConfigError(f"{key}.streams", f"{self.streams} streams do not divide global_batch_size "
                        f"{self.global_batch_size}")
    if self.seq_len < 2:
      raise ConfigError(f"{key}.seq_len", f"must be >= 2, got {self.seq_len}")
    if self.global_batch_size < 1:
      raise ConfigError(f"{key}.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
    for name, weight in self.weights.items():
      if weight < 0:
        raise ConfigError(f"{key}.weights.{name}", f"must be >= 0, got {weight}")


REPO = pathlib.Path(__file__).resolve().parents[2]


def cache_dir() -> pathlib.Path:
  """Where the built-in corpus, its tokenizers and prepared shards live: $PRETRAIN_CACHE, else ~/.cache/pretrain."""
  return pathlib.Path(os.environ.get("PRETRAIN_CACHE", "~/.cache/pretrain")).expanduser()


def builtin_data(vocab_size: int, **settings) -> DataConfig:
  """The built-in mixture (data_mixtures/builtin.py), a sentencepiece tokenizer of `vocab_size` trained on it
  on first use, its shards prepared in the cache; shared by every run that asks for the same vocabulary."""
  cache = cache_dir() / "builtin"
  return DataConfig(mixture=str(REPO / "data_mixtures" / "builtin.py"), prepared_dir=str(cache / f"prepared-sp{vocab_size}"),
                    tokenizer=str(cache / f"tokenizer-sp{vocab_size}"), train_tokenizer_vocab_size=vocab_size,
                    **settings)
