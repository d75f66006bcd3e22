"""Work directories and data on object storage, against local emulators (tests/object_storage.py; no network).

A `pretrain train` run whose work directory, prepared data and tokenizer are on `gs://bucket/...` or
`s3://bucket/...` trains, is SIGKILLed after a checkpoint has landed, resumes, and ends bit-identical
(losses and parameters) to an uninterrupted local run; `pretrain eval` then reads it from the bucket and
writes its report there. A bucket that does not exist, one that refuses access, and an s3:// work
directory with an Orbax that pretrain/orbax_s3.py cannot adapt are one clear error each. Markers,
metrics, prepared data and tokenizers work on gs:// and s3:// alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import object_storage
import pytest
from flax import nnx

from pretrain import config as config_lib
from pretrain import models, schema, storage
from pretrain.atomic_file import atomic_file
from pretrain.data import pipeline, workspace
from pretrain.models import presets
from pretrain.schema import ConfigError
from pretrain.train import checkpoint, metrics, optimizer, stages, step, trainer
from pretrain.train.workdir import complete_steps

STEPS = 12


def write_config(path: pathlib.Path, data_dir: pathlib.Path, workdir: str, *, data_root: str | None = None,
                 model: dict | None = None, stages: list | None = None, **train) -> pathlib.Path:
  """The default-style tiny run; `data_root`: where its prepared data and tokenizer are, if not in `data_dir`;
  `model` and `train`: another model, train settings changed; `stages`: a staged recipe's."""
  data_root = data_root or str(data_dir)
  experiment = {
      "model": model or schema.to_dict(presets.get("tiny-deepseek-v2", num_hidden_layers=2, vocab_size=512)),
      "data": {"mixture": str(data_dir / "mixture.py"), "prepared_dir": f"{data_root}/prepared",
               "tokenizer": f"{data_root}/tokenizer", "train_tokenizer_vocab_size": 512, "seq_len": 64,
               "global_batch_size": 4},
      "train": {"workdir": workdir, "steps": STEPS, "log_every": 1, "checkpoint_every": 2,
                "optimizer": {"peak_learning_rate": 1e-2, "warmup_steps": 2}} | train,
      "seed": 0,
  } | ({"stages": stages} if stages else {})
  path.write_text(f"import json\n\ndef get_config(arg=None):\n  return json.loads({json.dumps(experiment)!r})\n")
  return path


def start(config: pathlib.Path, **env: str) -> subprocess.Popen:
  """`pretrain train` in its own process; it inherits the emulators' environment (`env` added). Copies
  of a bucket's files go under the config's directory."""
  env = dict(os.environ, PRETRAIN_CACHE=str(config.parent / "cache"), **env)
  return subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", f"--config={config}"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def upload(directory: pathlib.Path, url: str) -> None:
  for file in directory.rglob("*"):
    if file.is_file():
      (storage.as_path(url) / file.relative_to(directory).as_posix()).write_bytes(file.read_bytes())


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
  out = process.communicate(timeout=timeout)[0]
  assert process.returncode == 0, out
  return out


