"""Causal attention on TPU: JAX's splash attention (a Pallas TPU kernel), packed documents by segment id.

Splash attention is FlashAttention for TPUs: queries and keys in blocks, an online
softmax, memory linear in the sequence, and blocks the mask rules out (here: the causal
upper triangle) never computed. Its own segment ids keep packed documents apart with the
same rule as `attention.dot_product_attention` (equal ids attend), and value heads may be
narrower than query/key heads (MLA's 192 vs 128). This module adapts our layout to it:

- [B, S, N, K] operands become the kernel's heads-major [N, S, K], one batch row at a time
  (vmap). Grouped-query attention (M < N key/value heads) runs the kernel's multi-query
  form on each key/value head's N/M query heads (vmap over M), so k and v are not repeated.
- q is scaled in its own dtype before the kernel, as the other implementations do.
- S is padded to a multiple of the block (the kernel needs whole blocks); padded keys sit
  after every real query, so causality hides them, and padded queries get a segment id of
  their own and are dropped.
- Under a device mesh (`sharding`, a ContextParallel whose sequence is not split) the
  kernel runs in a shard_map over the batch and head axes: a Pallas call has no automatic
  partitioning, and left to itself XLA would gather its operands onto every device.

Off TPU the kernel runs in Pallas' interpret mode: exact, and very slow; that is how the
tests check it on CPU. `attention.attend` picks it for `auto` on TPU only.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from pretrain.models.context_parallel import ContextParallel, dividing

LANE = 128  # TPU vector lane width: kernel blocks are multiples of it


def default_block(seq: int) -> int:
  """The kernel's q and kv block for S tokens: 512 (MaxText's default), else 256 or 128, whichever
  divides S rounded up to whole lanes (so padding never exceeds 127 positions)."""
  lanes = -(-seq // LANE) * LANE
  return next(b for b in (512, 256, LANE) if lanes % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(seq: int, heads: int, block: int, multi_query: bool, interpret: bool):
  """The splash kernel for causal attention over `seq` positions and `heads` query heads (cached:
  building its block-sparsity tables walks the whole mask)."""
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq)) for _ in range(heads)])
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  make = splash.make_splash_mqa if multi_query else splash.make_splash_mha
  return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, *, scale: float, segment_ids_BxS: jnp.ndarray | None = None,
                     sharding: ContextParallel | None = None, block: int | None = None,
                     interpret: bool | None = None) -> jnp.ndarray:
  """softmax(q k^T * scale + causal/document mask) v -> [B, S, N, V], by the splash kernel.

  Drop-in for `attention.dot_product_attention`. `interpret` defaults to "not on a TPU".
  """
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
    if interpret:
      _warn_interpret()
  local = functools.partial(_local_attention, scale=scale, block=block, interpret=interpret)
  if sharding is None or sharding.mesh.size == 1:
    return local(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, segment_ids_BxS)
  if sharding.ways > 1:
    raise ValueError("splash attention does not split the sequence; context parallelism runs ring attention")
  mesh = sharding.mesh
  rows = dividing(sharding.batch_axes, q_BxSxNxK.shape[0], mesh)
  heads = dividing(sharding.head_axes, math.gcd(q_BxSxNxK.shape[2], k_BxSxMxK.shape[2]), mesh)
  per_head = PartitionSpec(rows, None, heads, None)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(per_head, per_head, per_head, None if segment_ids_BxS is None else PartitionSpec(rows)),
                       out_specs=per_head, check_vma=False)(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, segment_ids_BxS)


def _local_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, segment_ids_BxS, *, scale, block, interpret):
  batch, seq, num_heads, _ = q_BxSxNxK.shape
  kv_heads = k_BxSxMxK.shape[2]
  group = num_heads // kv_heads
  block = block or default_block(seq)
  padded = -(-seq // block) * block
  if segment_ids_BxS is None:
    segment_ids_BxS = jnp.zeros((batch, seq), jnp.int32)
  if padded != seq:
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q_BxSxNxK, k_BxSxMxK, v_BxSxMxV = (jnp.pad(x, pad) for x in (q_BxSxNxK, k_BxSxMxK, v_BxSxMxV))
    # An id no real position has: padded queries attend to padded keys only (never an empty row).
    pad_id = jnp.max(segment_ids_BxS, axis=1, keepdims=True) + 1
    segment_ids_BxS = jnp.concatenate([segment_ids_BxS, jnp.broadcast_to(pad_id, (batch, padded - seq))], axis=1)
  segment_ids_BxS = segment_ids_BxS.astype(jnp.int32)
  q_BxSxNxK = q_BxSxNxK * jnp.asarray(scale, q_BxSxNxK.dtype)
  multi_query = group > 1
  kernel = _kernel(padded, group if multi_query else num_heads, block, multi_query, interpret)

  def one_row(q_NxSxK, k_MxSxK, v_MxSxV, seg_S):
    ids = splash.SegmentIds(q=seg_S, kv=seg_S)
    if not multi_query:
      return kernel(q_NxSxK, k_MxSxK, v_MxSxV, segment_ids=ids)
    q_MxGxSxK = q_NxSxK.reshape(kv_heads, group, padded, -1)  # query head n uses kv head n // G
    out_MxGxSxV = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_MxGxSxK, k_MxSxK, v_MxSxV)
    return out_MxGxSxV.reshape(num_heads, padded, -1)

  heads_major = lambda x: x.transpose(0, 2, 1, 3)
  out_BxNxSxV = jax.vmap(one_row)(heads_major(q_BxSxNxK), heads_major(k_BxSxMxK), heads_major(v_BxSxMxV),
                                  segment_ids_BxS)
  return heads_major(out_BxNxSxV)[:, :seq].astype(v_BxSxMxV.dtype)


@functools.cache
def _warn_interpret() -> None:
  logging.getLogger(__name__).warning(
      "splash attention off TPU runs in Pallas interpret mode: exact but very slow (tests only)")
