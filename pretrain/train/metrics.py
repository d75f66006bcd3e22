"""What the user sees of a run: a metrics file, TensorBoard scalars, and a progress line.

`MetricsWriter` appends one JSON object per logged step to `workdir/metrics.jsonl`
(easy to read back with a few lines of Python or `jq`) and writes the same scalars to
TensorBoard event files under `workdir/tensorboard`. Only process 0 writes, so a
multi-host run has one copy. A work directory on a bucket (gs://, s3://) has no append: both
are written to a local mirror and uploaded whole from a background thread, the jsonl after
every write, TensorBoard at most every `TENSORBOARD_UPLOAD_SECONDS` and at the end.
`Progress` draws a self-overwriting bar in a terminal and prints plain lines when the output
goes to a log file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Self, TextIO

import jax
import numpy as np

from pretrain import storage

TENSORBOARD_UPLOAD_SECONDS = 30.0


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
    self._mirror: _BucketMirror | None = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: processes that never write never load it

    if storage.is_url(workdir):
      self._mirror = _BucketMirror(storage.as_path(workdir))
      workdir = self._mirror.local
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run, closed in close())
    # Event files are named by the second and host; on a bucket, where one would replace another, also by writer.
    suffix = f".{uuid.uuid4().hex[:8]}" if self._mirror is not None else ""
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), filename_suffix=suffix)

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
    if self._mirror is not None:
      self._mirror.changed()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tensorboard.close()
      self._jsonl = self._tensorboard = None
    if self._mirror is not None:
      self._mirror.close()
      self._mirror = None

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _BucketMirror:
  """A local directory that a background thread copies to a bucket directory, file by file, whole.

  `metrics.jsonl` goes up after every change (one request, where a checkpoint's commit takes many,
  so a killed run's jsonl reaches its last checkpoint); TensorBoard's event files at most every
  TENSORBOARD_UPLOAD_SECONDS. Only whole lines go up.
  A resumed run first fetches the jsonl to continue it. New event files get new names, so those
  of earlier runs stay as they are.
  """

  def __init__(self, remote):
    self.remote = remote
    self._directory = tempfile.TemporaryDirectory(prefix="pretrain-metrics-")
    self.local = self._directory.name
    jsonl = remote / "metrics.jsonl"
    if jsonl.exists():
      with open(os.path.join(self.local, "metrics.jsonl"), "wb") as f:
        f.write(jsonl.read_bytes())
    self._uploaded_tensorboard, self._sizes = time.monotonic(), {}
    self._wake, self._stop = threading.Event(), False
    self._error: Exception | None = None
    self._thread = threading.Thread(target=self._run, name="metrics-upload", daemon=True)
    self._thread.start()

  def changed(self) -> None:
    if self._error is not None:
      raise RuntimeError(f"uploading metrics to {self.remote} failed") from self._error
    self._wake.set()

  def close(self) -> None:
    self._stop = True
    self._wake.set()
    self._thread.join()
    self._directory.cleanup()
    if self._error is not None:
      raise RuntimeError(f"uploading metrics to {self.remote} failed") from self._error

  def _run(self) -> None:
    while True:
      self._wake.wait()
      self._wake.clear()
      stop = self._stop
      try:
        self._upload(tensorboard=stop or time.monotonic() - self._uploaded_tensorboard >= TENSORBOARD_UPLOAD_SECONDS)
      except Exception as e:  # noqa: BLE001 (raised in the training thread at its next write or close)
        self._error = e
        return
      if stop:
        return

  def _upload(self, tensorboard: bool) -> None:
    names = ["metrics.jsonl"]
    if tensorboard:
      names += [os.path.relpath(os.path.join(root, name), self.local)
                for root, _, files in os.walk(os.path.join(self.local, "tensorboard")) for name in files]
      self._uploaded_tensorboard = time.monotonic()
    for name in names:
      local = os.path.join(self.local, name)
      if not os.path.exists(local):
        continue
      with open(local, "rb") as f:
        data = f.read()
      if name == "metrics.jsonl":  # whole lines only: the training thread may be writing the next one
        data = data[:data.rfind(b"\n") + 1]
      if self._sizes.get(name) != len(data):
        (self.remote / name).write_bytes(data)
        self._sizes[name] = len(data)


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
