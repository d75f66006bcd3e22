"""Causal dot-product attention over packed sequences.

The reference path: it materialises the [S, T] score matrix per head, so its memory
is quadratic in the sequence; fine for tests and short CPU runs. Scores and softmax
run in float32 whatever the compute dtype. Query/key and value head dims may differ
(MLA: 192 vs 128), and key/value heads may be fewer than query heads (GQA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
  q_BxSxMxGxK = q_BxSxNxK.reshape(batch, seq, kv_heads, group, -1)
  scores = jnp.einsum("BSMGK,BTMK->BMGST", q_BxSxMxGxK, k_BxSxMxK, preferred_element_type=jnp.float32)
  scores = scores * scale
  mask_Bx1x1xSxT = attention_mask(segment_ids_BxS, seq, batch)[:, :, None]
  scores = jnp.where(mask_Bx1x1xSxT, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxMxV.dtype)
  out_BxSxMxGxV = jnp.einsum("BMGST,BTMV->BSMGV", probs, v_BxSxMxV, preferred_element_type=v_BxSxMxV.dtype)
  return out_BxSxMxGxV.reshape(batch, seq, num_heads, -1)
