"""Consecutive blocks of one structure, stored stacked and run with `jax.lax.scan`.

A Python loop over the blocks would unroll into the compiled program, so compile time
would grow with depth; a scan compiles one block whatever the count. A stack holds one
`block` whose every parameter has a leading [count] axis (logical axis `layers`), so a
stacked parameter's path is ("layers", stack, "block", ...) with shape [count, ...].

The stacks are the runs of consecutive layers of one kind (dense or MoE, by
`config.is_moe_layer`): DeepSeek-V2's released configs give [dense x first_k_dense_replace,
MoE x the rest], Qwen2 one stack. With `moe_layer_freq` > 1 the runs are one or a few
layers long: still correct, it only compiles less well, nearer to one block per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"  # the logical axis name of a stacked parameter's leading axis


def runs(config) -> list[tuple[int, int]]:
  """(first layer, count) of each stack, in layer order."""
  out: list[tuple[int, int]] = []
  for i in range(config.num_hidden_layers):
    if out and config.is_moe_layer(i) == config.is_moe_layer(out[-1][0]):
      out[-1] = (out[-1][0], out[-1][1] + 1)
    else:
      out.append((i, 1))
  return out


def stack_slot(config, layer: int) -> tuple[int, int]:
  """Where layer `layer` lives: (its stack's index in model.layers, its slot along the stack's leading axis)."""
  for stack, (first, count) in enumerate(runs(config)):
    if first <= layer < first + count:
      return stack, layer - first
  raise IndexError(f"layer {layer} of a {config.num_hidden_layers}-layer model")


class BlockStack(nnx.Module):
  """Layers first_layer .. first_layer + count - 1, each built by `block_cls(config, layer, parallelism)`."""

  def __init__(self, config, block_cls, first_layer: int, count: int, parallelism, *, rngs: nnx.Rngs):
    self.first_layer = first_layer
    self.count = count

    # Built one by one and stacked, rather than under nnx.vmap: the same random init as unstacked
    # blocks, and eagerly no slower (vmap would dispatch, and compile, each initialiser op anew).
    blocks = [block_cls(config, first_layer + slot, parallelism, rngs=rngs) for slot in range(count)]
    graphdef, _ = nnx.split(blocks[0])
    state = jax.tree.map(lambda *values: jnp.stack(values), *(nnx.split(block)[1] for block in blocks))
    # `layers` in front of every parameter's logical axes: the trainer's axis rules place that axis too.
    self.block = nnx.merge(graphdef, nnx.spmd.add_axis(state, 0, {nnx.PARTITION_NAME: LAYER_AXIS}))

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS, *, policy: Callable,
               pin: Callable = lambda x: x):
    """Runs the blocks in order -> (x [B, S, D], each block's aux output stacked on a leading [count] axis).

    `policy` (a jax.checkpoint policy, causal_lm.REMAT_POLICIES) says what each block's forward pass
    keeps for the backward pass; `pin` is applied to the hidden states after every block.
    """
    graphdef, state = nnx.split(self.block)

    def body(x_BxSxD, layer_state):
      block = nnx.merge(graphdef, _drop_layer_axis(layer_state))
      x_BxSxD, aux = block(x_BxSxD, positions_BxS, segment_ids_BxS)
      return pin(x_BxSxD), aux

    # prevent_cse=False: a scan body is not merged with its rematerialised copy anyway.
    return jax.lax.scan(jax.checkpoint(body, policy=policy, prevent_cse=False), x_BxSxD, state)

  def prefill(self, x_BxSxD, positions_BxS, *, pin: Callable = lambda x: x):
    """The blocks' forward pass for generation -> (x [B, S, D], each block's decode cache entries of
    these tokens, stacked on a leading [count] axis: a tuple of [count, B, S, ...] arrays)."""
    graphdef, state = nnx.split(self.block)

    def body(x_BxSxD, layer_state):
      block = nnx.merge(graphdef, _drop_layer_axis(layer_state))
      x_BxSxD, _, entry = block.prefill(x_BxSxD, positions_BxS)
      return pin(x_BxSxD), entry

    return jax.lax.scan(body, x_BxSxD, state)

  def decode(self, x_Bx1xD, positions_Bx1, cache, *, pin: Callable = lambda x: x):
    """One token per row through the blocks, block i reading its slice of `cache` (a tuple of
    [count, B, T, ...] arrays) -> (x [B, 1, D], the token's cache entries [count, B, 1, ...]).

    The cache is scanned over as an input and left unchanged: the new entries come out small, and
    the caller writes them into the cache in place (generate/kv_cache.write).
    """
    graphdef, state = nnx.split(self.block)

    def body(x_Bx1xD, layer):
      layer_state, layer_cache = layer
      block = nnx.merge(graphdef, _drop_layer_axis(layer_state))
      x_Bx1xD, entry = block.decode(x_Bx1xD, positions_Bx1, layer_cache)
      return pin(x_Bx1xD), entry

    return jax.lax.scan(body, x_Bx1xD, (state, cache))

  def split(self) -> list[BlockStack]:
    """The stack as `count` stacks of one layer each, their parameters copied out (new buffers).

    For decoding on XLA:CPU: a scan reads each layer's weights as a dynamic slice of the stacked
    arrays, which XLA:CPU copies before every matmul (about 40% of a decode step of a 100M model);
    a one-layer stack's scan of one step is inlined by XLA and reads its buffers where they lie."""
    graphdef, state = nnx.split(self)
    out = []
    for slot in range(self.count):
      one = nnx.merge(graphdef, jax.tree.map(lambda value: value[slot:slot + 1], state))
      one.first_layer, one.count = self.first_layer + slot, 1
      out.append(one)
    return out

  def layer(self, slot: int) -> nnx.Module:
    """Layer first_layer + slot as a block of its own (unstacked parameters): for tests and
    reference computations; training runs the whole stack as one scan."""
    graphdef, state = nnx.split(self.block)
    return nnx.merge(graphdef, _drop_layer_axis(jax.tree.map(lambda value: value[slot], state)))


def _drop_layer_axis(state: nnx.State) -> nnx.State:
  """One layer's slice of a stack's state, its parameters' logical axes without the leading `layers`."""
  return nnx.spmd.remove_axis(state, 0, {nnx.PARTITION_NAME: LAYER_AXIS})
