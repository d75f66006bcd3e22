"""Multi-host training on JAX's distributed runtime: 2 processes on 127.0.0.1, 2 CPU devices each.

They train a tiny MoE with data x expert sharding, save, are killed, restart and resume; the
losses equal a 1-process run on 4 devices. A process whose peer dies exits with an error
instead of hanging. Every run is a real `pretrain train` command in its own process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from pretrain import schema
from pretrain.models import presets
from pretrain.schema import ConfigError
from pretrain.train import distributed

STEPS = 8


def write_config(path: pathlib.Path, data_dir: pathlib.Path, workdir: pathlib.Path, **train) -> pathlib.Path:
  experiment = {
      "model": schema.to_dict(presets.get("tiny-deepseek-v2", num_hidden_layers=2, vocab_size=512)),
      "data": {"mixture": str(data_dir / "mixture.py"), "prepared_dir": str(data_dir / "prepared"),
               "tokenizer": str(data_dir / "tokenizer"), "train_tokenizer_vocab_size": 512, "seq_len": 64,
               "global_batch_size": 4, "streams": 2},
      "train": {"workdir": str(workdir), "steps": STEPS, "log_every": 1, "checkpoint_every": 2,
                "mesh": {"data": 2, "expert": 2}, "optimizer": {"peak_learning_rate": 1e-2, "warmup_steps": 2}} | train,
      "seed": 0,
  }
  path.write_text(f"import json\n\ndef get_config(arg=None):\n  return json.loads({json.dumps(experiment)!r})\n")
  return path


def start(config: pathlib.Path, devices: int, *flags: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", f"--config={config}", *flags], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_pod(config: pathlib.Path, port: int, **flags) -> list[subprocess.Popen]:
  extra = [f"--{k}={v}" for k, v in flags.items()]
  return [start(config, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *extra)
          for i in range(2)]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  outs = [p.communicate(timeout=timeout)[0] for p in processes]
  for p, out in zip(processes, outs, strict=True):
    assert p.returncode == 0, out
  return outs


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """Loss by step; a step redone after a resume counts by its last record."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows}


def complete_checkpoints(workdir: pathlib.Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> pathlib.Path:
  """The work directory of the uninterrupted 1-process run on 4 devices that the pods must match."""
  root = tmp_path_factory.mktemp("one_process")
  finish([start(write_config(root / "one.py", data_dir, root / "run"), 4)])
  return root / "run"


@pytest.mark.slow
def test_two_processes_save_are_killed_resume_and_match_one_process_on_four_devices(data_dir, tmp_path, reference):
  pod = tmp_path / "two_processes"
  config = write_config(tmp_path / "two.py", data_dir, pod)
  processes = start_pod(config, free_port())
  deadline = time.time() + 300
  while not complete_checkpoints(pod) and time.time() < deadline and all(p.poll() is None for p in processes):
    time.sleep(0.02)
  for p in processes:
    p.send_signal(signal.SIGKILL)
  for p in processes:
    p.communicate()
  saved = complete_checkpoints(pod)
  assert saved and saved[-1] < STEPS, f"the pod was to be killed mid-run; checkpoints {saved}"

  outs = finish(start_pod(config, free_port()))
  assert f"resumed from {pod / 'checkpoints'}/{saved[-1]}" in outs[0]
  assert outs[1].strip() == "" or "resumed" not in outs[1]  # only process 0 logs
  assert complete_checkpoints(pod)[-1] == STEPS
  want, got = losses(reference), losses(pod)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], abs=1e-5), step


@pytest.mark.slow
def test_code_evaluations_during_training_run_on_the_pod_and_match_one_process(data_dir, tmp_path):
  evals = [{"kind": "humaneval", "limit": 3, "max_new_tokens": 6, "batch_size": 4},
           {"kind": "fim", "limit": 4, "max_new_tokens": 4, "batch_size": 4}]
  reference, pod = tmp_path / "one_process", tmp_path / "two_processes"
  finish([start(write_config(tmp_path / "one.py", data_dir, reference, steps=2, evals=evals), 4)])
  outs = finish(start_pod(write_config(tmp_path / "two.py", data_dir, pod, steps=2, evals=evals), free_port()))
  assert "step 2: eval humaneval pass@1" in outs[0] and "step 2: eval fim exact_match" in outs[0]
  for name in ("humaneval.jsonl", "fim.jsonl"):  # the same completions, decoded with rows on both processes
    assert (pod / "eval" / "2" / name).read_text() == (reference / "eval" / "2" / name).read_text(), name


