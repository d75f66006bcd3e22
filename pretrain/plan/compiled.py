"""What XLA says one training step needs per device: the real step, compiled, never run.

`compiled_step_memory(experiment)` builds the train step exactly as `trainer.train` does
(the same model, optimizer, state and batch shardings, the same `jax.jit` with the state
donated), lowers it on abstract arguments over this process's devices and compiles it.
Nothing is allocated and no data is read, so it works for any config whose mesh fits the
local devices (on CPU, simulate devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N).

It is the yardstick for `plan.memory`: the planner's per-device estimate is checked
against it (tests/test_plan.py, `pretrain plan --xla`).
"""

from __future__ import annotations

import dataclasses

from pretrain.config import ExperimentConfig
from pretrain.data import batch as batch_lib
from pretrain.schema import ConfigError
from pretrain.train import sharding, trainer


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
  trainer.check_batch_split(experiment, mesh)
  plan = trainer.plan_step(experiment, mesh)
  batch = batch_lib.abstract(data.global_batch_size, data.seq_len, plan.batch_sharding)
  train_step = trainer.jit_step(plan, cfg, num_components)
  stats = train_step.lower(plan.abstract_state, batch).compile().memory_analysis()
  return CompiledMemory(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
                        alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
