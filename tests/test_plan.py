"""`pretrain plan` (pretrain/plan/: memory.py, mesh_search.py): the per-device memory estimate against
XLA's own accounting of the compiled train step, the remat, micro-batch and FLOPs arithmetic on
accelerators, mesh suggestions, and the command line.

What the XLA checks compare, per device: `plan.compiled.compiled_step_memory` lowers and compiles the
real step (the trainer's model, shardings and donated state) and reads `memory_analysis()`;
argument + output - alias + temp is the state and batch, the outputs not written over the donated
state (the metrics), and XLA's scratch buffer at its peak. The planner's `total` (parameters, Adam's
moments, batch, and the gradients and activations live at the step's peak) must be within 15% of it,
planned for the `cpu` platform (XLA:CPU hoists rematerialised forwards ahead of the backward pass, so
remat saves nothing there; the planner knows). The parameters, moments and batch alone must equal
XLA's argument bytes: that checks the sharding arithmetic exactly.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pretrain import cli, models
from pretrain import config as config_lib
from pretrain.models import param_count
from pretrain.plan import accelerators, compiled, memory, mesh_search
from pretrain.train import sharding

CPU = accelerators.Accelerator("cpu", 24 * 2**30, 1e11, "cpu")
TOLERANCE = 0.15
TWO_LAYER_DEEPSEEK = ["--config=configs/default.py", "--config.model.num_hidden_layers=2"]  # one dense, one MoE

XLA_SCRIPT = """
import dataclasses, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
from pretrain import config as config_lib
from pretrain.plan import accelerators, compiled, memory
from pretrain.train import sharding

cpu = accelerators.Accelerator("cpu", 24 * 2**30, 1e11, "cpu")
for flags in json.loads(sys.argv[1]):
  _, experiment = config_lib.load(flags)
  mesh = sharding.mesh_sizes(dataclasses.asdict(experiment.train.mesh), 8)
  plan = memory.plan(experiment, mesh, cpu)
  xla = compiled.compiled_step_memory(experiment)
  print(json.dumps({"flags": flags, "estimate": plan.total, "state": plan.params + plan.optimizer + plan.batch,
                    "xla": xla.total, "argument": xla.argument}), flush=True)
