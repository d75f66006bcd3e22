"""MetricsWriter's files (jsonl and TensorBoard events read back) and Progress's two output modes."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct

import numpy as np

from pretrain.train import metrics


def _read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
  """Scalars from TensorBoard event files: TFRecord framing (length, crc, payload, crc) of Event protos."""
  from tensorboardX.proto import event_pb2

  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricsWriter(workdir) as writer:
    writer.write(10, {"loss": 2.5, "learning_rate": np.float32(1e-4)})
    # An expert-load array [moe_layers, experts] becomes its extremes.
    writer.write(20, {"loss": 2.25, "expert_load": np.array([[0.5, 0.25, 0.25], [0.125, 0.375, 0.5]])})
    writer.write(30, {"loss": float("nan")})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert lines[0] == {"step": 10, "loss": 2.5, "learning_rate": float(np.float32(1e-4))}
  assert lines[1] == {"step": 20, "loss": 2.25, "expert_load/max": 0.5, "expert_load/min": 0.125}
  assert lines[2] == {"step": 30, "loss": None}  # strict JSON: no NaN literal

  events = _read_events(os.path.join(workdir, "tensorboard"))
  assert [step for step, _ in events["loss"]] == [10, 20, 30]
  assert events["loss"][0][1] == 2.5 and math.isnan(events["loss"][2][1])
  assert events["expert_load/max"] == [(20, 0.5)]


def test_writer_appends_on_resume(tmp_path):
  for step in (1, 2):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write(step, {"loss": 1.0})
    writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricsWriter(workdir, enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not workdir.exists()


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def test_progress_plain_lines():
  stream, clock = io.StringIO(), _Clock()
  progress = metrics.Progress(100, start_step=20, stream=stream, clock=clock)
  assert not progress.tty  # StringIO is not a terminal
  clock.now += 60.0
  progress.update(30, loss=2.34567, tokens_per_second=12345.0, extra="mfu 41.0%")
  clock.now += 60.0
  progress.update(40, loss=2.0, tokens_per_second=999.0)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  # 10 steps in 60 s since the start at step 20: 70 left take 420 s.
  assert lines[0] == "step 30/100 loss 2.3457 tokens/s 12.35k ETA 0:07:00 mfu 41.0%"
  # 20 steps in 120 s: 60 left take 360 s.
  assert lines[1] == "step 40/100 loss 2.0000 tokens/s 999.0 ETA 0:06:00"


def test_progress_tty_overwrites_one_line(monkeypatch):
  monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal width
  stream, clock = io.StringIO(), _Clock()
  progress = metrics.Progress(8, stream=stream, tty=True, clock=clock)
  clock.now += 1.0
  progress.update(2, loss=1.5, tokens_per_second=2e6, extra="a long extra field")
  clock.now += 1.0
  progress.update(4, loss=1.25, tokens_per_second=2e6)
  progress.close()
  out = stream.getvalue()
  assert out.count("\n") == 1 and out.endswith("\n")  # one line, ended once on close
  frames = out.rstrip("\n").split("\r")[1:]
  assert len(frames) == 2
  assert frames[0].startswith("[" + "#" * 6 + "." * 18 + "] 2/8 loss 1.5000 tokens/s 2.00M ETA 0:00:03")
  assert frames[1].startswith("[" + "#" * 12 + "." * 12 + "] 4/8 loss 1.2500")
  assert "ETA 0:00:02" in frames[1]
  assert len(frames[1]) == len(frames[0])  # padded over the longer first frame


def test_eta_math():
  clock = _Clock()
  progress = metrics.Progress(1000, start_step=500, stream=io.StringIO(), clock=clock)
  assert progress.eta_seconds(500) == math.inf  # no rate yet
  clock.now += 50.0
  assert progress.eta_seconds(600) == 400 * 50.0 / 100
  assert metrics.format_duration(3725.4) == "1:02:05"
  assert metrics.format_duration(math.inf) == "?"
