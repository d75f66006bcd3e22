"""Run safety (train/checkpoint.py, train/trainer.py): a damaged checkpoint falls back to the newest one
that restores, a full disk stops the run with one line and leaves the earlier checkpoints, Ctrl-C saves,
and a resumed run keeps the settings its experiment.json records.

The full-disk cases run the trainer on a small tmpfs mounted in a private mount namespace
(`unshare --user --map-root-user --mount`), so nothing is mounted on the machine itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from test_train import RUN_SCRIPT, experiment, experiment_dict, final_params

from pretrain import config as config_lib
from pretrain.schema import ConfigError
from pretrain.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train(config: dict) -> list[str]:
  """Runs the experiment in this process; returns what it logged."""
  lines = []
  trainer.train(config_lib.parse_experiment(config), log=lines.append)
  return lines


def _assert_same_params(a: pathlib.Path, b: pathlib.Path, exp) -> None:
  got, want = final_params(a, exp), final_params(b, exp)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated data file": lambda step: _largest_data_file(step).write_bytes(_largest_data_file(step).read_bytes()[:999]),
    "deleted data file": lambda step: _largest_data_file(step).unlink(),
    "deleted state metadata": lambda step: (step / "state" / "_METADATA").unlink(),
    "deleted data-iterator state": lambda step: next((step / "data").glob("process_0*.json")).unlink(),
}


@pytest.fixture(scope="module")
def six_steps(data_dir, tmp_path_factory) -> pathlib.Path:
  """A finished 6-step run with checkpoints 2, 4 and 6."""
  workdir = tmp_path_factory.mktemp("six") / "run"
  _train(experiment_dict(data_dir, workdir))
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    data_dir, six_steps, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(six_steps, workdir)
  DAMAGE[damage](workdir / "checkpoints" / "6")
  lines = _train(experiment_dict(data_dir, workdir))
  assert any(line.startswith(f"checkpoint {workdir / 'checkpoints' / '6'} does not restore: ") for line in lines), lines
  assert any(line.startswith(f"moved the checkpoint of step 6 to {workdir / 'checkpoints_aside' / '6'} (") and
             line.endswith("); resuming from an earlier step") for line in lines), lines
  assert f"resumed from {workdir / 'checkpoints'}/4" in lines
  assert (workdir / "checkpoints_aside" / "6" / "state").is_dir()  # moved, never deleted
  # Steps 5 and 6 trained again from checkpoint 4: the same parameters as the first time.
  _assert_same_params(workdir, six_steps, experiment(data_dir, workdir))


@pytest.mark.slow
def test_resume_step_picks_a_checkpoint_by_hand_and_nothing_restoring_is_an_error_naming_each_step(
    data_dir, six_steps, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(six_steps, workdir)
  lines = _train(experiment_dict(data_dir, workdir, resume_step=2))
  assert f"resumed from {workdir / 'checkpoints'}/2" in lines
  # The newer steps moved aside, and written again by this run: the same parameters.
  assert sorted(p.name for p in (workdir / "checkpoints_aside").iterdir()) == ["4", "6"]
  _assert_same_params(workdir, six_steps, experiment(data_dir, workdir))
  shutil.rmtree(workdir)
  shutil.copytree(six_steps, workdir)
  with pytest.raises(ConfigError, match=r"config.train.resume_step: .* has no checkpoint of step 3; it has \[2, 4, 6\]"):
    _train(experiment_dict(data_dir, workdir, resume_step=3))

  for step in (2, 4, 6):
    (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  with pytest.raises(ConfigError, match=r"config.train.workdir: no checkpoint in .* restores: step 6: .*; step 4: "
                     r".*; step 2: ") as e:
    _train(experiment_dict(data_dir, workdir))
  assert "\n" not in str(e.value)
  assert not (workdir / "checkpoints_aside").exists()  # when nothing restores, nothing is moved


@pytest.mark.slow
def test_a_changed_data_or_schedule_setting_is_refused_on_resume_unless_allowed_and_then_recorded(
    data_dir, six_steps, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(six_steps, workdir)
  changed_seq_len = experiment_dict(data_dir, workdir)
  changed_seq_len["data"]["seq_len"] = 32
  with pytest.raises(ConfigError, match=r"config.data.seq_len: 32 here, but .* was run with 64 .*allow_config_change"):
    _train(changed_seq_len)
  with pytest.raises(ConfigError, match=r"config.train.steps: 8 here, but .* was run with 6"):
    _train(experiment_dict(data_dir, workdir, steps=8))
  # How it computes and where things are may change: a resume with another log and checkpoint cadence runs.
  _train(experiment_dict(data_dir, workdir, log_every=3, checkpoint_every=3))

  lines = _train(experiment_dict(data_dir, workdir, steps=8, allow_config_change=True))
  assert "step 6: config.train.steps changed from 6 to 8 (allow_config_change; recorded in experiment.json)" in lines
  record = json.loads((workdir / "experiment.json").read_text())
  assert record["train"]["steps"] == 8
  assert record["changes"] == [{"key": "train.steps", "from": 6, "to": 8, "step": 6}]
  assert (workdir / "checkpoints" / "8").is_dir()


def _start(config: dict, tmp_path: pathlib.Path) -> subprocess.Popen:
  file = tmp_path / "run.json"
  file.write_text(json.dumps(config))
  return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(file)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_metrics(workdir: pathlib.Path, process: subprocess.Popen) -> None:
  deadline = time.time() + 120
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_zero_and_a_second_one_stops_at_once(data_dir, tmp_path):
  config = experiment_dict(data_dir, tmp_path / "run", steps=40, checkpoint_every=1000)
  process = _start(config, tmp_path)
  _wait_for_metrics(tmp_path / "run", process)
  process.send_signal(signal.SIGINT)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0, out
  assert "SIGINT: saving at the end of this step" in out and "SIGINT: saved step" in out
  assert "KeyboardInterrupt" not in out
  assert 0 < max(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) < 40

  # The second one, in this process (two signals sent to a busy process at once may arrive as one).
  before = signal.getsignal(signal.SIGINT)  # Python's default, unless a test before this one left another
  stop = trainer._StopOnSignal()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at the next bytecode; the sleep is cut short by it
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


# --- a full disk, on a tmpfs in a private mount namespace ------------------------------------------------

NAMESPACE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespaces_work() -> bool:
  try:
    return subprocess.run([*NAMESPACE, "true"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


needs_namespaces = pytest.mark.skipif(not shutil.which("unshare") or not _namespaces_work(),
                                      reason="needs unshare and user + mount namespaces, for a small tmpfs")

# Runs in the private namespace: mounts a tmpfs at argv[1], runs the scenario in argv[2] (a JSON list of
# actions), printing one JSON line per action with what happened, and copies the tmpfs to argv[4].
DRIVER = textwrap.dedent("""
    import json, os, random, shutil, signal, subprocess, sys, time
    mount, actions, run_script, copy_to = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]

    def used_bytes():
      stat = os.statvfs(mount)
      return (stat.f_blocks - stat.f_bfree) * stat.f_frsize

    def newest(directory):
      steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
      return max(steps, default=0)

    def set_size(size):
      subprocess.run(["mount", "-t", "tmpfs", "-o", f"remount,size={size}", "tmpfs", mount], check=True)

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", mount], check=True)
    rng = random.Random(0)
    for action in actions:
      kind, config = action["kind"], action.get("config")
      if kind == "disk":  # room for a fraction of one more checkpoint
        set_size(used_bytes() + int(action["free"]))
        print(json.dumps({"kind": kind}), flush=True)
        continue
      if kind == "damage":  # the newest checkpoint's largest data file, truncated
        step = newest(action["checkpoints"])
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(action["checkpoints"], str(step)))
                 for f in fs if os.path.basename(d) == "d"]
        os.truncate(max(files, key=os.path.getsize), 999)
        print(json.dumps({"kind": kind, "step": step}), flush=True)
        continue
      with open(action["config_file"], "w") as f:
        json.dump(config, f)
      process = subprocess.Popen([sys.executable, "-c", run_script, action["config_file"]], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
      if kind == "kill":  # once the run has saved a new checkpoint, at a random moment within `within` seconds
        before, deadline = newest(action["checkpoints"]), time.time() + 300
        while process.poll() is None and newest(action["checkpoints"]) == before and time.time() < deadline:
          time.sleep(0.02)
        time.sleep(rng.uniform(0.0, action["within"]))
        process.send_signal(signal.SIGKILL)
      out, _ = process.communicate(timeout=600)
      metrics = os.path.join(os.path.dirname(action["checkpoints"]), "metrics.jsonl")
      steps = [json.loads(line)["step"] for line in open(metrics)] if os.path.exists(metrics) else []
      print(json.dumps({"kind": kind, "returncode": process.returncode, "out": out, "logged": steps}), flush=True)
    shutil.copytree(mount, copy_to)  # the tmpfs goes with the namespace
""")


def _in_namespace(mount: pathlib.Path, actions: list[dict], copy_to: pathlib.Path) -> list[dict]:
  """Runs `actions` with `mount` a tmpfs; what it held is in `copy_to` afterwards."""
  mount.mkdir(parents=True, exist_ok=True)
  done = subprocess.run([*NAMESPACE, sys.executable, "-c", DRIVER, str(mount), json.dumps(actions), TRAIN_AND_FAIL,
                         str(copy_to)],
                        capture_output=True, text=True, timeout=1500)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


# As the command line runs it: a CheckpointSaveError is one line on stderr and exit 1 (cli.main).
TRAIN_AND_FAIL = """
import json, sys
from pretrain import config as config_lib
from pretrain.train import checkpoint, trainer
try:
  trainer.train(config_lib.parse_experiment(json.loads(open(sys.argv[1]).read())), log=lambda m: print(m, flush=True))
except checkpoint.CheckpointSaveError as e:
  print(f"pretrain train: stopped: {e}", flush=True)
  sys.exit(1)
"""


def _checkpoint_bytes(workdir: pathlib.Path) -> int:
  step = max((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  return sum(f.stat().st_size for f in step.rglob("*") if f.is_file())


@pytest.mark.slow
@needs_namespaces
def test_a_full_disk_stops_the_run_with_one_line_and_the_same_command_later_finishes_bit_identical(
    data_dir, six_steps, tmp_path):
  mount = tmp_path / "disk"
  workdir = mount / "run"
  one_checkpoint = _checkpoint_bytes(six_steps)
  common = {"config_file": str(tmp_path / "run.json"), "checkpoints": str(workdir / "checkpoints"),
            "config": experiment_dict(data_dir, workdir, keep_last=10)}
  results = _in_namespace(mount, [
      dict(common, kind="disk", free=one_checkpoint * 3 // 2 + 2**16),  # checkpoint 2 fits, 4 does not
      dict(common, kind="run"),
      dict(common, kind="disk", free=20 * one_checkpoint),
      dict(common, kind="run")], copy_to=tmp_path / "copy")
  full = results[1]
  assert full["returncode"] == 1, full["out"]
  stopped = [line for line in full["out"].splitlines() if line.startswith("pretrain train: stopped: ")]
  assert len(stopped) == 1, full["out"]
  assert f"checkpoint of step 4 in {workdir / 'checkpoints'} failed: No space left on device" in stopped[0]
  assert "MiB are free there" in stopped[0] and "checkpoints [2] are intact" in stopped[0]
  assert "Traceback" not in full["out"] and "Event loop is closed" not in full["out"], full["out"]
  assert max(full["logged"]) <= 5  # noticed in the steps after the save began, not at the next save (step 6)
  assert results[3]["returncode"] == 0, results[3]["out"]
  copy = tmp_path / "copy" / "run"
  assert not list((copy / "checkpoints").glob("*tmp*"))
  _assert_same_params(copy, six_steps, experiment(data_dir, copy))


@pytest.mark.slow
@needs_namespaces
def test_random_sigkills_a_damaged_checkpoint_and_a_full_disk_end_bit_identical(data_dir, tmp_path):
  """The default model (configs/default.py) for 40 steps, checkpointing every 2: three SIGKILLs at random
  moments, the newest checkpoint damaged, a full disk; then the same command to the end."""
  _, default = config_lib.load([f"--config={ROOT / 'configs' / 'default.py'}"])
  from pretrain import schema

  def config_for(workdir: pathlib.Path) -> dict:
    config = experiment_dict(data_dir, workdir, steps=40, checkpoint_every=2, keep_last=30)
    return dict(config, model=schema.to_dict(default.model))

  straight = tmp_path / "straight"
  trainer.train(config_lib.parse_experiment(config_for(straight)), log=lambda m: None)
  one_checkpoint = _checkpoint_bytes(straight)

  workdir = tmp_path / "disk" / "run"
  common = {"config_file": str(tmp_path / "run.json"), "checkpoints": str(workdir / "checkpoints"),
            "config": config_for(workdir)}
  results = _in_namespace(tmp_path / "disk", [
      dict(common, kind="kill", within=0.5), dict(common, kind="kill", within=0.5),
      dict(common, kind="kill", within=0.5), dict(common, kind="damage"),
      dict(common, kind="disk", free=one_checkpoint // 2), dict(common, kind="run"),
      dict(common, kind="disk", free=40 * one_checkpoint), dict(common, kind="run")], copy_to=tmp_path / "copy")
  kills, damage, full, last = results[:3], results[3], results[5], results[7]
  assert all(k["returncode"] == -signal.SIGKILL for k in kills), [k["out"][-500:] for k in kills]
  assert f"moved the checkpoint of step {damage['step']} to" in full["out"], full["out"]
  assert full["returncode"] == 1 and "No space left on device" in full["out"], full["out"]
  assert last["returncode"] == 0, last["out"]
  copy = tmp_path / "copy" / "run"
  _assert_same_params(copy, straight, config_lib.parse_experiment(config_for(copy)))


def _leave_a_failed_gather_unretrieved(message: str) -> None:
  """What a failed save's sibling writes do: their gather fails and nobody awaits it."""
  import asyncio
  import gc

  async def write():
    raise ValueError(message)

  async def main():
    gathered = asyncio.gather(write())
    await asyncio.sleep(0.01)
    del gathered

  loop = asyncio.new_event_loop()
  loop.run_until_complete(main())
  loop.close()
  gc.collect()


def test_unretrieved_write_errors_of_a_failed_save_are_dropped_and_other_asyncio_errors_still_show(caplog):
  from pretrain.train import checkpoint

  checkpoint._quiet_failed_save_noise()
  with caplog.at_level("ERROR", logger="asyncio"):
    _leave_a_failed_gather_unretrieved('RESOURCE_EXHAUSTED: Error writing "params.x/0.0" in OCDBT database')
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    _leave_a_failed_gather_unretrieved("something else went wrong")
    shown = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(shown) == 1 and "something else went wrong" in shown[0]
