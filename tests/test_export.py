"""Export of any run back to Hugging Face format, streamed tensor by tensor.

A 2-process x 2-device run (tiny DeepSeek-V2 on fsdp x expert) exports its last step
cooperatively (`config.train.export_hf`); transformers loads the export without missing or
unexpected keys and its logits equal our model's. `pretrain convert --from-orbax` takes a
training work directory (latest step or `--step`), a staged recipe's root and a
`save_orbax` checkpoint; a bad source or destination is one clear error and leaves nothing.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_multihost import finish, free_port, start_pod, write_config

from pretrain import cli, convert, models
from pretrain.convert import export, param_shapes, parity
from pretrain.models import presets
from pretrain.train import checkpoint

pytest.importorskip("transformers")


def our_logits(workdir: pathlib.Path, ids: np.ndarray) -> np.ndarray:
  """Our model with the run's parameters (latest checkpoint), on one device."""
  config = export.resolve(workdir).config
  graphdef, abstract, rest = nnx.split(models.build_abstract(config), nnx.Param, ...)
  placed = param_shapes.placed(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  params = checkpoint.load_init_params(str(workdir), placed, read_window_bytes=1 << 20)
  return np.asarray(nnx.merge(graphdef, params, rest)(jnp.asarray(ids)))


@pytest.fixture(scope="module")
def pod_run(data_dir, tmp_path_factory):
  """A finished 2-process run on fsdp=2 x expert=2 that exported its last step in float32."""
  root = tmp_path_factory.mktemp("pod")
  config = write_config(root / "config.py", data_dir, root / "run", steps=4, checkpoint_every=2,
                        mesh={"fsdp": 2, "expert": 2}, export_hf=True, export_hf_dtype="float32")
  outs = finish(start_pod(config, free_port()))
  return root / "run", outs


@pytest.mark.slow
def test_a_two_process_run_exports_what_transformers_loads_with_our_logits(pod_run):
  workdir, outs = pod_run
  out = workdir / "hf" / "4"
  assert f"step 4: exported {out}" in outs[0]
  assert sorted(p.name for p in (workdir / "hf").iterdir()) == ["4"]  # no partial directory left
  hf_model = parity.reload_hf(out)  # raises on missing, unexpected or mismatched keys
  ids = parity.input_ids(hf_model.config.vocab_size, 24)
  diff = np.abs(parity.hf_logits(hf_model, ids) - our_logits(workdir, ids)).max()
  assert diff <= 1e-5, diff


@pytest.mark.slow
def test_a_two_process_run_starts_from_a_hugging_face_directory(pod_run, data_dir, tmp_path):
  """init_from the export on 2 processes x 2 devices: each process reads only its shards; a first step at
  learning rate 0 (warmup from 0) keeps the parameters, which then equal the export bit for bit."""
  workdir, _ = pod_run
  config = write_config(tmp_path / "config.py", data_dir, tmp_path / "run", steps=1, mesh={"fsdp": 2, "expert": 2},
                        init_from=str(workdir / "hf" / "4"), export_hf=True, export_hf_dtype="float32",
                        optimizer={"peak_learning_rate": 1e-2, "warmup_steps": 1000})
  outs = finish(start_pod(config, free_port()))
  assert f"initialised parameters from {workdir / 'hf' / '4'}" in outs[0]
  read = [line for line in outs[0].splitlines() if line.startswith("read ")]
  assert read, outs[0]
  want, got = parity.read_tensors(workdir / "hf" / "4"), parity.read_tensors(tmp_path / "run" / "hf" / "1")
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_convert_takes_a_work_directory_its_steps_and_a_model_checkpoint(pod_run, tmp_path):
  workdir, _ = pod_run
  assert cli.main(["convert", "--from-orbax", str(workdir), "--to-hf", str(tmp_path / "latest")]) == 0
  assert cli.main(["convert", "--from-orbax", str(workdir), "--step", "2", "--to-hf", str(tmp_path / "two"),
                   "--dtype", "bfloat16"]) == 0
  latest, two = parity.read_tensors(tmp_path / "latest"), parity.read_tensors(tmp_path / "two")
  assert sorted(latest) == sorted(two) and all(t.dtype == np.float32 for t in latest.values())
  assert {str(t.dtype) for t in two.values()} == {"bfloat16"}
  assert json.loads((tmp_path / "two" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  np.testing.assert_array_equal(latest["model.norm.weight"],
                                parity.read_tensors(workdir / "hf" / "4")["model.norm.weight"])
  assert any(not np.array_equal(latest[k].astype(np.float32), two[k].astype(np.float32)) for k in latest)

  assert cli.main(["convert", "--from-orbax", str(workdir), "--step", "2", "--to-hf", str(tmp_path / "two32")]) == 0
  two32 = parity.read_tensors(tmp_path / "two32")
  assert all(np.array_equal(two[k], two32[k].astype(two[k].dtype)) for k in two)  # bfloat16: a cast, nothing else

  model = convert.load_hf(tmp_path / "latest")
  convert.save_orbax(model, tmp_path / "orbax")
  assert cli.main(["convert", "--from-orbax", str(tmp_path / "orbax"), "--to-hf", str(tmp_path / "again")]) == 0
  again = parity.read_tensors(tmp_path / "again")
  assert all(np.array_equal(again[k], latest[k]) for k in latest)


@pytest.mark.slow
def test_a_staged_recipe_exports_its_latest_finished_stage(pod_run, tmp_path):
  workdir, _ = pod_run
  root = tmp_path / "recipe"
  (root / "stages").mkdir(parents=True)
  (root / "stages" / "0-first").symlink_to(workdir)
  (workdir / "STAGE_DONE").write_text("{}\n")
  try:
    (root / "stages" / "1-second").mkdir()  # started, not finished
    export.export_hf(root, tmp_path / "out")
  finally:
    (workdir / "STAGE_DONE").unlink()
  want = parity.read_tensors(workdir / "hf" / "4")
  got = parity.read_tensors(tmp_path / "out")
  assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_export_refusals_name_the_problem_and_leave_nothing(pod_run, tmp_path, capsys):
  workdir, _ = pod_run
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  cases = [
      (["--from-orbax", str(workdir), "--to-hf", str(tmp_path / "full")], "full: already exists"),
      (["--from-orbax", str(workdir), "--step", "3", "--to-hf", str(tmp_path / "a")], "no checkpoint of step 3"),
      (["--from-orbax", str(tmp_path), "--to-hf", str(tmp_path / "b")], "is neither a Hugging Face directory"),
      (["--from-orbax", str(workdir), "--to-hf", str(tmp_path / "c"), "--dtype", "int8"], "int8"),
  ]
  for args, message in cases:
    code = cli.main(["convert", *args]) if "int8" not in args else None
    if code is None:  # argparse refuses the choice itself
      with pytest.raises(SystemExit):
        cli.main(["convert", *args])
      continue
    assert code == 2, args
    assert message in capsys.readouterr().err, args
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_damaged_checkpoint_array_is_named(tmp_path):
  model = models.build(presets.get("tiny-qwen2"), seed=0)
  convert.save_orbax(model, tmp_path / "orbax")
  for file in (tmp_path / "orbax" / "params").rglob("*"):
    if file.is_file() and file.parent.name == "d":
      file.write_bytes(b"")  # every data file emptied
  with pytest.raises(convert.ConversionError, match=r"orbax/params: cannot read .*Error reading \"[\w.]+/\.zarray\"") as error:
    export.export_hf(tmp_path / "orbax", tmp_path / "out")
  assert len(str(error.value)) < 600  # tensorstore's JSON spec cut off
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
