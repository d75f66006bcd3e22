"""The device mesh, and where each parameter and batch array lives on it.

Models name their parameter axes logically (vocab, embed, heads, mlp, expert, ...);
`TrainConfig.axis_rules` maps each logical name to mesh axes. A dimension whose size
the mesh axes do not divide is replicated instead (a tiny vocab over 8 devices, say),
so one table serves every model size. Batch arrays are split by the `batch` rule (rows)
and `sequence` rule (the tokens of a row: context parallelism); `parallelism` says how the
layers that compute across devices (routed experts, attention) split their work, in the
plan `models.build` gives each of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from pretrain.models import context_parallel, expert_parallel, moe
from pretrain.models.parallelism import Parallelism
from pretrain.schema import ConfigError
from pretrain.train.config import MeshConfig

# Major to minor: the axes that communicate most often (context's ring, tensor, expert) on the nearest devices.
MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
AxisRules = Sequence[tuple[str, Sequence[str]]]


def mesh_sizes(sizes: Mapping[str, int], devices: int | None, key: str = "config.train.mesh") -> dict[str, int]:
  """Every axis's size (unnamed axes 1), a -1 axis taking the devices the others leave; with `devices`
  None (a plan with no device count) the -1 axis is one device wide."""
  sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ConfigError(f"{key}.{free[1]}", f"only one axis may be -1; {', '.join(free)} are")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"{key}.{axis}", f"must be positive or -1, got {size}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if devices is not None and (devices % fixed if free else devices != fixed):
    # Blame the axes set above 1 (the -1 axis only takes what they leave), the largest in the key.
    set_axes = {axis: size for axis, size in sizes.items() if size > 1}
    named = f"{key}.{max(set_axes, key=set_axes.get)}" if set_axes else key
    what = " x ".join(f"{axis}={size}" for axis, size in set_axes.items()) or "every axis at 1"
    need = f"a multiple of {fixed} devices" if free else f"{fixed} device{'s' if fixed > 1 else ''}"
    raise ConfigError(named, f"{what} needs {need}; {devices} available")
  if free:
    sizes[free[0]] = 1 if devices is None else devices // fixed
  return sizes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes({axis: getattr(config, axis) for axis in MESH_AXES}, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
  """A mesh of axis sizes only, no devices: what the capacity planner lays a run out on."""
  return AbstractMesh(tuple(int(sizes.get(axis, 1)) for axis in MESH_AXES), MESH_AXES)


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: AxisRules) -> PartitionSpec:
  """Mesh axes for each dimension; a mesh axis is used once, and only where it divides the dimension."""
  table = {name: tuple(axes) for name, axes in rules}
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape, strict=True):
    if name is not None and name not in table:
      raise ConfigError("config.train.axis_rules", f"no rule for logical axis {name!r}; rules exist for "
                        f"{', '.join(sorted(table))}")
    axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()  # the longest prefix of the rule's axes that divides this dimension
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def split_sizes(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh,
                rules: AxisRules) -> dict[str, int]:
  """The mesh axes (and their sizes) that split an array of these logical axes and shape."""
  return {a: mesh.shape[a] for entry in spec_for(logical_axes, shape, mesh, rules) for a in spec_axes(entry)}


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: AxisRules) -> nnx.State:
  """The parameters' nnx.State with each value replaced by its NamedSharding (from its axis names)."""

  def sharding(variable):
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return variable.replace(NamedSharding(mesh, spec_for(axes, variable.shape, mesh, rules)))

  return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_axes(mesh: Mesh, rules: AxisRules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (the 'batch' rule)."""
  return tuple(a for a in _rule(rules, "batch") if a in mesh.shape)


def sequence_axes(mesh: Mesh, rules: AxisRules) -> tuple[str, ...]:
  """The mesh axes (of more than one device) a row's tokens are split over (the 'sequence' rule)."""
  rows = batch_axes(mesh, rules)
  return tuple(a for a in _rule(rules, "sequence") if a in mesh.shape and mesh.shape[a] > 1 and a not in rows)


def context_ways(mesh: Mesh, rules: AxisRules) -> int:
  """Devices a row's tokens are split over: 1 without context parallelism."""
  return math.prod(mesh.shape[a] for a in sequence_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: AxisRules, ndim: int) -> NamedSharding:
  """Where a batch array lives: rows over the batch axes, and a [B, S] array's tokens over the sequence axes."""
  spec = (batch_axes(mesh, rules),) + ((sequence_axes(mesh, rules) or None,) if ndim > 1 else ())
  return NamedSharding(mesh, PartitionSpec(*spec))


def parallelism(model, mesh: Mesh, rules: AxisRules, remat: str = "none") -> Parallelism:
  """How this mesh and these rules split the work of `model` (a model config), for `models.build`."""
  if mesh.size == 1:
    return Parallelism(remat=remat)
  return Parallelism(remat=remat, activation_sharding=activation_sharding(mesh, rules),
                     attention=attention_parallelism(mesh, rules), experts=expert_parallelism(model, mesh, rules))


def activation_sharding(mesh: Mesh, rules: AxisRules) -> NamedSharding:
  """The [B, S, D] hidden states between blocks, pinned to the batch's layout (rows over the batch axes,
  tokens over the sequence axes, D whole). Left to itself, XLA propagates the fsdp-split weights'
  layout into the activations and then copies whole MLP intermediates and logits onto every device."""
  return batch_sharding(mesh, rules, 3)


def attention_parallelism(mesh: Mesh, rules: AxisRules) -> context_parallel.ContextParallel:
  """How the mesh splits attention's operands.

  Where the rules split the sequence, attention is ring attention and the trainer feeds rows
  in zigzag order (context_parallel.to_zigzag); otherwise a kernel that cannot be partitioned
  automatically (splash) runs in a shard_map over the batch and head axes.
  """
  seq = sequence_axes(mesh, rules)
  heads = tuple(a for a in _rule(rules, "heads")
                if a in mesh.shape and mesh.shape[a] > 1 and a not in seq + batch_axes(mesh, rules))
  return context_parallel.ContextParallel(mesh, batch_axes(mesh, rules), seq, heads)


def expert_parallelism(model, mesh: Mesh, rules: AxisRules) -> expert_parallel.ExpertParallel | None:
  """How the rules split the routed experts [E, D, F] over the mesh; None without routed experts or a split."""
  experts = getattr(model, "n_routed_experts", 0)
  if not experts:
    return None
  tokens, expert_axes, mlp_axes = expert_split((experts, model.hidden_size, model.moe_intermediate_size), mesh, rules)
  return expert_parallel.ExpertParallel(mesh, tokens, expert_axes, mlp_axes) if expert_axes else None


def expert_split(shape: tuple[int, int, int], mesh: Mesh | AbstractMesh,
                 rules: AxisRules) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """(token axes, expert axes, hidden axes) of routed experts of shape [E, D, F]: the axes the MoE layer's
  tokens are split over, those its experts are split over, and those an expert's hidden size is split over
  beyond the tokens' axes."""
  # The MoE layer flattens [B, S] to tokens B-major, so with a split sequence its tokens are split
  # over the batch axes, then the sequence axes.
  tokens = batch_axes(mesh, rules) + sequence_axes(mesh, rules)
  expert_spec, _, mlp_spec = spec_for(moe.ROUTED_EXPERT_AXES, shape, mesh, rules)
  return tokens, spec_axes(expert_spec), tuple(a for a in spec_axes(mlp_spec) if a not in tokens)


def _rule(rules: AxisRules, name: str) -> tuple[str, ...]:
  return {n: tuple(axes) for n, axes in rules}.get(name, ())


def spec_axes(spec_entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, an axis, or a tuple of axes)."""
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
