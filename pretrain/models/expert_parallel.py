"""Expert parallelism: each device computes only the routed experts it holds.

The experts' weights are split over the `expert_axes` of the mesh. Inside a
`shard_map`, each device all-gathers the tokens (and their routing) of the devices
that share its expert group, runs those tokens' assignments to its own experts
(dropless, `grouped_experts.routed_swiglu`; the other assignments are skipped), and
a reduce-scatter returns every token's sum over all experts to the device it came
from. This is the all-gather / reduce-scatter form of the token exchange (MaxText's
"ring of experts"): the same bytes as a dropless all-to-all, with static shapes and
no capacity factor. Each expert's hidden dimension may be split too (`mlp_axes`,
tensor parallelism inside the experts; partial sums added by a psum).

`sharding.expert_parallelism` makes it from the mesh and the axis rules, and `models.build`
gives it to every `RoutedExperts` (models/parallelism.py); without
it (one device, tests, conversion) the layer runs the same computation unsplit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pretrain.models import grouped_experts


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  mesh: Mesh
  token_axes: tuple[str, ...]  # mesh axes the tokens are split over: the batch's, then the sequence's
  expert_axes: tuple[str, ...]  # mesh axes the experts are split over
  mlp_axes: tuple[str, ...] = ()  # mesh axes each expert's hidden dimension is split over (none of token_axes)

  def __post_init__(self):
    if set(self.mlp_axes) & set(self.token_axes):
      raise ValueError(f"mlp_axes {self.mlp_axes} may not split the tokens too ({self.token_axes})")


def routed_swiglu(parallel: ExpertParallel, x_TxD, weights_TxK, experts_TxK, gate_ExDxF, up_ExDxF, down_ExFxD,
                  implementation: str) -> jnp.ndarray:
  """`grouped_experts.routed_swiglu` with the experts split across devices (tokens T split as the batch) -> [T, D]."""
  gathered = tuple(a for a in parallel.expert_axes if a in parallel.token_axes)
  # Partial outputs to add up: each expert shard's when the tokens are not split there, each hidden slice's.
  summed = tuple(a for a in parallel.expert_axes if a not in parallel.token_axes) + parallel.mlp_axes
  tokens = PartitionSpec(parallel.token_axes or None)
  experts = parallel.expert_axes or None
  mlp = parallel.mlp_axes or None

  def local(x_TxD, weights_TxK, experts_TxK, gate_ExDxF, up_ExDxF, down_ExFxD):
    if gathered:
      x_TxD, weights_TxK, experts_TxK = (jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                                         for a in (x_TxD, weights_TxK, experts_TxK))
    first_expert = _shard_index(parallel.mesh, parallel.expert_axes) * gate_ExDxF.shape[0]
    y_TxD = grouped_experts.routed_swiglu(x_TxD, weights_TxK, experts_TxK - first_expert, gate_ExDxF, up_ExDxF,
                                          down_ExFxD, implementation)
    if gathered:
      y_TxD = jax.lax.psum_scatter(y_TxD, gathered, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y_TxD, summed) if summed else y_TxD

  return jax.shard_map(
      local, mesh=parallel.mesh, out_specs=tokens, check_vma=False,
      in_specs=(tokens, tokens, tokens, PartitionSpec(experts, None, mlp), PartitionSpec(experts, None, mlp),
                PartitionSpec(experts, mlp, None)),
  )(x_TxD, weights_TxK, experts_TxK, gate_ExDxF, up_ExDxF, down_ExFxD)


def _shard_index(mesh: Mesh, axes: tuple[str, ...]) -> jnp.ndarray:
  """This device's position along `axes` taken together (the first axis major), as a sharded dim is laid out."""
  index = jnp.zeros((), jnp.int32)
  for axis in axes:
    index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
  return index
