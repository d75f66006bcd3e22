"""Files written whole or not at all (run and stage markers, evaluation reports): a temporary sibling, renamed into place."""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_file(path) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write; it replaces `path` only if the block succeeds."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)

