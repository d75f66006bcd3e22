"""The decode cache: what every layer keeps of each token, allocated once per generation.

Per BlockStack a tuple of arrays [count, B, ..., T, F] (the stack's layers stacked, as its
parameters are), holding what its attention's `prefill` returns per token (the class's CACHE_AXES
name the per-token axes; the positions T come second to last, so that the decode step's dots read
the cache where it lies, without a transpose): Qwen2 the rotated key and the value of each of its
M kv heads ([count, B, M, T, H] each); DeepSeek-V2's MLA only the kv_lora_rank latent and the
rotary key all heads share ([count, B, T, L] and [count, B, T, R]: L + R numbers a token, 576 for
the released models, where full keys and values would take N * (192 + 128)).

A row's token at position p lives at index p, so rows of different prompt lengths need no offsets.
Indices past a row's position hold its prompt padding's entries or zeros; attention never reads them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from pretrain.models.block_stack import LAYER_AXIS
from pretrain.train import sharding

Cache = list[tuple[jax.Array, ...]]


def from_prefill(entries: Cache, length: int) -> Cache:
  """The prompts' entries [count, B, ..., S, F] at indices 0..S-1 of a cache of `length` positions."""
  def padded(a):
    return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, length - a.shape[-2]), (0, 0)])
  return [tuple(padded(a) for a in stack) for stack in entries]


def length(cache: Cache) -> int:
  """The positions T the cache holds."""
  return cache[0][0].shape[-2]


def split_layers(cache: Cache) -> Cache:
  """Each stack's [count, B, ..., T, F] arrays as `count` one-layer stacks [1, ...], in layer order:
  the cache of the model with its layers split (CausalLM.with_layers_split). Each layer's cache is
  then a buffer of its own, written in place and read where it lies (a scan would slice it)."""
  return [tuple(a[i:i + 1] for a in stack) for stack in cache for i in range(stack[0].shape[0])]


def write(cache: Cache, entries: Cache, positions_B: jnp.ndarray) -> Cache:
  """Each row's new entries [count, B, ..., 1, F] written at its position; in place inside the decode
  loop (row by row: a dynamic_update_slice of a loop-carried buffer is, on every backend)."""
  def write_row(row, cache):
    def put(a, e):
      start = (0, row) + (0,) * (a.ndim - 4) + (positions_B[row], 0)
      return jax.lax.dynamic_update_slice(a, jax.lax.dynamic_slice_in_dim(e, row, 1, axis=1), start)
    return [tuple(put(a, e) for a, e in zip(stack, new, strict=True))
            for stack, new in zip(cache, entries, strict=True)]
  return jax.lax.fori_loop(0, positions_B.shape[0], write_row, cache)


def logical_axes(model, *, layers_split: bool = False) -> list[tuple[tuple[str | None, ...], ...]]:
  """Each cache array's logical axes, per stack of `model` (per layer, `layers_split`): the stack's
  layers, the batch rows, then the per-token axes with the positions (never split) before the last."""
  return [tuple((LAYER_AXIS, "batch") + per_token[:-1] + (None,) + per_token[-1:]
                for per_token in stack.block.self_attn.CACHE_AXES)
          for stack in model.layers for _ in range(stack.count if layers_split else 1)]


def constrain(cache: Cache, model, mesh: Mesh | None, rules, *, layers_split: bool = False) -> Cache:
  """The cache pinned to its place on the mesh: rows over the batch axes, kv heads over theirs where
  the mesh divides them (train/sharding.spec_for); unchanged on one device."""
  if mesh is None:
    return cache
  return [tuple(jax.lax.with_sharding_constraint(a, NamedSharding(mesh, sharding.spec_for(axes, a.shape, mesh, rules)))
                for a, axes in zip(stack, stack_axes, strict=True))
          for stack, stack_axes in zip(cache, logical_axes(model, layers_split=layers_split), strict=True)]


def numbers_per_token(cache: Cache) -> list[int]:
  """Per stack, the numbers one layer keeps of one token (e.g. kv_lora_rank + qk_rope_head_dim for MLA)."""
  return [sum(math.prod(a.shape[2:]) // a.shape[-2] for a in stack) for stack in cache]


def bytes_per_token(cache: Cache) -> int:
  """Bytes the cache holds per token of one row, all layers together."""
  return sum(a.shape[0] * math.prod(a.shape[2:]) // a.shape[-2] * a.dtype.itemsize for stack in cache for a in stack)