def losses(workdir: str) -> dict[int, float]:
  """Loss by step; a step redone after a resume counts by its last record."""
  rows = [json.loads(line) for line in (storage.as_path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows}


def final_params(workdir: str, config: pathlib.Path) -> dict[str, np.ndarray]:
  """The parameters of the run's latest checkpoint, as host arrays by path."""
  exp = experiment_of(config)
  _, params = nnx.split(models.build_abstract(exp.model))
  tx = optimizer.make_optimizer(exp.train.optimizer, exp.train.steps, params)
  target = jax.eval_shape(lambda p: step.init_state(p, tx), params)
  saved = checkpoint.Checkpoints(workdir, exp.train)
  try:
    state = saved.restore(saved.latest_step(), target)
  finally:
    saved.close()
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def experiment_of(config: pathlib.Path):
  return config_lib.parse_experiment(config_lib.load_file(str(config)))


@pytest.fixture(scope="module")
def local_run(data_dir, tmp_path_factory) -> pathlib.Path:
  """The uninterrupted local run the bucket runs must equal (it prepares data_dir too): its work directory."""
  root = tmp_path_factory.mktemp("local_run")
  finish(start(write_config(root / "local.py", data_dir, str(root / "run"))))
  return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_a_run_all_in_a_bucket_is_killed_resumes_and_ends_bit_identical_to_a_local_run(data_dir, tmp_path, bucket,
                                                                                     request, local_run):
  bucket = request.getfixturevalue(bucket)
  local = local_run

  bucket_data = f"{bucket}/{tmp_path.name}/data"
  for name in ("prepared", "tokenizer"):
    upload(data_dir / name, f"{bucket_data}/{name}")
  bucket_run = f"{bucket}/{tmp_path.name}/run"
  config = write_config(tmp_path / "bucket.py", data_dir, bucket_run, data_root=bucket_data)
  process = start(config)
  deadline = time.time() + 300
  while not complete_steps(bucket_run) and time.time() < deadline and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  out = process.communicate()[0]
  saved = complete_steps(bucket_run)
  assert saved and saved[-1] < STEPS, f"the run was to be killed mid-run; checkpoints {saved}\n{out}"

  out = finish(start(config))
  assert f"resumed from {bucket_run}/checkpoints/{saved[-1]}" in out
  assert f"metrics in {bucket_run}/metrics.jsonl" in out
  assert f"reading the prepared data in {bucket_data}/prepared" in out
  assert complete_steps(bucket_run)[-1] == STEPS
  want, got = losses(str(local)), losses(bucket_run)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  assert got == want  # bit-identical, not approximately
  a, b = final_params(str(local), config), final_params(bucket_run, config)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  root = storage.as_path(bucket_run)
  assert json.loads((root / trainer.EXPERIMENT_FILE).read_text())["train"]["workdir"] == bucket_run
  assert list((root / "tensorboard").glob("events.out.tfevents.*"))

  # `pretrain eval` reads the run, its recorded gs:// tokenizer and a mixture from the bucket; the report goes
  # to the run's own eval/ there.
  (storage.as_path(bucket_data) / "mixture.py").write_text((data_dir / "mixture.py").read_text()
                                                           .replace("'inputs': ['", f"'inputs': ['{data_dir}/"))
  env = dict(os.environ, PRETRAIN_CACHE=str(tmp_path / "cache"))
  evaluation = subprocess.run([sys.executable, "-m", "pretrain.cli", "eval", "ppl", f"--checkpoint={bucket_run}",
                               f"--mixture={bucket_data}/mixture.py", "--max-documents=2", "--max-length=64"],
                              env=env, capture_output=True, text=True, timeout=300)
  assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
  report = json.loads((root / "eval" / "ppl.json").read_text())
  assert report["path"] == bucket_run and report["step"] == STEPS and report["kind"] == "workdir"


@pytest.mark.slow
def test_a_bucket_that_does_not_exist_is_one_clear_error(data_dir, tmp_path, gcs_bucket):
  url = "gs://no-such-bucket/run"
  process = start(write_config(tmp_path / "config.py", data_dir, url))
  out = process.communicate(timeout=300)[0]
  assert process.returncode == 2, out
  assert f"{url}: bucket gs://no-such-bucket does not exist" in out
  assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_a_bucket_that_refuses_access_is_one_clear_error(data_dir, tmp_path, scheme):
  # gs: the work directory; s3 (no work directory there): the tokenizer and prepared data.
  workdir, data_root = ("gs://locked/run", None) if scheme == "gs" else (str(tmp_path / "run"), "s3://locked/data")
  url = workdir if scheme == "gs" else f"{data_root}/tokenizer"
  with object_storage.refusing_server() as endpoint:
    env = storage.emulator_env(**{"gcs" if scheme == "gs" else "s3": endpoint})
    process = start(write_config(tmp_path / "config.py", data_dir, workdir, data_root=data_root), **env)
    out = process.communicate(timeout=300)[0]
  assert process.returncode == 2, out
  assert f"{url}: bucket {scheme}://locked cannot be reached or refuses access" in out
  assert "Traceback" not in out


def test_an_s3_work_directory_is_one_clear_error_when_orbax_cannot_be_taught_s3(data_dir, tmp_path, s3_bucket,
                                                                               monkeypatch):
  from pretrain import orbax_s3
  monkeypatch.setattr(orbax_s3, "unsupported_reason", lambda: "orbax-checkpoint 9.9 no longer has ...")
  experiment = experiment_of(write_config(tmp_path / "config.py", data_dir, f"{s3_bucket}/run"))
  with pytest.raises(ConfigError, match=r"config.train.workdir: s3://bucket/run: orbax-checkpoint 9.9 no longer"):
    trainer.train(experiment, log=lambda m: None)
  assert not storage.as_path(f"{s3_bucket}/run").exists()


def test_the_pinned_orbax_has_the_functions_the_s3_support_wraps():
  from pretrain import orbax_s3
  assert orbax_s3.unsupported_reason() is None


@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_atomic_file_on_a_bucket_writes_the_object_whole_or_not_at_all(bucket, request, tmp_path):
  root = storage.as_path(request.getfixturevalue(bucket)) / tmp_path.name
  with atomic_file(root / "DONE") as tmp:
    tmp.write_text("finished\n")
  assert (root / "DONE").read_text() == "finished\n"
  with pytest.raises(RuntimeError), atomic_file(root / "HALF") as tmp:
    tmp.write_text("half")
    raise RuntimeError("interrupted")
  assert not (root / "HALF").exists()
  assert sorted(p.name for p in root.iterdir()) == ["DONE"]


@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_metrics_on_a_bucket_are_uploaded_and_a_resumed_writer_appends(bucket, request, tmp_path):
  workdir = f"{request.getfixturevalue(bucket)}/{tmp_path.name}/run"
  for number in (1, 2):
    with metrics.MetricsWriter(workdir) as writer:
      writer.write(number, {"loss": 1.0 / number})
  lines = (storage.as_path(workdir) / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  assert len(list((storage.as_path(workdir) / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_a_staged_recipe_on_a_bucket_plans_its_stage_directories_there(gcs_bucket, tmp_path):
  root = f"{gcs_bucket}/{tmp_path.name}/recipe"
  experiment = config_lib.parse_experiment({
      "model": schema.to_dict(presets.get("tiny-deepseek-v2", num_hidden_layers=2, vocab_size=512)),
      "data": {"mixture": "m.py", "prepared_dir": "p", "tokenizer": "t", "seq_len": 64, "global_batch_size": 4},
      "train": {"workdir": root, "steps": 2},
      "stages": [{"name": "continue", "steps": 2}, {"name": "long", "steps": 2, "seq_len": 128}],
  })
  (first, _), (second, second_experiment) = stages.stage_experiments(experiment)
  assert str(first) == f"{root}/stages/0-continue" and str(second) == f"{root}/stages/1-long"
  assert second_experiment.train.workdir == str(second) and second_experiment.train.init_from == str(first)
  assert not checkpoint.has_checkpoints(first)


@pytest.mark.slow
def test_a_staged_recipe_runs_in_a_bucket_and_each_stage_starts_from_the_last_there(data_dir, tmp_path, s3_bucket):
  root = f"{s3_bucket}/{tmp_path.name}/recipe"
  yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
  config = write_config(tmp_path / "recipe.py", data_dir, root, steps=2, stages=[
      {"name": "continue", "steps": 2},
      {"name": "long", "steps": 2, "seq_len": 128, "global_batch_size": 2, "rope_scaling": yarn}])
  out = finish(start(config))
  first, second = f"{root}/stages/0-continue", f"{root}/stages/1-long"
  assert f"initialised parameters from {first}" in out, out
  for stage in (first, second):
    assert (storage.as_path(stage) / stages.DONE_FILE).exists()
    assert sorted(losses(stage)) == [1, 2]
  assert complete_steps(second) == [2]
  assert "finished earlier, skipped" in finish(start(config))  # a second run finds both stages done there


def test_local_paths_stay_local_and_expand_home(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert str(storage.as_path("~/runs/a")) == str(tmp_path / "runs" / "a")
  assert str(storage.as_path("runs/a")) == "runs/a" and not storage.is_url("runs/a")
  assert storage.is_url("gs://b/x") and storage.is_url("s3://b/x")
  storage.check_bucket(tmp_path / "anything", "config.train.workdir")  # a local path passes unchecked


def test_a_step_directory_on_a_bucket_without_its_commit_file_is_no_checkpoint(gcs_bucket, tmp_path):
  workdir = f"{gcs_bucket}/{tmp_path.name}/run"
  (storage.as_path(workdir) / "checkpoints" / "4" / "state" / "manifest.ocdbt").write_bytes(b"half a save")
  assert not checkpoint.has_checkpoints(workdir)  # killed mid-save: Orbax writes commit_success.txt last
  (storage.as_path(workdir) / "checkpoints" / "4" / "commit_success.txt").write_text("done")
  assert checkpoint.has_checkpoints(workdir)


@pytest.mark.slow
def test_prepared_data_and_a_tokenizer_on_s3_are_read_through_a_local_copy(data_dir, tmp_path, s3_bucket,
                                                                             monkeypatch):
  monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path / "cache"))
  local = experiment_of(write_config(tmp_path / "local.py", data_dir, str(tmp_path / "run"))).data
  _, local_tokenizer, local_manifest = workspace.ensure_prepared(local, log=lambda m: None)
  root = f"{s3_bucket}/{tmp_path.name}"
  for name in ("prepared", "tokenizer"):
    upload(data_dir / name, f"{root}/{name}")
  bucket = experiment_of(write_config(tmp_path / "bucket.py", data_dir, str(tmp_path / "run"), data_root=root)).data
  mixture, tokenizer, manifest = workspace.ensure_prepared(bucket, log=lambda m: None)
  assert manifest == local_manifest
  assert tokenizer.path.read_bytes() == local_tokenizer.path.read_bytes()
  assert tokenizer.path.is_relative_to(tmp_path / "cache")
  want = next(iter(pipeline.build(local, mixture, local_tokenizer, process_index=0, process_count=1)))
  got = next(iter(pipeline.build(bucket, mixture, tokenizer, process_index=0, process_count=1)))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  # A bucket directory without a manifest is prepared there, from the mixture's inputs.
  _, _, prepared_there = workspace.ensure_prepared(dataclasses.replace(bucket, prepared_dir=f"{root}/elsewhere"),
                                                   log=lambda m: None)
  assert {k: v for k, v in prepared_there.items() if k != "tokenizer"} == {
      k: v for k, v in local_manifest.items() if k != "tokenizer"}
  assert json.loads(storage.as_path(f"{root}/elsewhere/manifest.json").read_text()) == prepared_there
  with pytest.raises(ConfigError, match="config.data.prepared_dir: s3://no-such-bucket/prepared: bucket "
                     "s3://no-such-bucket does not exist"):
    workspace.ensure_prepared(dataclasses.replace(bucket, prepared_dir="s3://no-such-bucket/prepared"),
                              log=lambda m: None)
  with pytest.raises(ConfigError, match=f"config.data.tokenizer: {root}/none: no such object"):
    workspace.ensure_prepared(dataclasses.replace(bucket, tokenizer=f"{root}/none"), log=lambda m: None)
  with pytest.raises(ConfigError, match="s3://no-such-bucket/tokenizer: bucket s3://no-such-bucket does not exist"):
    workspace.ensure_prepared(dataclasses.replace(bucket, tokenizer="s3://no-such-bucket/tokenizer"),
                              log=lambda m: None)


@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_a_hugging_face_checkpoint_in_a_bucket_loads_by_byte_ranges_as_from_disk(bucket, request, tmp_path):
  from pretrain.convert import hf_import, hf_io, param_shapes, parity

  parity.random_hf_model("deepseek_v2").save_pretrained(tmp_path / "hf", max_shard_size="60KB")
  url = f"{request.getfixturevalue(bucket)}/{tmp_path.name}/hf"
  upload(tmp_path / "hf", url)
  config = hf_io.read_config(url)
  abstract = nnx.state(models.build_abstract(config), nnx.Param)
  placed = param_shapes.placed(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  from_bucket, stats = hf_import.load_hf_params(url, placed)
  from_disk, _ = hf_import.load_hf_params(tmp_path / "hf", placed)
  assert stats.bytes_read == stats.checkpoint_bytes  # one device holds everything: each byte once
  for (path, a), (_, b) in zip(param_shapes.flatten(nnx.to_pure_dict(from_bucket)),
                               param_shapes.flatten(nnx.to_pure_dict(from_disk)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.mark.slow
def test_a_run_starts_from_a_bucket_and_exports_into_one(data_dir, tmp_path, gcs_bucket, s3_bucket):
  """init_from a gs:// Hugging Face directory (learning rate 0 for the one step: the parameters stay as
  read), export_hf into the gs:// work directory, and `pretrain convert` of that run into s3://."""
  from pretrain import cli
  from pretrain.convert import hf_io, parity

  parity.random_hf_model("deepseek_v2", vocab_size=512).save_pretrained(tmp_path / "hf")
  source = f"{gcs_bucket}/{tmp_path.name}/hf"
  upload(tmp_path / "hf", source)
  run = f"{gcs_bucket}/{tmp_path.name}/run"
  config = write_config(tmp_path / "from_bucket.py", data_dir, run, model=schema.to_dict(hf_io.read_config(source)),
                        steps=1, init_from=source, export_hf=True, export_hf_dtype="float32",
                        optimizer={"peak_learning_rate": 1e-2, "warmup_steps": 1000})
  out = finish(start(config))
  assert f"initialised parameters from {source}" in out and f"exported {run}/hf/1" in out
  exported = parity.read_tensors(storage.download(f"{run}/hf/1", "test"))
  want = parity.read_tensors(tmp_path / "hf")
  assert sorted(exported) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(exported[name], want[name], err_msg=name)

  target = f"{s3_bucket}/{tmp_path.name}/export"
  assert cli.main(["convert", "--from-orbax", run, "--to-hf", target, "--dtype", "bfloat16"]) == 0
  again = parity.read_tensors(storage.download(target, "test"))
  assert all(np.array_equal(again[k], want[k].astype(again[k].dtype)) for k in want)
  files = sorted(p.name for p in storage.as_path(target).iterdir())
  assert cli.main(["convert", "--from-orbax", run, "--to-hf", target]) == 2  # not empty: refused, kept
  assert sorted(p.name for p in storage.as_path(target).iterdir()) == files
