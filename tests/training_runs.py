"""Helpers for tests that compare two training runs by their logged metrics."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def logged(workdir: pathlib.Path, keys=("loss", "grad_norm")) -> dict[str, list[float]]:
  """Each key's values over the logged steps of a run's metrics.jsonl."""
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {key: [row[key] for row in rows] for key in keys}


def assert_same_training(workdir: pathlib.Path, reference: pathlib.Path, steps: int = 2, tol: float = 1e-5) -> None:
  """Both runs logged `steps` steps with equal losses and gradient norms (and the loss moved)."""
  got, want = logged(workdir), logged(reference)
  assert len(want["loss"]) == steps and want["loss"][0] != want["loss"][1]
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=tol, rtol=tol, err_msg=key)
