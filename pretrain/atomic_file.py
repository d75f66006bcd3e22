"""Files and directories written whole or not at all: a temporary sibling (`.NAME.tmp-XXXXXXXX`),
renamed into place when complete, removed on any error. Run and stage markers, evaluation
reports, prepared shards and their sidecars, tokenizers, the built-in corpus and checkpoint
exports all go through `atomic_file` or `atomic_dir`.

On a bucket (a gs:// or s3:// URL) there is no rename: the file is written locally, then uploaded once
complete. An object appears only when its upload has finished, so readers see it whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from pretrain import storage


@contextlib.contextmanager
def atomic_file(path) -> Iterator[pathlib.Path]:
  """Yields a temporary local path to write; it replaces `path` only if the block succeeds."""
  if storage.is_url(path):
    target = storage.as_path(path)
    with tempfile.TemporaryDirectory(prefix="pretrain-upload-") as directory:
      tmp = pathlib.Path(directory) / target.name
      yield tmp
      target.write_bytes(tmp.read_bytes())
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[pathlib.Path]:
  """Yields a temporary local directory to fill; it becomes `path` only if the block succeeds.

  `path` may exist only as an empty directory: a non-empty one (made by someone else meanwhile,
  say) is never replaced, the block's work is dropped and FileExistsError raised. On a bucket
  (no rename) the files go in place and a failure removes them: readers there look for the file
  a writer puts last (config.json, model_config.json).
  """
  if storage.is_url(path):
    target = storage.as_path(path)
    try:
      yield target
    except BaseException:
      target.rmtree(missing_ok=True)
      raise
    return
  path = pathlib.Path(path).expanduser().absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    yield tmp
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
      raise FileExistsError(f"{path}: already exists and is not an empty directory; nothing is overwritten")
    if path.exists():
      path.rmdir()
    tmp.rename(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
