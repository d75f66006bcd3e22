"""The decode cache: what every layer keeps of each token, allocated once per generation.

Per BlockStack a tuple of arrays [count, B, T, ...] (the stack's layers stacked, as its parameters
are), holding what its attention's `prefill` returns per token (the class's CACHE_AXES name the
per-token axes): Qwen2 the rotated key and the value of each of its M kv heads ([M, H] each);
DeepSeek-V2's MLA only the kv_lora_rank latent and the rotary key all heads share (L + R numbers:
576 for the released models, where full keys and values would take N * (192 + 128)).

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
  """The prompts' entries [count, B, S, ...] at indices 0..S-1 of a cache of `length` positions."""
  def padded(a):
    return jnp.pad(a, [(0, 0), (0, 0), (0, length - a.shape[2])] + [(0, 0)] * (a.ndim - 3))
  return [tuple(padded(a) for a in stack) for stack in entries]


def write(cache: Cache, entries: Cache, positions_B: jnp.ndarray) -> Cache:
  """Each row's new entries [count, B, 1, ...] written at its position; in place inside the decode loop."""
  rows_B = jnp.arange(positions_B.shape[0])
  return [tuple(a.at[:, rows_B, positions_B].set(e[:, :, 0]) for a, e in zip(stack, new, strict=True))
          for stack, new in zip(cache, entries, strict=True)]


def logical_axes(model) -> list[tuple[tuple[str | None, ...], ...]]:
  """Each cache array's logical axes: the stack's layers, the batch rows, the positions, then per token."""
  return [tuple((LAYER_AXIS, "batch", None) + per_token for per_token in stack.block.self_attn.CACHE_AXES)
          for stack in model.layers]


def constrain(cache: Cache, model, mesh: Mesh | None, rules) -> Cache:
  """The cache pinned to its place on the mesh: rows over the batch axes, kv heads over theirs where
  the mesh divides them (train/sharding.spec_for); unchanged on one device."""
  if mesh is None:
    return cache
  return [tuple(jax.lax.with_sharding_constraint(a, NamedSharding(mesh, sharding.spec_for(axes, a.shape, mesh, rules)))
                for a, axes in zip(stack, stack_axes, strict=True))
          for stack, stack_axes in zip(cache, logical_axes(model), strict=True)]


def numbers_per_token(cache: Cache) -> list[int]:
  """Per stack, the numbers one layer keeps of one token (e.g. kv_lora_rank + qk_rope_head_dim for MLA)."""
  return [sum(math.prod(a.shape[3:]) for a in stack) for stack in cache]


def bytes_per_token(cache: Cache) -> int:
  """Bytes the cache holds per token of one row, all layers together."""
  return sum(a.shape[0] * math.prod(a.shape[3:]) * a.dtype.itemsize for stack in cache for a in stack)
