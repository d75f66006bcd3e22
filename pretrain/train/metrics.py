"""What the user sees of a run: a metrics file, TensorBoard scalars, and a progress line.

`MetricsWriter` appends one JSON object per logged step to `workdir/metrics.jsonl`
(easy to read back with a few lines of Python or `jq`) and writes the same scalars to
TensorBoard event files under `workdir/tensorboard`. Only process 0 writes, so a
multi-host run has one copy. `Progress` draws a self-overwriting bar in a terminal
and prints plain lines when the output goes to a log file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, Self, TextIO

import jax
import numpy as np


def _scalars(values: dict[str, Any]) -> dict[str, float]:
  """Host scalars; an array under `key` becomes `key/max` and `key/min`.

  TensorBoard scalars and a readable jsonl want numbers, not arrays: for the MoE
  expert load ([moe_layers, n_routed_experts] fractions of assignments) the busiest
  and idlest expert are what tells balance from collapse.
  """
  out: dict[str, float] = {}
  for key, value in values.items():
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
      out[key] = float(array)
    elif array.size:
      out[f"{key}/max"] = float(array.max())
      out[f"{key}/min"] = float(array.min())
  return out


class MetricsWriter:
  """Scalars per step to `workdir/metrics.jsonl` and TensorBoard; a no-op unless enabled on process 0.

  Values must already be on the host (the trainer fetches step N-1's metrics after
  dispatching step N); converting a device array here would make the loop wait.
  The jsonl file is appended to, so a resumed run continues it; steps redone after a
  restore appear twice, and the later line is the one that counts.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._jsonl: TextIO | None = None
    self._tensorboard = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: processes that never write never load it

    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run, closed in close())
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    values = _scalars(scalars)
    # Strict JSON has no NaN or Infinity; null keeps every line parseable by any reader.
    record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._tensorboard.add_scalar(key, value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tensorboard.close()
      self._jsonl = self._tensorboard = None

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_duration(seconds: float) -> str:
  """H:MM:SS, or '?' when unknown."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = round(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _format_rate(value: float) -> str:
  for unit, scale in (("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.2f}{unit}"
  return f"{value:.1f}"


class Progress:
  """Step, loss, tokens/s and ETA: one overwritten line in a terminal, a plain line per call otherwise.

  The ETA divides the steps left by the rate since this object was made, so it
  includes compilation at first and settles as steps accumulate.
  """

  BAR_WIDTH = 24

  def __init__(self, total_steps: int, *, start_step: int = 0, stream: TextIO | None = None,
               tty: bool | None = None, clock: Callable[[], float] = time.monotonic):
    self.total_steps = total_steps
    self.start_step = start_step
    # Resolved at call time, not import time, so pytest's capture and redirections are honoured.
    self.stream = stream if stream is not None else sys.stderr
    self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
    self._clock = clock
    self._start = clock()
    self._last_width = 0

  def eta_seconds(self, step: int) -> float:
    done = step - self.start_step
    elapsed = self._clock() - self._start
    if done <= 0 or elapsed <= 0:
      return math.inf
    return max(self.total_steps - step, 0) * elapsed / done

  def update(self, step: int, *, loss: float, tokens_per_second: float, extra: str = "") -> None:
    fields = (f"{step}/{self.total_steps} loss {loss:.4f} tokens/s {_format_rate(tokens_per_second)} "
              f"ETA {format_duration(self.eta_seconds(step))}")
    if extra:
      fields += f" {extra}"
    if not self.tty:
      self.stream.write(f"step {fields}\n")
      self.stream.flush()
      return
    filled = self.BAR_WIDTH * min(max(step, 0), self.total_steps) // max(self.total_steps, 1)
    line = f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {fields}"
    # A line wider than the terminal wraps, and '\r' then rewrites only its last row.
    line = line[:max(shutil.get_terminal_size().columns - 1, 20)]
    # Pad over the tail of a longer previous line instead of relying on terminal escapes.
    self.stream.write("\r" + line + " " * max(self._last_width - len(line), 0))
    self.stream.flush()
    self._last_width = len(line)

  def close(self) -> None:
    if self.tty and self._last_width:
      self.stream.write("\n")  # leave the final line in place; later output starts below it
      self.stream.flush()
      self._last_width = 0
