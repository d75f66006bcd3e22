"""`pretrain plan --devices=N`: a mesh and micro-batch count that fit, chosen from `plan.memory` plans.

`suggest` tries every way to split N devices over the mesh axes (sharding.MESH_AXES, in
order), skipping splits the axis rules would only replicate over (a tensor axis that does
not divide the heads, an expert axis on a dense model or one that does not divide the
experts, tensor groups larger than the accelerator's fast domain) and those the batch does
not split over. For each it takes the fewest micro-batches that fit. Of the fitting plans it
returns the one whose devices send the fewest bytes per step, then the smallest; if none
fits, the one that needs the least memory, so the table shows how far off it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from pretrain import models
from pretrain.config import ExperimentConfig
from pretrain.models.config import ModelConfig
from pretrain.plan import memory
from pretrain.plan.accelerators import Accelerator
from pretrain.plan.memory import Plan
from pretrain.schema import ConfigError
from pretrain.train import sharding


def suggest(experiment: ExperimentConfig, devices: int, accel: Accelerator, *, utilization: float = 0.4,
            stage: str = "") -> Plan:
  """The fitting (mesh, micro-batches) on `devices` chips that moves the fewest bytes; if none fits, the
  one that needs the least memory."""
  cfg, data = experiment.train, experiment.data
  if cfg is None or data is None:
    raise ConfigError("config.train" if cfg is None else "config.data", "planning a run needs this section")
  if not 0 < utilization <= 1:
    raise ConfigError("--utilization", f"must be in (0, 1], got {utilization}")
  best = None
  for mesh in _factorisations(devices, sharding.MESH_AXES):
    if not _worth_trying(experiment.model, mesh) or mesh.get("tensor", 1) > (accel.max_tensor or devices):
      continue
    batch_ways = math.prod(mesh[a] for a in sharding.batch_axes(sharding.abstract_mesh(mesh), cfg.axis_rules))
    if data.global_batch_size % batch_ways:
      continue
    rows = data.global_batch_size // batch_ways
    candidate = None
    for micro in (m for m in range(1, rows + 1) if rows % m == 0):
      try:
        candidate = memory.plan(with_microbatches(experiment, micro), mesh, accel, utilization=utilization,
                                     stage=stage)
      except ConfigError:  # this mesh cannot lay the batch out (e.g. the context chunks)
        break
      if candidate.fits:
        break
    if candidate is not None and (best is None or _better(candidate, best)):
      best = candidate
  if best is None:
    raise ConfigError("--devices", f"no mesh of {devices} devices splits global_batch_size={data.global_batch_size} "
                      f"and seq_len={data.seq_len}")
  return best


def _better(a: Plan, b: Plan) -> bool:
  if a.fits != b.fits:
    return a.fits
  if a.fits:
    return (a.comm_bytes, a.total) < (b.comm_bytes, b.total)
  return a.total < b.total


def _worth_trying(model: ModelConfig, mesh: dict[str, int]) -> bool:
  """Skips meshes the rules would only replicate over: they change nothing but the communication."""
  if mesh.get("tensor", 1) > 1 and model.num_attention_heads % mesh["tensor"]:
    return False
  if mesh.get("expert", 1) > 1:
    routed = models.block_sizes(model).routed_experts
    return routed is not None and routed.count % mesh["expert"] == 0
  return True


def _factorisations(n: int, axes: Sequence[str]):
  """Every way to write n as a product of one size per axis, in order."""
  if len(axes) == 1:
    yield {axes[0]: n}
    return
  for size in (d for d in range(1, n + 1) if n % d == 0):
    for rest in _factorisations(n // size, axes[1:]):
      yield {axes[0]: size, **rest}


def with_microbatches(experiment: ExperimentConfig, microbatches: int) -> ExperimentConfig:
  """The experiment with its global batch split into this many sequential micro-batches."""
  return dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, microbatches=microbatches))