def test_ppl_during_training_in_a_multi_process_run_is_refused_before_it_starts(data_dir, tmp_path):
  from pretrain import config as config_lib
  from pretrain.train import evals

  experiment = config_lib.load_file(str(write_config(tmp_path / "c.py", data_dir, tmp_path / "run", evals=[
      {"kind": "ppl", "mixture": str(data_dir / "mixture.py")}])))
  train = config_lib.parse_experiment(experiment).train
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evals.jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"config.train.evals\[0\].kind: ppl runs in one process for now"):
      evals.check(train, tokenizer=None, model_config=None)


@pytest.mark.slow
def test_a_checkpoint_only_one_process_cannot_restore_is_moved_aside_and_both_resume_from_the_one_before(
    data_dir, tmp_path, reference):
  pod = tmp_path / "two_processes"
  config = write_config(tmp_path / "two.py", data_dir, pod)
  finish(start_pod(config, free_port()))
  # Process 1's data-iterator state of the last step is gone: process 0 alone could restore it.
  (pod / "checkpoints" / str(STEPS) / "data" / "process_1-of-2.json").unlink()
  outs = finish(start_pod(config, free_port()))
  assert f"moved the checkpoint of step {STEPS} to {pod / 'checkpoints_aside' / str(STEPS)}" in outs[0], outs[0]
  assert f"resumed from {pod / 'checkpoints'}/{STEPS - 2}" in outs[0], outs[0]
  assert complete_checkpoints(pod)[-1] == STEPS
  want, got = losses(reference), losses(pod)
  for step in want:
    assert got[step] == pytest.approx(want[step], abs=1e-5), step


@pytest.mark.slow
def test_a_process_whose_peer_dies_exits_with_an_error_instead_of_hanging(data_dir, tmp_path):
  workdir = tmp_path / "run"
  config = write_config(tmp_path / "config.py", data_dir, workdir)
  processes = start_pod(config, free_port(), peer_timeout=10)
  deadline = time.time() + 300
  while not complete_checkpoints(workdir) and time.time() < deadline and all(p.poll() is None for p in processes):
    time.sleep(0.02)
  processes[1].send_signal(signal.SIGKILL)
  processes[1].communicate()
  started = time.time()
  out, _ = processes[0].communicate(timeout=120)
  assert processes[0].returncode != 0, out
  assert time.time() - started < 90
  assert "another task died" in out  # JAX's coordination service: the peer stopped sending heartbeats
  assert complete_checkpoints(workdir), "the last good checkpoint is kept"


def test_the_process_group_comes_from_flags_then_environment_then_the_cluster():
  assert distributed.resolve(environ={}).source == "single"
  group = distributed.resolve("10.0.0.1:1234", 4, 3, environ={})
  assert (group.coordinator, group.num_processes, group.process_id, group.source) == ("10.0.0.1:1234", 4, 3, "flags")
  env = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "1"}
  assert distributed.resolve(environ=env) == distributed.ProcessGroup("h:1", 2, 1, "environment")
  assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}).source == "cluster"
  assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).source == "single"
  assert distributed.resolve("auto", environ={}).source == "cluster"
  with pytest.raises(ConfigError, match="--process_id"):
    distributed.resolve("h:1", 2, None, environ={})
  with pytest.raises(ConfigError, match="--process_id.*must be in \\[0, 2\\)"):
    distributed.resolve("h:1", 2, 2, environ={})
  with pytest.raises(ConfigError, match="--coordinator.*HOST:PORT"):
    distributed.resolve("localhost", 2, 0, environ={})
  with pytest.raises(ConfigError, match=distributed.ENV_NUM_PROCESSES):
    distributed.resolve(environ={distributed.ENV_NUM_PROCESSES: "two", distributed.ENV_PROCESS_ID: "0",
                                 distributed.ENV_COORDINATOR: "h:1"})


def test_a_partial_process_group_on_the_command_line_is_a_clear_error():
  out = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--coordinator=127.0.0.1:1", "--num_processes=2"],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2
  assert "--process_id" in out.stderr
