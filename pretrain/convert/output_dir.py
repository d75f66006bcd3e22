"""Writing a checkpoint directory all-or-nothing.

Files go into a hidden sibling (`.NAME.partial-XXXX`) that is renamed to NAME only
once everything is written; on any error it is removed. An existing non-empty NAME is
refused rather than overwritten.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import uuid
from collections.abc import Iterator

from pretrain.convert.errors import ConversionError


def refuse_non_empty(out_dir: pathlib.Path) -> None:
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise ConversionError(f"{out_dir}: already exists and is not an empty directory; nothing is overwritten, "
                          "remove it or choose another directory")


@contextlib.contextmanager
def atomic_output_dir(out_dir) -> Iterator[pathlib.Path]:
  """Yields the directory to write into; it becomes `out_dir` only if the block succeeds."""
  out_dir = pathlib.Path(out_dir).absolute()
  refuse_non_empty(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
  partial.mkdir()
  try:
    yield partial
    if out_dir.exists():
      out_dir.rmdir()  # empty, checked above
    partial.rename(out_dir)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
