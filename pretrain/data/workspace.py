"""From a config's data section to prepared shards and a tokenizer, doing only what is missing.

`ensure_tokenizer` loads `config.data.tokenizer`, training a sentencepiece model on the
mixture's own documents first when it does not exist and the config asks for one
(`train_tokenizer_vocab_size`: the built-in default). `ensure_prepared` runs `prepare`,
which skips what `prepared_dir` already holds and resumes an interrupted run.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from pretrain.data import mixture as mixture_lib
from pretrain.data import prepare, sources
from pretrain.data.config import DataConfig
from pretrain.data.mixture import Mixture
from pretrain.data.tokenizer import Tokenizer, load_tokenizer
from pretrain.data.tokenizer_train import train_sentencepiece
from pretrain.schema import ConfigError


def ensure_tokenizer(data: DataConfig, mixture: Mixture, log: Callable[[str], None] = print) -> Tokenizer:
  path = pathlib.Path(data.tokenizer).expanduser()
  if not path.exists():
    if data.train_tokenizer_vocab_size is None:
      raise ConfigError("config.data.tokenizer", f"{path} does not exist (set train_tokenizer_vocab_size to train "
                        "a sentencepiece model there from the mixture's inputs)")
    log(f"training a {data.train_tokenizer_vocab_size}-token sentencepiece model into {path}")
    train_sentencepiece(sources.mixture_texts(mixture), path, vocab_size=data.train_tokenizer_vocab_size,
                        special_tokens=data.special_tokens)
  return load_tokenizer(path, data.special_tokens, key="config.data")


def ensure_prepared(data: DataConfig, *, workers: int | None = None, overwrite_mismatch: bool = False,
                    log: Callable[[str], None] = print) -> tuple[Mixture, Tokenizer, dict]:
  """(mixture, tokenizer, manifest) with every component's shards in `data.prepared_dir`."""
  mixture = mixture_lib.load(data.mixture)
  tokenizer = ensure_tokenizer(data, mixture, log)
  config = data.prepare if workers is None else dataclasses.replace(data.prepare, workers=workers)
  # prepare() itself skips every finished shard, so a finished preparation costs only its planning.
  manifest = prepare.prepare(mixture, pathlib.Path(data.prepared_dir).expanduser(), tokenizer, config=config,
                             tokenizer_path=str(tokenizer.path), overwrite_mismatch=overwrite_mismatch, log=log)
  return mixture, tokenizer, manifest
