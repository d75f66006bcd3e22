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


def two_step_experiment(data_dir: pathlib.Path, workdir: pathlib.Path, model, *, seq_len: int,
                        global_batch_size: int, **mesh) -> dict:
  """A 2-step run of `model` (a model config) on the `data_dir` fixture's mixture, as an experiment dict.

  No warmup: the first update has the peak learning rate, so the second loss shows the gradients.
  """
  from pretrain import schema
  return {
      "model": schema.to_dict(model),
      "data": {"mixture": str(data_dir / "mixture.py"), "prepared_dir": str(data_dir / "prepared"),
               "tokenizer": str(data_dir / "tokenizer"), "train_tokenizer_vocab_size": 512, "seq_len": seq_len,
               "global_batch_size": global_batch_size},
      "train": {"workdir": str(workdir), "steps": 2, "log_every": 1, "checkpoint_every": 2, "mesh": mesh,
                "optimizer": {"peak_learning_rate": 1e-2, "warmup_steps": 0}},
      "seed": 0,
  }
