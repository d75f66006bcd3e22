"""Causal dot-product attention over packed sequences.

`attend` picks the implementation (the model config's `attention_implementation`):
- `blockwise` (blockwise_attention.py): FlashAttention-2 in pure JAX, memory linear in
  the sequence, causal blocks skipped; runs anywhere.
- `splash` (splash_attention.py): JAX's Pallas splash attention kernel for TPUs.
- `cudnn` (cudnn_attention.py): cuDNN's fused flash attention on NVIDIA GPUs (bfloat16/float16).
- `reference`, below: the [S, T] scores in full; for tests and short CPU runs.
- `auto`: splash on TPU, cuDNN on a GPU where it supports the operands, else blockwise.
With the sequence split over the `context` mesh axis (the layer's `context_parallel`, from the
model's `Parallelism`), it is ring attention over the split (context_parallel.py), whatever the
implementation.

The reference path materialises the [S, T] score matrix per head, so its memory is
quadratic in the sequence. Scores and softmax run in float32 whatever the compute dtype.
Query/key and value head dims may differ (MLA: 192 vs 128), and key/value heads may be
fewer than query heads (GQA). Blockwise and splash match it within 1e-5 in float32; cuDNN
runs in bfloat16/float16 only.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp

from pretrain.models import blockwise_attention, cudnn_attention, splash_attention
from pretrain.models.config import AttentionImplementation
from pretrain.models import context_parallel as context_parallel_lib

IMPLEMENTATIONS = typing.get_args(AttentionImplementation)


def attend(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, *, scale: float, segment_ids_BxS: jnp.ndarray | None = None,
           implementation: str = "auto",
           context_parallel: context_parallel_lib.ContextParallel | None = None) -> jnp.ndarray:
  """Causal attention within packed documents -> [B, S, N, V], by the named implementation.

  `context_parallel` says how the mesh splits the operands (None on one device); when it splits
  the sequence, S is in its zigzag order (context_parallel.to_zigzag).
  """
  if context_parallel is not None and context_parallel.ways > 1:
    return context_parallel_lib.attention(context_parallel, q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale,
                                          segment_ids_BxS=segment_ids_BxS)
  implementation = resolve(implementation, q_BxSxNxK, v_BxSxMxV)
  if implementation == "blockwise":
    return blockwise_attention.blockwise_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale,
                                                   segment_ids_BxS=segment_ids_BxS)
  if implementation == "splash":
    return splash_attention.splash_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale,
                                             segment_ids_BxS=segment_ids_BxS, sharding=context_parallel)
  if implementation == "cudnn":
    return cudnn_attention.cudnn_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale,
                                           segment_ids_BxS=segment_ids_BxS)
  if implementation == "reference":
    return dot_product_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale, segment_ids_BxS=segment_ids_BxS)
  raise ValueError(f"unknown attention implementation {implementation!r}; allowed: {IMPLEMENTATIONS}")


def resolve(implementation: str, q_BxSxNxK, v_BxSxMxV) -> str:
  """The implementation `auto` stands for on this backend and these operands; others unchanged."""
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and cudnn_attention.unsupported_reason(q_BxSxNxK, v_BxSxMxV) is None:
    return "cudnn"
  return "blockwise"


def unavailable_reason(implementation: str, dtype, qk_dim: int, v_dim: int) -> str | None:
  """Why the named implementation cannot run here for a model with these head dims, or None.

  Checked by the trainer before anything runs (the kernels themselves would fail mid-trace); the
  config schema has already refused names outside IMPLEMENTATIONS.
  """
  if implementation == "cudnn":
    return cudnn_attention.unsupported_reason(jnp.zeros((1, 1, 1, qk_dim), dtype), jnp.zeros((1, 1, 1, v_dim), dtype))
  return None


def attention_mask(segment_ids_BxS: jnp.ndarray | None, seq_len: int, batch: int) -> jnp.ndarray:
  """[B, 1, S, S] bool: causal, and within one packed document when segment ids are given."""
  causal_SxS = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
  mask = jnp.broadcast_to(causal_SxS, (batch, 1, seq_len, seq_len))
  if segment_ids_BxS is not None:
    same_doc = segment_ids_BxS[:, None, :, None] == segment_ids_BxS[:, None, None, :]
    mask = mask & same_doc
  return mask


def dot_product_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, *, scale: float,
                          segment_ids_BxS: jnp.ndarray | None = None) -> jnp.ndarray:
  """softmax(q k^T * scale + mask) v -> [B, S, N, V]; N query heads share M = N/G key/value heads."""
  batch, seq, num_heads, _ = q_BxSxNxK.shape
  kv_heads = k_BxSxMxK.shape[2]
  group = num_heads // kv_heads
  rows = group * seq
  # Heads-major 4-D operands, a query head group's G*S rows stacked (R = G*S), make both products
  # plain batched matmuls over (B, M): on XLA:CPU the attention's backward pass runs ~1.4x faster
  # than with 5-D [B, S, M, G, K] einsums. q is scaled before the product (S*K, not S*T, work).
  q_BxMxRxK = (q_BxSxNxK * jnp.asarray(scale, q_BxSxNxK.dtype)).reshape(batch, seq, kv_heads, group, -1)
  q_BxMxRxK = q_BxMxRxK.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, rows, -1)
  k_BxMxTxK = k_BxSxMxK.transpose(0, 2, 1, 3)
  v_BxMxTxV = v_BxSxMxV.transpose(0, 2, 1, 3)
  scores_BxMxRxT = jnp.einsum("BMRK,BMTK->BMRT", q_BxMxRxK, k_BxMxTxK, preferred_element_type=jnp.float32)
  # An additive mask (0 or float32 min) rather than jnp.where: its gradient is the identity, so
  # the backward pass does not select through the mask again. Every row keeps its diagonal, so
  # no row is left without a finite score.
  mask_Bx1xSxT = attention_mask(segment_ids_BxS, seq, batch)
  bias_Bx1xRxT = jnp.tile(jnp.where(mask_Bx1xSxT, 0.0, jnp.finfo(jnp.float32).min), (1, 1, group, 1))
  probs_BxMxRxT = jax.nn.softmax(scores_BxMxRxT + bias_Bx1xRxT, axis=-1).astype(v_BxSxMxV.dtype)
  out_BxMxRxV = jnp.einsum("BMRT,BMTV->BMRV", probs_BxMxRxT, v_BxMxTxV, preferred_element_type=v_BxSxMxV.dtype)
  out_BxSxMxGxV = out_BxMxRxV.reshape(batch, kv_heads, group, seq, -1).transpose(0, 3, 1, 2, 4)
  return out_BxSxMxGxV.reshape(batch, seq, num_heads, -1)
