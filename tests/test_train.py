"""`pretrain train`: it learns, resumes exactly (after SIGKILL anywhere, and SIGTERM), shards
the same on 8 devices as on 1, guards against bad updates, starts from `init_from`, and refuses
bad configs before writing anything."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from pretrain import config as config_lib
from pretrain import convert, models, schema
from pretrain.models import presets
from pretrain.schema import ConfigError
from pretrain.train import checkpoint, step, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def experiment_dict(data_dir: pathlib.Path, workdir: pathlib.Path, **train) -> dict:
  model = schema.to_dict(presets.get("tiny-deepseek-v2", num_hidden_layers=2, vocab_size=512))
  return {
      "model": model,
      "data": {"mixture": str(data_dir / "mixture.py"), "prepared_dir": str(data_dir / "prepared"),
               "tokenizer": str(data_dir / "tokenizer"), "train_tokenizer_vocab_size": 512, "seq_len": 64,
               "global_batch_size": 4},
      "train": {"workdir": str(workdir), "steps": 6, "log_every": 1, "checkpoint_every": 2,
                "optimizer": {"peak_learning_rate": 1e-2, "warmup_steps": 2}, **train},
      "seed": 0,
  }


def experiment(data_dir, workdir, **train):
  return config_lib.parse_experiment(experiment_dict(data_dir, workdir, **train))


def final_params(workdir: pathlib.Path, exp) -> dict:
  """The parameters of the latest checkpoint, as host numpy arrays by path."""
  abstract = models.build_abstract(exp.model)
  _, params = nnx.split(abstract)
  from pretrain.train import optimizer

  tx = optimizer.make_optimizer(exp.train.optimizer, exp.train.steps, params)
  target = jax.eval_shape(lambda p: step.init_state(p, tx), params)
  checkpoints = checkpoint.Checkpoints(workdir, exp.train)
  state = checkpoints.restore(checkpoints.latest_step(), target)
  checkpoints.close()
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_trains_and_the_loss_falls(data_dir, tmp_path):
  exp = experiment(data_dir, tmp_path / "run", steps=12)
  trainer.train(exp, log=lambda m: None)
  rows = metrics(tmp_path / "run")
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert min(r["loss"] for r in rows[-4:]) < rows[0]["loss"] - 0.5
  for key in ("loss/code", "loss/text", "balance_loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu",
              "expert_load/max", "expert_load/min"):
    assert key in rows[-1], key
  assert (tmp_path / "run" / "tensorboard").is_dir()
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [8, 10, 12]


RUN_SCRIPT = """
import json, sys
from pretrain import config as config_lib
from pretrain.train import trainer
trainer.train(config_lib.parse_experiment(json.loads(open(sys.argv[1]).read())), log=lambda m: print(m, flush=True))
"""


def _start(config: dict, tmp_path: pathlib.Path, name: str) -> subprocess.Popen:
  file = tmp_path / f"{name}.json"
  file.write_text(json.dumps(config))
  return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(file)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0.5, 3.0])
def test_sigkill_anywhere_then_resume_ends_bit_identical(data_dir, tmp_path, kill_after):
  config = experiment_dict(data_dir, tmp_path / "killed", steps=8, checkpoint_every=1)
  process = _start(config, tmp_path, "killed")
  # Wait for the first step to be compiled, then kill at a moment that lands inside steps and saves.
  deadline = time.time() + 120
  while not list((tmp_path / "killed").glob("checkpoints/*")) and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  time.sleep(kill_after * 0.1)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL  # killed, not finished before the signal came
  saved = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit())
  assert not saved or saved[-1] < 8, f"the run was to be killed mid-way; checkpoints {saved}"
  trainer.train(config_lib.parse_experiment(config), log=lambda m: None)
  trainer.train(experiment(data_dir, tmp_path / "straight", steps=8, checkpoint_every=1), log=lambda m: None)
  exp = experiment(data_dir, tmp_path / "straight", steps=8)
  a, b = final_params(tmp_path / "straight", exp), final_params(tmp_path / "killed", exp)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_the_same_command_finishes_bit_identical(data_dir, tmp_path):
  config = experiment_dict(data_dir, tmp_path / "run", steps=40, checkpoint_every=1000)
  process = _start(config, tmp_path, "run")
  deadline = time.time() + 120
  while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0, out
  assert "SIGTERM: saved step" in out
  exp = config_lib.parse_experiment(config)
  saved = checkpoint.Checkpoints(tmp_path / "run", exp.train)
  step_saved = saved.latest_step()
  saved.close()
  assert 0 < step_saved < 40
  trainer.train(exp, log=lambda m: None)  # the same command again
  assert [r["step"] for r in metrics(tmp_path / "run")][-1] == 40
  trainer.train(experiment(data_dir, tmp_path / "straight", steps=40, checkpoint_every=1000), log=lambda m: None)
  a, b = final_params(tmp_path / "straight", exp), final_params(tmp_path / "run", exp)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


MESH_SCRIPT = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from pretrain import config as config_lib
from pretrain.train import trainer
trainer.train(config_lib.parse_experiment(json.loads(open(sys.argv[1]).read())), log=lambda m: None)
"""


def _run_on_eight_devices(config: dict, tmp_path: pathlib.Path) -> None:
  file = tmp_path / "eight.json"
  file.write_text(json.dumps(config))
  subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(file)], check=True, capture_output=True)


