"""What XLA says one training step needs per device: the real step, compiled, never run.

`compiled_step_memory(experiment)` builds the train step exactly as `trainer.train` does
(the same model, optimizer, state and batch shardings, the same `jax.jit` with the state
donated), lowers it on abstract arguments over this process's devices and compiles it.
Nothing is allocated and no data is read, so it works for any config whose mesh fits the
local devices (on CPU, simulate devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N).

It is the yardstick for `memory_plan`: the planner's per-device estimate is checked
against it (tests/test_plan.py, `pretrain plan --xla`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain import models
from pretrain.config import ExperimentConfig
from pretrain.schema import ConfigError
from pretrain.train import optimizer, sharding, step, trainer

# The packed batch's fields and their dtypes (data/packing.py writes these; `component` is per row).
BATCH_FIELDS = (("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
                ("positions", jnp.int32), ("loss_mask", jnp.float32))


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """`Compiled.memory_analysis()` of the step, bytes per device."""

  argument: int  # the state and the batch
  output: int  # the new state and the metrics
  alias: int  # outputs written in place of donated arguments (the state)
  temp: int  # XLA's scratch buffer: activations, gradients, everything transient, at its peak

  @property
  def total(self) -> int:
    """What the step holds at once: its arguments, its outputs that do not reuse an argument, and its scratch."""
    return self.argument + self.output - self.alias + self.temp


def compiled_step_memory(experiment: ExperimentConfig, *, num_components: int = 1) -> CompiledMemory:
  """Per-device memory of the compiled train step for this experiment on the local devices."""
  cfg, data = experiment.train, experiment.data
  if cfg is None or data is None:
    raise ConfigError("config.train" if cfg is None else "config.data", "the train step needs this section")
  # The trainer's steps 1, 2 and 5 (trainer.py), without data, checkpoints or the loop.
  mesh = sharding.make_mesh(cfg.mesh)
  rows, seq = data.global_batch_size, data.seq_len
  ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, cfg.axis_rules)) * cfg.microbatches
  if rows % ways:
    raise ConfigError("config.data.global_batch_size", f"{rows} does not split into {ways} batch shards x microbatches")
  if seq % (2 * sharding.context_ways(mesh, cfg.axis_rules)):
    raise ConfigError("config.data.seq_len", f"{seq} does not split into the zigzag chunks of the context axis")
  abstract_model = models.build_abstract(experiment.model)
  abstract_model.remat = cfg.remat
  sharding.plan_model(abstract_model, mesh, cfg.axis_rules)
  graphdef, abstract_params = nnx.split(abstract_model)
  param_shardings = sharding.param_shardings(abstract_params, mesh, cfg.axis_rules)
  tx = optimizer.make_optimizer(cfg.optimizer, cfg.steps, abstract_params)
  unplaced_state = jax.eval_shape(lambda p: step.init_state(p, tx), abstract_params)
  # The trainer's own placement of the state (its private helper: the measurement must be the real layout).
  state_shardings = trainer._state_shardings(unplaced_state, abstract_params, param_shardings, mesh)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unplaced_state,
                                state_shardings)
  batch_sharding = {name: sharding.batch_sharding(mesh, cfg.axis_rules, 2) for name, _ in BATCH_FIELDS}
  batch_sharding["component"] = sharding.batch_sharding(mesh, cfg.axis_rules, 1)
  batch = {name: jax.ShapeDtypeStruct((rows, seq), dtype, sharding=batch_sharding[name]) for name, dtype in BATCH_FIELDS}
  batch["component"] = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch_sharding["component"])
  train_step = jax.jit(step.make_train_step(graphdef, tx, cfg, num_components),
                       in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                       donate_argnums=(0,))
  stats = train_step.lower(abstract_state, batch).compile().memory_analysis()
  return CompiledMemory(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
                        alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
