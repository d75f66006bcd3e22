"""From a config's data section to prepared shards and a tokenizer, doing only what is missing.

`ensure_tokenizer` loads `config.data.tokenizer`, training a sentencepiece model on the
mixture's own documents first when it does not exist and the config asks for one
(`train_tokenizer_vocab_size`: the built-in default). `ensure_prepared` runs `prepare`,
which skips what `prepared_dir` already holds and resumes an interrupted run.

Either may be a gs:// or s3:// URL, read through a local copy (`storage.download`, under
$PRETRAIN_CACHE/objects/). A prepared directory on a bucket that holds a manifest.json is read as
it is (prepared elsewhere and copied up, its raw inputs need not be here); one without is prepared
there, from the mixture's inputs (local or on buckets), then copied down.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

from pretrain import storage
from pretrain.data import mixture as mixture_lib
from pretrain.data import prepare, sources
from pretrain.data.config import DataConfig
from pretrain.data.mixture import Mixture
from pretrain.data.tokenizer import Tokenizer, load_tokenizer
from pretrain.data.tokenizer_train import train_sentencepiece
from pretrain.schema import ConfigError


def ensure_tokenizer(data: DataConfig, mixture: Mixture, log: Callable[[str], None] = print) -> Tokenizer:
  if storage.is_url(data.tokenizer):  # sentencepiece and tokenizers read local files
    return load_tokenizer(storage.download(data.tokenizer, "config.data.tokenizer"), data.special_tokens,
                          key="config.data")
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
                    log: Callable[[str], None] = print, download: bool = True) -> tuple[Mixture, Tokenizer, dict]:
  """(mixture, tokenizer, manifest) with every component's shards in `data.prepared_dir`; a bucket's copied
  to this host too when `download` (training reads local shards)."""
  key = "config.data.prepared_dir"
  mixture = mixture_lib.load(data.mixture)
  tokenizer = ensure_tokenizer(data, mixture, log)
  url = data.prepared_dir if storage.is_url(data.prepared_dir) else None
  if url:
    storage.check_bucket(url, key)
  if url and storage.as_path(f"{url.rstrip('/')}/{prepare.MANIFEST}").exists():
    manifest = _prepared_elsewhere(url, mixture, tokenizer)
  else:
    config = data.prepare if workers is None else dataclasses.replace(data.prepare, workers=workers)
    out = url or pathlib.Path(data.prepared_dir).expanduser()
    # prepare() itself skips every finished shard, so a finished preparation costs only its planning.
    manifest = prepare.prepare(mixture, out, tokenizer, config=config, tokenizer_path=str(tokenizer.path),
                               overwrite_mismatch=overwrite_mismatch, log=log, out_key=key)
  if url and download:
    log(f"reading the prepared data in {url} from its copy in {storage.cache_path(url)}")
    storage.download(url, key)
  return mixture, tokenizer, manifest


def _prepared_elsewhere(url: str, mixture: Mixture, tokenizer: Tokenizer) -> dict:
  """The manifest of a bucket's finished prepared directory, checked against this mixture and tokenizer."""
  key = "config.data.prepared_dir"
  manifest = json.loads(storage.as_path(f"{url.rstrip('/')}/{prepare.MANIFEST}").read_text())
  missing = [name for name in mixture.names if name not in manifest.get("components", {})]
  if missing:
    raise ConfigError(key, f"{url} holds no prepared component {missing[0]!r} of mixture {mixture.name!r} "
                      f"(it has {', '.join(sorted(manifest.get('components', {}))) or 'none'})")
  if manifest.get("tokenizer", {}).get("sha256") != prepare._file_digest(tokenizer.path):
    raise ConfigError(key, f"{url} was prepared with another tokenizer than {tokenizer.path} "
                      f"({manifest.get('tokenizer', {}).get('path')}, see its {prepare.MANIFEST})")
  return manifest