@pytest.mark.slow
def test_eight_devices_match_one_within_1e5_and_checkpoints_move_between_meshes(data_dir, tmp_path):
  eight_way = {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}
  trainer.train(experiment(data_dir, tmp_path / "one", steps=3), log=lambda m: None)
  _run_on_eight_devices(experiment_dict(data_dir, tmp_path / "eight", steps=3, mesh=eight_way), tmp_path)
  one, eight = metrics(tmp_path / "one"), metrics(tmp_path / "eight")
  np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], atol=1e-5)
  # A 1-device checkpoint continues on 8 devices (and the reverse) as it does on 1 (each extended to 5 steps,
  # a schedule change the resume must be allowed to make).
  shutil.copytree(tmp_path / "one", tmp_path / "one_then_eight")
  shutil.copytree(tmp_path / "eight", tmp_path / "eight_then_one")
  longer = {"steps": 5, "allow_config_change": True}
  trainer.train(experiment(data_dir, tmp_path / "one", **longer), log=lambda m: None)
  _run_on_eight_devices(experiment_dict(data_dir, tmp_path / "one_then_eight", mesh=eight_way, **longer), tmp_path)
  trainer.train(experiment(data_dir, tmp_path / "eight_then_one", **longer), log=lambda m: None)
  expected = [r["loss"] for r in metrics(tmp_path / "one")][-2:]
  for run in ("one_then_eight", "eight_then_one"):
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / run)][-2:], expected, atol=1e-5, err_msg=run)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_full_batch_update(data_dir, tmp_path):
  trainer.train(experiment(data_dir, tmp_path / "full", steps=3), log=lambda m: None)
  trainer.train(experiment(data_dir, tmp_path / "micro", steps=3, microbatches=4), log=lambda m: None)
  full, micro = metrics(tmp_path / "full"), metrics(tmp_path / "micro")
  # Same loss and gradient norm at every step: the same gradients, so the same updates. (Parameters are
  # not compared: Adam turns a 1e-12 difference in a near-zero gradient into a visible one.)
  for key in ("loss", "ce_loss", "grad_norm", "loss/code", "loss/text"):
    np.testing.assert_allclose([r[key] for r in micro], [r[key] for r in full], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_remat_changes_memory_not_results(data_dir, tmp_path):
  trainer.train(experiment(data_dir, tmp_path / "none", steps=2), log=lambda m: None)
  trainer.train(experiment(data_dir, tmp_path / "block", steps=2, remat="block"), log=lambda m: None)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in metrics(tmp_path / "block")],
                               [r[key] for r in metrics(tmp_path / "none")], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_bad_updates_are_skipped_then_the_run_stops(data_dir, tmp_path):
  exp = experiment(data_dir, tmp_path / "run", steps=40, grad_spike_factor=1e-6, max_bad_steps=3,
                   checkpoint_every=4)
  with pytest.raises(trainer.BadStepsError, match="3 consecutive updates skipped"):
    trainer.train(exp, log=lambda m: None)
  rows = metrics(tmp_path / "run")
  assert [r["update_skipped"] for r in rows][-3:] == [1.0, 1.0, 1.0]
  assert checkpoint.Checkpoints(tmp_path / "run", exp.train).latest_step() is not None


@pytest.mark.slow
def test_init_from_a_hugging_face_directory(data_dir, tmp_path):
  exp = experiment(data_dir, tmp_path / "run", steps=1)
  source = models.build(exp.model, seed=7)
  convert.save_hf(source, tmp_path / "hf")
  config = experiment_dict(data_dir, tmp_path / "run", steps=1, init_from=str(tmp_path / "hf"))
  trainer.train(config_lib.parse_experiment(config), log=lambda m: None)
  # The learning rate of the first update is 0 (warmup starts there): the parameters are the source's.
  got = final_params(tmp_path / "run", exp)
  want = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(nnx.state(source, nnx.Param))}
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("train, words", [
    ({"mesh": {"data": 3}}, "config.train.mesh"),
    ({"microbatches": 3}, "config.data.global_batch_size"),
    ({"init_from": "/nonexistent/model"}, "config.train.init_from"),
    ({"init_from": "/"}, "config.train.init_from"),  # exists, but is no model
])
def test_bad_configs_fail_before_anything_is_written(data_dir, tmp_path, train, words):
  with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
    trainer.train(experiment(data_dir, tmp_path / "run", **train), log=lambda m: None)
  assert not (tmp_path / "run").exists()


def test_a_sequence_longer_than_the_model_s_positions_is_refused(data_dir, tmp_path):
  config = experiment_dict(data_dir, tmp_path / "run")
  config["model"]["max_position_embeddings"] = 32  # the rows are 64 tokens
  with pytest.raises(ConfigError, match=r"config\.data\.seq_len: 64 is longer than the model's 32 positions"):
    trainer.train(config_lib.parse_experiment(config), log=lambda m: None)
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_workdir_of_another_model_is_refused(data_dir, tmp_path):
  trainer.train(experiment(data_dir, tmp_path / "run", steps=1), log=lambda m: None)
  config = experiment_dict(data_dir, tmp_path / "run", steps=2)
  config["model"]["num_hidden_layers"] = 3
  with pytest.raises(ConfigError, match="config.model.num_hidden_layers"):
    trainer.train(config_lib.parse_experiment(config), log=lambda m: None)


@pytest.mark.slow
def test_init_from_a_training_workdir(data_dir, tmp_path):
  """Continued pretraining from another run: its latest parameters, not its optimizer or step."""
  trainer.train(experiment(data_dir, tmp_path / "source", steps=3), log=lambda m: None)
  exp = experiment(data_dir, tmp_path / "run", steps=1, init_from=str(tmp_path / "source"))
  trainer.train(exp, log=lambda m: None)
  assert [r["step"] for r in metrics(tmp_path / "run")] == [1]  # a fresh schedule, not step 4
  got, want = final_params(tmp_path / "run", exp), final_params(tmp_path / "source", exp)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
