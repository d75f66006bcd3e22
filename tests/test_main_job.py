"""The README's main job (`pretrain train` on configs/default.py) through a few steps, as a user runs it.

The built-in corpus is shrunk (`max_code_files`) and written to a fresh PRETRAIN_CACHE, so the
whole first-use path runs: corpus, tokenizer training, preparation, training, checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_default_config_prepares_its_data_and_trains(tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "pretrain.cli", "train", f"--config={ROOT / 'configs' / 'default.py'}",
       "--config.train.steps=3", "--config.train.log_every=1", f"--config.train.workdir={workdir}",
       f"--config.data.mixture={ROOT / 'data_mixtures' / 'builtin.py'}:max_code_files=40"],
      capture_output=True, text=True, timeout=900, cwd=tmp_path,
      env=dict(os.environ, PRETRAIN_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "training a 1024-token sentencepiece model" in out.stdout
  assert f"checkpoints in {workdir.absolute() / 'checkpoints'}" in out.stdout
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
  assert (workdir / "checkpoints" / "3").is_dir()