"""


def _plan_and_xla(flags):
  _, experiment = config_lib.load(flags)
  mesh = sharding.mesh_sizes(dataclasses.asdict(experiment.train.mesh), 1)
  return memory.plan(experiment, mesh, CPU), compiled.compiled_step_memory(experiment)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--config=configs/default.py:family=qwen2"],  # dense, remat none, one micro-batch
    TWO_LAYER_DEEPSEEK + ["--config.train.remat=block", "--config.train.microbatches=2"],  # MoE, block, two
], ids=["qwen2-none-micro1", "deepseek-block-micro2"])
def test_estimate_is_within_15_percent_of_the_compiled_step_on_one_device(flags):
  plan, xla = _plan_and_xla(flags)
  assert abs(plan.total / xla.total - 1) <= TOLERANCE, (plan, xla)
  # Parameters, moments, counters and the batch are the step's arguments, to the byte (bar the guard's scalars).
  assert abs(plan.params + plan.optimizer + plan.batch - xla.argument) <= 64, (plan, xla)


@pytest.mark.slow
def test_estimate_is_within_15_percent_of_the_compiled_step_on_eight_simulated_devices():
  meshes = [
      # Dense: batch over data, heads and MLP over tensor.
      ["--config=configs/default.py:family=qwen2", "--config.train.mesh.data=4", "--config.train.mesh.tensor=2"],
      # MoE with expert parallelism: each device holds one of 8 experts, tokens gathered over the group.
      TWO_LAYER_DEEPSEEK + ["--config.train.mesh.data=1", "--config.train.mesh.expert=8"],
  ]
  result = subprocess.run([sys.executable, "-c", XLA_SCRIPT, json.dumps(meshes)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(rows) == len(meshes)
  for row in rows:
    assert abs(row["estimate"] / row["xla"] - 1) <= TOLERANCE, row
    assert abs(row["state"] - row["argument"]) <= 64, row


def _tiny(*flags, remat="none", microbatches=1):
  _, experiment = config_lib.load(["--config=configs/default.py:family=qwen2", "--config.data.global_batch_size=32",
                                   f"--config.train.remat={remat}", f"--config.train.microbatches={microbatches}",
                                   *flags])
  return experiment


def test_parameters_moments_and_gradients_are_the_float32_parameter_count_split_by_the_mesh():
  experiment = _tiny()
  total = param_count.count(experiment.model).total
  one = memory.plan(experiment, {"data": 1}, accelerators.accelerator("h100"))
  assert one.params == 4 * total and one.optimizer - 2 * one.params < 1024
  # FSDP splits every matrix along `embed` (the norms, vectors, stay whole): close to 8x less.
  eight = memory.plan(experiment, {"fsdp": 8}, accelerators.accelerator("h100"))
  assert one.params / 8 <= eight.params < one.params / 7


def test_every_family_has_block_sizes_and_the_expert_axis_splits_only_routed_experts():
  assert models.SIZE_CLASSES.keys() == models.MODEL_CLASSES.keys()
  h100 = accelerators.accelerator("h100")
  for family in ("qwen2", "deepseek_v2"):
    _, experiment = config_lib.load([f"--config=configs/default.py:family={family}",
                                     "--config.data.global_batch_size=32"])
    sizes = models.block_sizes(experiment.model)
    routed = sizes.routed_experts
    assert (routed is not None) == (family == "deepseek_v2")
    assert any(sizes.is_moe_layer(i) for i in range(experiment.model.num_hidden_layers)) == (routed is not None)
    single, split = (memory.plan(experiment, mesh, h100) for mesh in ({"data": 4}, {"data": 4, "expert": 2}))
    if routed is None:  # nothing to split: the expert axis only replicates
      assert split.params == single.params
    else:  # the routed experts and the router's expert columns are halved, nothing else changes
      groups = param_count.count(experiment.model).by_group
      assert single.params - split.params == 4 * (groups["routed_experts"] + groups["router"]) // 2


def test_remat_on_an_accelerator_keeps_block_inputs_and_recomputes_one_block():
  h100 = accelerators.accelerator("h100")
  plans = {remat: memory.plan(_tiny(remat=remat), {"data": 1}, h100) for remat in ("none", "dots", "block")}
  assert plans["block"].activations < plans["dots"].activations < plans["none"].activations
  # The recomputed forward is hardware work, not model work: MFU is the utilisation scaled by their ratio.
  assert plans["none"].hardware_flops == plans["none"].model_flops and plans["none"].mfu == pytest.approx(0.4)
  block = plans["block"]
  assert block.model_flops < block.hardware_flops < 4 / 3 * block.model_flops
  assert block.mfu == pytest.approx(0.4 * block.model_flops / block.hardware_flops)
  assert block.step_seconds == pytest.approx(block.hardware_flops / (h100.peak_flops * 0.4))
  # XLA:CPU holds every block's residuals whatever the policy (measured above and in jax-ml/jax#19822).
  cpu = {remat: memory.plan(_tiny(remat=remat), {"data": 1}, CPU).activations for remat in ("none", "block")}
  assert cpu["block"] == cpu["none"]


def test_microbatches_trade_activations_for_a_gradient_accumulator():
  h100 = accelerators.accelerator("h100")
  one, four = (memory.plan(_tiny(microbatches=m), {"data": 1}, h100) for m in (1, 4))
  assert four.tokens_per_device == one.tokens_per_device // 4
  assert four.activations < one.activations
  assert four.model_flops == one.model_flops


@pytest.fixture(scope="module")
def lite_recipe():
  _, experiment = config_lib.load(["--config=configs/recipes/deepseek_coder_v2_lite.py"])
  return experiment


def test_suggest_finds_a_fitting_mesh_for_each_stage_of_the_lite_recipe(lite_recipe):
  v5p = accelerators.accelerator("v5p")
  for name, stage in memory.stages(lite_recipe):
    best = mesh_search.suggest(stage, 256, v5p, stage=name)
    assert best.fits and best.devices == 256 and best.stage == name
    # Its batch splits as the trainer needs, and no smaller micro-batch count fits on that mesh.
    rows = stage.data.global_batch_size // (best.mesh["data"] * best.mesh["fsdp"] * best.mesh["expert"])
    assert rows * best.mesh["data"] * best.mesh["fsdp"] * best.mesh["expert"] == stage.data.global_batch_size
    assert rows % best.microbatches == 0
    for fewer in (m for m in range(1, best.microbatches) if rows % m == 0):
      assert not memory.plan(mesh_search.with_microbatches(stage, fewer), best.mesh, v5p).fits


def test_cli_prints_a_table(capsys):
  assert cli.main(["plan", "--config=configs/default.py:family=qwen2", "--accelerator=v5e"]) == 0
  out = capsys.readouterr().out
  assert "TPU v5e" in out and "| stage | devices | mesh |" in out and "| yes |" in out


def test_cli_plans_each_stage_of_a_staged_recipe(capsys):
  flags = ["plan", "--config=configs/recipes/deepseek_coder_v2_lite.py", "--mesh=fsdp=4,expert=8,context=8",
           "--accelerator=v5p", "--json"]
  assert cli.main(flags) == 0
  plans = json.loads(capsys.readouterr().out)
  assert [p["stage"] for p in plans] == ["continued", "32k", "128k"]
  assert all(p["devices"] == 256 and p["mesh"]["context"] == 8 for p in plans)
  assert plans[1]["tokens_per_device"] == 1152 // 32 * 32768 // 8  # rows per device x a row's share


@pytest.mark.parametrize("flags, names", [
    (["--mesh=rows=8"], "--mesh"),
    (["--mesh=data=x"], "--mesh"),
    (["--mesh=data=3", "--devices=8"], "--mesh"),
    (["--accelerator=tpu-v9"], "--accelerator"),
    (["--devices=0"], "--devices"),
    (["--utilization=1.5"], "--utilization"),
    (["--mesh=data=3"], "config.data.global_batch_size"),  # 8 rows do not split 3 ways
])
def test_cli_bad_flags_exit_2_naming_the_flag(flags, names, capsys):
  assert cli.main(["plan", *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and names in err
