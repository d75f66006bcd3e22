"""Writing a checkpoint directory all-or-nothing.

Files go into a hidden sibling (`atomic_file.atomic_dir`) that is renamed to NAME only
once everything is written; on any error it is removed. An existing non-empty NAME is
refused rather than overwritten, before any work.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

from pretrain import storage
from pretrain.atomic_file import atomic_dir
from pretrain.convert.errors import ConversionError


def refuse_non_empty(out_dir) -> None:
  out_dir = storage.as_path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise ConversionError(f"{out_dir}: already exists and is not an empty directory; nothing is overwritten, "
                          "remove it or choose another directory")


@contextlib.contextmanager
def atomic_output_dir(out_dir) -> Iterator[pathlib.Path]:
  """Yields the directory to write into; it becomes `out_dir` only if the block succeeds. A non-empty
  `out_dir` is refused before anything is written."""
  refuse_non_empty(out_dir)
  with atomic_dir(out_dir) as partial:
    yield partial
