"""Staged recipes: stages run in order, each from the previous one's final state; a run killed in
a later stage continues there, never repeats a finished stage, and ends bit-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import experiment_dict, final_params, metrics

from pretrain import config as config_lib
from pretrain.schema import ConfigError
from pretrain.train import checkpoint, stages

RUN_SCRIPT = """
import json, sys
from pretrain import config as config_lib
from pretrain.train import stages
stages.run(config_lib.parse_experiment(json.loads(open(sys.argv[1]).read())), log=lambda m: print(m, flush=True))
"""


def recipe_dict(data_dir, workdir) -> dict:
  config = experiment_dict(data_dir, workdir, steps=4, checkpoint_every=1)
  config["model"]["rope_scaling"] = {"type": "none"}
  yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
  config["stages"] = [
      {"name": "continued", "steps": 4},
      {"name": "long", "steps": 4, "seq_len": 128, "global_batch_size": 2, "min_length": 64, "rope_scaling": yarn,
       "optimizer": {"peak_learning_rate": 1e-3, "warmup_steps": 0}, "carry_optimizer_state": True},
      {"name": "longer", "steps": 3, "seq_len": 128, "global_batch_size": 2, "weights": {"code": 1.0, "text": 0.0},
       "optimizer": {"peak_learning_rate": 1e-3, "warmup_steps": 0}},
  ]
  return config


def stage_dirs(workdir):
  return [workdir / "stages" / name for name in ("0-continued", "1-long", "2-longer")]


@pytest.mark.slow
def test_stages_run_in_order_and_each_starts_from_the_last(data_dir, tmp_path):
  exp = config_lib.parse_experiment(recipe_dict(data_dir, tmp_path / "run"))
  plan = stages.stage_experiments(exp)
  assert [e.data.seq_len for _, e in plan] == [64, 128, 128]
  assert [e.model.rope_scaling.type for _, e in plan] == ["none", "yarn", "none"]
  assert [e.train.init_optimizer_state for _, e in plan] == [False, True, False]
  assert plan[1][1].train.init_from == str(plan[0][0]) and plan[2][1].train.init_from == str(plan[1][0])
  stages.run(exp, log=lambda m: None)
  for workdir, stage_exp in plan:
    assert (workdir / stages.DONE_FILE).exists()
    assert [r["step"] for r in metrics(workdir)] == list(range(1, stage_exp.train.steps + 1))
  logs = []
  stages.run(exp, log=logs.append)  # again: nothing left to do
  assert sum("finished earlier, skipped" in line for line in logs) == 3


def test_a_stage_s_yarn_raises_the_model_s_positions_and_the_runlocal_recipe_fits():
  from pretrain import recipes

  recipe = config_lib.parse_experiment(recipes.runlocal("runs/x"))
  plan = stages.stage_experiments(recipe)
  assert [e.data.seq_len for _, e in plan] == [128, 256, 512]
  assert [e.model.max_position_embeddings for _, e in plan] == [128, 512, 512]  # YaRN: 128 x 4


@pytest.mark.slow
def test_killed_in_a_later_stage_resumes_there_and_ends_bit_identical(data_dir, tmp_path):
  straight = config_lib.parse_experiment(recipe_dict(data_dir, tmp_path / "straight"))
  stages.run(straight, log=lambda m: None)

  config = recipe_dict(data_dir, tmp_path / "killed")
  file = tmp_path / "killed.json"
  file.write_text(json.dumps(config))
  process = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(file)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  first, second, _ = stage_dirs(tmp_path / "killed")
  deadline = time.time() + 300
  while not checkpoint.has_checkpoints(second) and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert (first / stages.DONE_FILE).exists() and not (second / stages.DONE_FILE).exists()
  first_metrics = (first / "metrics.jsonl").read_text()

  logs = []
  stages.run(config_lib.parse_experiment(config), log=logs.append)
  assert (first / "metrics.jsonl").read_text() == first_metrics  # the finished stage did not run again
  assert any("stage 1/3 continued: finished earlier" in line for line in logs)
  assert any(line.startswith("resumed from") and "1-long" in line for line in logs)
  exp = config_lib.parse_experiment(config)
  for a_dir, b_dir in zip(stage_dirs(tmp_path / "straight"), stage_dirs(tmp_path / "killed"), strict=True):
    a, b = final_params(a_dir, exp), final_params(b_dir, exp)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{b_dir.name} {key}")


@pytest.mark.parametrize("change, words", [
    (lambda c: c["stages"].append(dict(c["stages"][0])), r"config\.stages\[3\]\.name"),
    (lambda c: c["stages"][0].update(carry_optimizer_state=True), r"config\.stages\[0\]\.carry_optimizer_state"),
    (lambda c: c["stages"][1].update(steps=0), r"config\.stages\[1\]\.steps"),
    (lambda c: c["stages"][1].update(name="a/b"), r"config\.stages\[1\]\.name"),
    # 2048 tokens: past the model's 1024 positions, and past what the stage's YaRN (64 x 2) reaches.
    (lambda c: c["stages"][1].update(seq_len=2048), r"config\.stages\[1\]\.seq_len: 2048 is longer than the "
     r"model's 1024 positions"),
])
def test_bad_stages_are_refused_before_anything_runs(data_dir, tmp_path, change, words):
  config = recipe_dict(data_dir, tmp_path / "run")
  change(config)
  with pytest.raises(ConfigError, match=words):
    stages.run(config_lib.parse_experiment(config), log=lambda m: None)
  assert not (tmp_path / "run").exists()
