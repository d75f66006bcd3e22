"""Qwen2 dense decoder: grouped-query attention with q/k/v bias, SwiGLU, RMSNorm, RoPE."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pretrain.models import attention, layers, rope
from pretrain.models.causal_lm import CausalLM
from pretrain.models.config import Qwen2Config
from pretrain.models.context_parallel import ContextParallel
from pretrain.models.parallelism import Parallelism


class Qwen2Attention(nnx.Module):
  # What a decode cache keeps per token (logical axes of each array's per-token part): the rotated
  # key and the value of each of the M kv heads, cached as [B, M, T, H] (kv_cache.py).
  CACHE_AXES = (("kv_heads", "head_dim"), ("kv_heads", "head_dim"))

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, context_parallel: ContextParallel | None = None):
    d, n, m, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    std = config.initializer_range
    self.q_proj = layers.param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std)
    self.k_proj = layers.param(rngs, (d, m, h), ("embed", "kv_heads", "head_dim"), std)
    self.v_proj = layers.param(rngs, (d, m, h), ("embed", "kv_heads", "head_dim"), std)
    self.q_bias = layers.zeros((n, h), ("heads", "head_dim"))
    self.k_bias = layers.zeros((m, h), ("kv_heads", "head_dim"))
    self.v_bias = layers.zeros((m, h), ("kv_heads", "head_dim"))
    self.o_proj = layers.param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std)
    self.config = config
    self.context_parallel = context_parallel  # how the mesh splits attention (None: one device)

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    return self.prefill(x_BxSxD, positions_BxS, segment_ids_BxS)[0]

  def prefill(self, x_BxSxD, positions_BxS, segment_ids_BxS=None):
    """The forward pass -> (output [B, S, D], what a decode cache keeps of these tokens: k, v [B, M, S, H])."""
    q_BxSxNxH, k_BxSxMxH, v_BxSxMxH = self._qkv(x_BxSxD, positions_BxS)
    out_BxSxNxH = attention.attend(q_BxSxNxH, k_BxSxMxH, v_BxSxMxH, scale=self.config.head_dim**-0.5,
                                   segment_ids_BxS=segment_ids_BxS,
                                   implementation=self.config.attention_implementation,
                                   context_parallel=self.context_parallel)
    out_BxSxD = layers.einsum("BSNH,NHD->BSD", out_BxSxNxH, self.o_proj, x_BxSxD.dtype)
    return out_BxSxD, (k_BxSxMxH.transpose(0, 2, 1, 3), v_BxSxMxH.transpose(0, 2, 1, 3))

  def decode(self, x_Bx1xD, positions_Bx1, cache):
    """One new token per row, at its row's position, attending to the row's cached keys before that
    position and to itself -> (output [B, 1, D], its k, v [B, M, 1, H] for the cache).

    `cache`: this layer's (k, v) [B, M, T, H]; indices at or past a row's position are not read.
    """
    k_cache_BxMxTxH, v_cache_BxMxTxH = cache
    q_Bx1xNxH, k_Bx1xMxH, v_Bx1xMxH = self._qkv(x_Bx1xD, positions_Bx1)
    batch, _, num_heads, head_dim = q_Bx1xNxH.shape
    kv_heads = k_Bx1xMxH.shape[2]
    # Query head n reads kv head n // G, as in attention.dot_product_attention.
    q_BxMxGxH = (q_Bx1xNxH * jnp.asarray(head_dim**-0.5, q_Bx1xNxH.dtype)).reshape(
        batch, kv_heads, num_heads // kv_heads, head_dim)
    scores_BxMxGxT = jnp.einsum("BMGH,BMTH->BMGT", q_BxMxGxH, k_cache_BxMxTxH, preferred_element_type=jnp.float32)
    self_BxMxG = jnp.einsum("BMGH,BMH->BMG", q_BxMxGxH, k_Bx1xMxH[:, 0], preferred_element_type=jnp.float32)
    valid_BxT = jnp.arange(k_cache_BxMxTxH.shape[2]) < positions_Bx1
    probs_BxMxGxT, probs_BxMxG = layers.decode_softmax(scores_BxMxGxT, self_BxMxG, valid_BxT[:, None, None])
    dtype = v_cache_BxMxTxH.dtype
    out_BxMxGxH = (jnp.einsum("BMGT,BMTH->BMGH", probs_BxMxGxT.astype(dtype), v_cache_BxMxTxH,
                              preferred_element_type=dtype)
                   + probs_BxMxG[..., None].astype(dtype) * v_Bx1xMxH[:, 0, :, None])
    out_Bx1xNxH = out_BxMxGxH.reshape(batch, 1, num_heads, head_dim)
    out_Bx1xD = layers.einsum("BSNH,NHD->BSD", out_Bx1xNxH, self.o_proj, x_Bx1xD.dtype)
    return out_Bx1xD, (k_Bx1xMxH.transpose(0, 2, 1, 3), v_Bx1xMxH.transpose(0, 2, 1, 3))

  def _qkv(self, x_BxSxD, positions_BxS):
    """q [B, S, N, H], k and v [B, S, M, H], q and k rotated to their positions."""
    dtype = x_BxSxD.dtype
    q_BxSxNxH = layers.einsum("BSD,DNH->BSNH", x_BxSxD, self.q_proj, dtype) + self.q_bias[...].astype(dtype)
    k_BxSxMxH = layers.einsum("BSD,DMH->BSMH", x_BxSxD, self.k_proj, dtype) + self.k_bias[...].astype(dtype)
    v_BxSxMxH = layers.einsum("BSD,DMH->BSMH", x_BxSxD, self.v_proj, dtype) + self.v_bias[...].astype(dtype)
    cos, sin = rope.cos_sin(positions_BxS, rope.inverse_frequencies(self.config.head_dim, self.config.rope_theta))
    return rope.apply_rotate_half(q_BxSxNxH, cos, sin), rope.apply_rotate_half(k_BxSxMxH, cos, sin), v_BxSxMxH


class Qwen2Block(nnx.Module):
  def __init__(self, config: Qwen2Config, layer: int, parallelism: Parallelism, *, rngs: nnx.Rngs):
    del layer  # every Qwen2 block is the same
    self.input_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    self.self_attn = Qwen2Attention(config, rngs=rngs, context_parallel=parallelism.attention)
    self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    self.mlp = layers.SwiGLU(config.hidden_size, config.intermediate_size, config.initializer_range, rngs=rngs)

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    x_BxSxD, aux, _ = self.prefill(x_BxSxD, positions_BxS, segment_ids_BxS)
    return x_BxSxD, aux

  def prefill(self, x_BxSxD, positions_BxS, segment_ids_BxS=None):
    """-> (x [B, S, D], no aux output, the attention's cache entries of these tokens)."""
    h_BxSxD, entry = self.self_attn.prefill(self.input_layernorm(x_BxSxD), positions_BxS, segment_ids_BxS)
    return self._mlp(x_BxSxD + h_BxSxD), None, entry

  def decode(self, x_Bx1xD, positions_Bx1, cache):
    """One token per row against this layer's cache -> (x [B, 1, D], its cache entries)."""
    h_Bx1xD, entry = self.self_attn.decode(self.input_layernorm(x_Bx1xD), positions_Bx1, cache)
    return self._mlp(x_Bx1xD + h_Bx1xD), entry

  def _mlp(self, x_BxSxD):
    return x_BxSxD + self.mlp(self.post_attention_layernorm(x_BxSxD))


class Qwen2Model(CausalLM):
  def __init__(self, config: Qwen2Config, *, parallelism: Parallelism, rngs: nnx.Rngs):
    self.init_trunk(config, Qwen2Block, parallelism, rngs=rngs)
