"""Dropless routed-expert SwiGLU: sort the (token, expert) assignments by expert, run
each expert over its rows, put the rows back and combine them with the routing weights.

Two implementations of the same grouped computation; both do work proportional to
the routed rows (T*K), never to T*E:

- `ragged_dot`: `jax.lax.ragged_dot`, one grouped matmul per projection. Native and
  fast where XLA has a ragged-dot kernel (TPU). On CPU XLA lowers it to a masked
  product over all experts ([E, A, D] intermediates): E times the work and memory.
- `blocked`: rows are laid out so each expert's rows start on a block boundary
  (padding each group to a multiple of `block` rows), then a `lax.scan` over blocks
  runs each block through its one expert's weights. Padding costs at most E*(block-1)
  rows; blocks past the last used one are skipped.

`auto` picks `ragged_dot` on TPU and `blocked` elsewhere (measure GPUs: jaxlib versions
differ in how they lower ragged_dot there).
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp

from pretrain.models.config import MoeImplementation

IMPLEMENTATIONS = typing.get_args(MoeImplementation)


# Jitted on its own so an eager model call (tests, notebooks) compiles the sort/scan/unsort once per
# shape instead of dispatching each op; inside a jitted step it is simply inlined.
@functools.partial(jax.jit, static_argnames=("implementation",))
def routed_swiglu(x_TxD, weights_TxK, experts_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, implementation: str = "auto"):
  """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) -> [T, D].

  Assignments to an expert index outside [0, E) contribute nothing: under expert
  parallelism (expert_parallel.py) each device holds E of the experts and is given
  every assignment of its token group.
  """
  tokens, k = experts_TxK.shape
  num_experts = gate_ExDxF.shape[0]
  dtype = x_TxD.dtype
  # Sort by expert (others last) so each expert's rows are contiguous.
  here_TxK = (experts_TxK >= 0) & (experts_TxK < num_experts)
  flat_experts = jnp.where(here_TxK, experts_TxK, num_experts).reshape(-1)
  order = jnp.argsort(flat_experts, stable=True)
  x_AxD = jnp.take(x_TxD, order // k, axis=0)  # A = T*K assignments
  group_sizes_E = jnp.bincount(flat_experts, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  y_AxD = expert_swiglu(x_AxD, group_sizes_E, gate_ExDxF.astype(dtype), up_ExDxF.astype(dtype),
                        down_ExFxD.astype(dtype), implementation)
  # Back to (token, k) order; summing over k keeps a fixed, deterministic order.
  y_TxKxD = jnp.take(y_AxD, jnp.argsort(order), axis=0).reshape(tokens, k, -1)
  return jnp.einsum("TKD,TK->TD", y_TxKxD, weights_TxK.astype(dtype))


def expert_swiglu(x_AxD, group_sizes_E, gate_ExDxF, up_ExDxF, down_ExFxD, implementation: str = "auto"):
  """silu(x @ gate[e]) * (x @ up[e]) @ down[e] for each row x of expert e -> [A, D].

  Rows are grouped by expert in order; rows past sum(group_sizes) belong to no expert and come out 0.
  """
  if implementation == "auto":
    implementation = "ragged_dot" if jax.default_backend() == "tpu" else "blocked"
  if implementation == "ragged_dot":
    return _ragged_dot(x_AxD, group_sizes_E, gate_ExDxF, up_ExDxF, down_ExFxD)
  if implementation == "blocked":
    return _blocked(x_AxD, group_sizes_E, gate_ExDxF, up_ExDxF, down_ExFxD)
  raise ValueError(f"unknown grouped-experts implementation {implementation!r}; allowed: {IMPLEMENTATIONS}")


def _ragged_dot(x_AxD, group_sizes_E, gate_ExDxF, up_ExDxF, down_ExFxD):
  def grouped(lhs, w):
    return jax.lax.ragged_dot(lhs, w, group_sizes_E, preferred_element_type=lhs.dtype)

  return grouped(jax.nn.silu(grouped(x_AxD, gate_ExDxF)) * grouped(x_AxD, up_ExDxF), down_ExFxD)


def block_size(rows: int, experts: int) -> int:
  """A power of two, 8..128, near a quarter of the mean group: padding stays under ~25% of the rows."""
  target = max(rows // (4 * experts), 8)
  return min(1 << (target.bit_length() - 1), 128)


def _blocked(x_AxD, group_sizes_E, gate_ExDxF, up_ExDxF, down_ExFxD):
  rows, dim = x_AxD.shape
  experts = gate_ExDxF.shape[0]
  block = block_size(rows, experts)
  num_blocks = -(-(rows + experts * (block - 1)) // block)  # static bound on the padded layout

  # Where each expert's rows start, unpadded and padded to block multiples.
  padded_sizes_E = -(-group_sizes_E // block) * block
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  padded_end_E = jnp.cumsum(padded_sizes_E)
  padded_start_E = padded_end_E - padded_sizes_E
  expert_of_row_A = jnp.repeat(jnp.arange(experts), group_sizes_E, total_repeat_length=rows)
  padded_row_A = jnp.arange(rows) - start_E[expert_of_row_A] + padded_start_E[expert_of_row_A]
  # Rows of no expert get distinct indices past the end: dropped on the way in, read back as 0.
  padded_row_A = jnp.where(jnp.arange(rows) < group_sizes_E.sum(), padded_row_A, num_blocks * block + jnp.arange(rows))

  x_PxD = jnp.zeros((num_blocks * block, dim), x_AxD.dtype).at[padded_row_A].set(
      x_AxD, unique_indices=True, mode="drop")
  block_starts = jnp.arange(num_blocks) * block
  expert_of_block = jnp.minimum(jnp.searchsorted(padded_end_E, block_starts, side="right"), experts - 1)
  used_block = block_starts < padded_end_E[-1]
  y_NxBxD = _blocks_swiglu(x_PxD.reshape(num_blocks, block, dim), expert_of_block, used_block,
                           gate_ExDxF, up_ExDxF, down_ExFxD)
  return y_NxBxD.reshape(-1, dim).at[padded_row_A].get(mode="fill", fill_value=0)


# The backward pass is written out because autodiff of the scan would add a full-size
# [E, D, F] scatter of each block's weight gradient to the accumulator: E times the work
# per block. Here each block adds into its own expert's slice of the carry, in place.
@jax.custom_vjp
def _blocks_swiglu(x_NxBxD, expert_N, used_N, gate_ExDxF, up_ExDxF, down_ExFxD):
  def run_block(_, inputs):
    x_BxD, expert, used = inputs

    def mlp(x_BxD):
      h_BxF = jax.nn.silu(x_BxD @ gate_ExDxF[expert]) * (x_BxD @ up_ExDxF[expert])
      return h_BxF @ down_ExFxD[expert]

    return None, jax.lax.cond(used, mlp, jnp.zeros_like, x_BxD)

  return jax.lax.scan(run_block, None, (x_NxBxD, expert_N, used_N))[1]


def _blocks_swiglu_fwd(x_NxBxD, expert_N, used_N, gate_ExDxF, up_ExDxF, down_ExFxD):
  y = _blocks_swiglu(x_NxBxD, expert_N, used_N, gate_ExDxF, up_ExDxF, down_ExFxD)
  return y, (x_NxBxD, expert_N, used_N, gate_ExDxF, up_ExDxF, down_ExFxD)


def _blocks_swiglu_bwd(residuals, dy_NxBxD):
  x_NxBxD, expert_N, used_N, gate_ExDxF, up_ExDxF, down_ExFxD = residuals

  def run_block(grads, inputs):
    x_BxD, dy_BxD, expert, used = inputs

    def backward(grads):
      d_gate, d_up, d_down = grads
      g, u = x_BxD @ gate_ExDxF[expert], x_BxD @ up_ExDxF[expert]  # recomputed, not stored
      a = jax.nn.silu(g)
      dh_BxF = dy_BxD @ down_ExFxD[expert].T
      du_BxF = dh_BxF * a
      sig = jax.nn.sigmoid(g)
      dg_BxF = dh_BxF * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg
      dx_BxD = dg_BxF @ gate_ExDxF[expert].T + du_BxF @ up_ExDxF[expert].T
      d_gate = d_gate.at[expert].add(x_BxD.T @ dg_BxF)
      d_up = d_up.at[expert].add(x_BxD.T @ du_BxF)
      d_down = d_down.at[expert].add((a * u).T @ dy_BxD)
      return (d_gate, d_up, d_down), dx_BxD

    def skip(grads):
      return grads, jnp.zeros_like(x_BxD)

    return jax.lax.cond(used, backward, skip, grads)

  zeros = (jnp.zeros_like(gate_ExDxF), jnp.zeros_like(up_ExDxF), jnp.zeros_like(down_ExFxD))
  (d_gate, d_up, d_down), dx_NxBxD = jax.lax.scan(run_block, zeros, (x_NxBxD, dy_NxBxD, expert_N, used_N))
  return dx_NxBxD, None, None, d_gate, d_up, d_down


_blocks_swiglu.defvjp(_blocks_swiglu_fwd, _blocks_swiglu_bwd)
