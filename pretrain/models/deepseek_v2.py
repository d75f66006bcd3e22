"""DeepSeek-V2: Multi-head Latent Attention and DeepSeekMoE blocks.

MLA compresses keys and values into a `kv_lora_rank` latent (plus one shared
`qk_rope_head_dim` rotary key per token), and optionally queries into `q_lora_rank`.
Per head, a query/key is [nope | rope] = qk_nope_head_dim + qk_rope_head_dim wide and
a value v_head_dim wide.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pretrain.models import attention, layers, moe, rope
from pretrain.models.causal_lm import CausalLM
from pretrain.models.config import DeepseekV2Config
from pretrain.models.context_parallel import ContextParallel
from pretrain.models.parallelism import Parallelism


# DeepSeek's code (and transformers) build the q/kv latent norms with the RMSNorm default eps,
# not config.rms_norm_eps; the two differ once a config sets rms_norm_eps != 1e-6.
LATENT_NORM_EPS = 1e-6


class MLAttention(nnx.Module):
  # What a decode cache keeps per token (logical axes of each array's per-token part): the kv latent
  # after kv_a_layernorm and the rotary key after RoPE, kv_lora_rank + qk_rope_head_dim numbers.
  CACHE_AXES = (("kv_lora",), (None,))

  def __init__(self, config: DeepseekV2Config, *, rngs: nnx.Rngs, context_parallel: ContextParallel | None = None):
    self.config = config
    d, n, std = config.hidden_size, config.num_attention_heads, config.initializer_range
    qk, nope, rope_dim = config.qk_head_dim, config.qk_nope_head_dim, config.qk_rope_head_dim
    if config.q_lora_rank is None:
      self.q_proj = layers.param(rngs, (d, n, qk), ("embed", "heads", "head_dim"), std)
    else:
      self.q_a_proj = layers.param(rngs, (d, config.q_lora_rank), ("embed", "q_lora"), std)
      self.q_a_layernorm = layers.RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, rngs=rngs)
      self.q_b_proj = layers.param(rngs, (config.q_lora_rank, n, qk), ("q_lora", "heads", "head_dim"), std)
    self.kv_a_proj_with_mqa = layers.param(rngs, (d, config.kv_lora_rank + rope_dim), ("embed", "kv_lora"), std)
    self.kv_a_layernorm = layers.RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS, rngs=rngs)
    self.kv_b_proj = layers.param(rngs, (config.kv_lora_rank, n, nope + config.v_head_dim),
                                  ("kv_lora", "heads", "head_dim"), std)
    self.o_proj = layers.param(rngs, (n, config.v_head_dim, d), ("heads", "head_dim", "embed"), std)
    self.context_parallel = context_parallel  # how the mesh splits attention (None: one device)

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    return self.prefill(x_BxSxD, positions_BxS, segment_ids_BxS)[0]

  def prefill(self, x_BxSxD, positions_BxS, segment_ids_BxS=None):
    """The forward pass -> (output [B, S, D], what a decode cache keeps of these tokens: the latent
    [B, S, L] and the rotary key [B, S, R]).

    Keys and values are expanded from the latent per head: for the many queries of a prompt that
    costs less than attending in the latent space (`decode`).
    """
    c = self.config
    dtype = x_BxSxD.dtype
    q_nope, q_rope, kv_latent_BxSxL, k_rope_BxSx1xR = self._project(x_BxSxD, positions_BxS)
    kv_BxSxNxE = layers.einsum("BSL,LNE->BSNE", kv_latent_BxSxL, self.kv_b_proj, dtype)
    k_nope, v_BxSxNxV = kv_BxSxNxE[..., :c.qk_nope_head_dim], kv_BxSxNxE[..., c.qk_nope_head_dim:]
    q_BxSxNxK = jnp.concatenate([q_nope, q_rope], axis=-1)
    k_BxSxNxK = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope_BxSx1xR, q_rope.shape)], axis=-1)
    out_BxSxNxV = attention.attend(
        q_BxSxNxK, k_BxSxNxK, v_BxSxNxV, scale=rope.softmax_scale(c.qk_head_dim, c.rope_scaling),
        segment_ids_BxS=segment_ids_BxS, implementation=c.attention_implementation,
        context_parallel=self.context_parallel)
    out_BxSxD = layers.einsum("BSNV,NVD->BSD", out_BxSxNxV, self.o_proj, dtype)
    return out_BxSxD, (kv_latent_BxSxL, k_rope_BxSx1xR[:, :, 0])

  def decode(self, x_Bx1xD, positions_Bx1, cache):
    """One new token per row, attending in the latent space (DeepSeek-V2 paper, section 2.1.3) to its
    row's cached tokens before its position and to itself -> (output [B, 1, D], its latent [B, 1, L]
    and rotary key [B, 1, R] for the cache).

    `cache`: this layer's (latent [B, T, L], rotary key [B, T, R]). The key up-projection W_UK is
    absorbed into the query (q_nope . W_UK is an L-wide query per head, scored against the latents
    directly) and the value up-projection W_UV applied to the attention-weighted latent, so keys and
    values are never expanded per head: the cache is read once, L + R numbers per token.
    """
    c = self.config
    dtype = x_Bx1xD.dtype
    latent_cache_BxTxL, rope_cache_BxTxR = cache
    q_nope_Bx1xNxK, q_rope_Bx1xNxR, latent_Bx1xL, k_rope_Bx1x1xR = self._project(x_Bx1xD, positions_Bx1)
    kv_b_LxNxE = self.kv_b_proj[...].astype(dtype)
    w_uk_LxNxK, w_uv_LxNxV = kv_b_LxNxE[..., :c.qk_nope_head_dim], kv_b_LxNxE[..., c.qk_nope_head_dim:]
    q_latent_BxNxL = jnp.einsum("BNK,LNK->BNL", q_nope_Bx1xNxK[:, 0], w_uk_LxNxK, preferred_element_type=dtype)
    q_rope_BxNxR, latent_BxL, k_rope_BxR = q_rope_Bx1xNxR[:, 0], latent_Bx1xL[:, 0], k_rope_Bx1x1xR[:, 0, 0]
    f32 = jnp.float32
    scores_BxNxT = (jnp.einsum("BNL,BTL->BNT", q_latent_BxNxL, latent_cache_BxTxL, preferred_element_type=f32)
                    + jnp.einsum("BNR,BTR->BNT", q_rope_BxNxR, rope_cache_BxTxR, preferred_element_type=f32))
    self_BxN = (jnp.einsum("BNL,BL->BN", q_latent_BxNxL, latent_BxL, preferred_element_type=f32)
                + jnp.einsum("BNR,BR->BN", q_rope_BxNxR, k_rope_BxR, preferred_element_type=f32))
    scale = rope.softmax_scale(c.qk_head_dim, c.rope_scaling)  # the training path's, YaRN mscale included
    valid_BxT = jnp.arange(latent_cache_BxTxL.shape[1]) < positions_Bx1
    probs_BxNxT, probs_BxN = layers.decode_softmax(scores_BxNxT * scale, self_BxN * scale, valid_BxT[:, None])
    out_latent_BxNxL = (jnp.einsum("BNT,BTL->BNL", probs_BxNxT.astype(dtype), latent_cache_BxTxL,
                                   preferred_element_type=dtype)
                        + probs_BxN[..., None].astype(dtype) * latent_BxL[:, None])
    out_BxNxV = jnp.einsum("BNL,LNV->BNV", out_latent_BxNxL, w_uv_LxNxV, preferred_element_type=dtype)
    out_Bx1xD = layers.einsum("BSNV,NVD->BSD", out_BxNxV[:, None], self.o_proj, dtype)
    return out_Bx1xD, (latent_Bx1xL, k_rope_Bx1x1xR[:, :, 0])

  def _project(self, x_BxSxD, positions_BxS):
    """q's nope part [B, S, N, nope] and rotated rope part [B, S, N, R], the kv latent [B, S, L] (normed)
    and the rotated rotary key [B, S, 1, R]."""
    c = self.config
    dtype = x_BxSxD.dtype
    if c.q_lora_rank is None:
      q_BxSxNxK = layers.einsum("BSD,DNK->BSNK", x_BxSxD, self.q_proj, dtype)
    else:
      q_latent_BxSxQ = self.q_a_layernorm(layers.einsum("BSD,DQ->BSQ", x_BxSxD, self.q_a_proj, dtype))
      q_BxSxNxK = layers.einsum("BSQ,QNK->BSNK", q_latent_BxSxQ, self.q_b_proj, dtype)
    q_nope, q_rope = q_BxSxNxK[..., :c.qk_nope_head_dim], q_BxSxNxK[..., c.qk_nope_head_dim:]

    kv_a_BxSxC = layers.einsum("BSD,DC->BSC", x_BxSxD, self.kv_a_proj_with_mqa, dtype)
    kv_latent_BxSxL = self.kv_a_layernorm(kv_a_BxSxC[..., :c.kv_lora_rank])
    k_rope_BxSx1xR = kv_a_BxSxC[..., None, c.kv_lora_rank:]  # one rotary key per token, shared by all heads

    inv_freq = rope.inverse_frequencies(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
    cos, sin = rope.cos_sin(positions_BxS, inv_freq, rope.cos_sin_scale(c.rope_scaling))
    return (q_nope, rope.apply_interleaved(q_rope, cos, sin), kv_latent_BxSxL,
            rope.apply_interleaved(k_rope_BxSx1xR, cos, sin))


class DeepseekV2Block(nnx.Module):
  def __init__(self, config: DeepseekV2Config, layer: int, parallelism: Parallelism, *, rngs: nnx.Rngs):
    self.input_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    self.self_attn = MLAttention(config, rngs=rngs, context_parallel=parallelism.attention)
    self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    if config.is_moe_layer(layer):
      self.mlp = moe.DeepseekMoE(config, rngs=rngs, parallel=parallelism.experts)
    else:
      self.mlp = layers.SwiGLU(config.hidden_size, config.intermediate_size, config.initializer_range, rngs=rngs)

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    x_BxSxD, aux, _ = self.prefill(x_BxSxD, positions_BxS, segment_ids_BxS)
    return x_BxSxD, aux

  def prefill(self, x_BxSxD, positions_BxS, segment_ids_BxS=None):
    """-> (x [B, S, D], the MoE aux output or None, the attention's cache entries of these tokens)."""
    h_BxSxD, entry = self.self_attn.prefill(self.input_layernorm(x_BxSxD), positions_BxS, segment_ids_BxS)
    x_BxSxD, aux = self._mlp(x_BxSxD + h_BxSxD)
    return x_BxSxD, aux, entry

  def decode(self, x_Bx1xD, positions_Bx1, cache):
    """One token per row against this layer's cache -> (x [B, 1, D], its cache entries). The MoE layer
    routes and computes exactly as in training: dropless, so no token depends on the others in the batch."""
    h_Bx1xD, entry = self.self_attn.decode(self.input_layernorm(x_Bx1xD), positions_Bx1, cache)
    x_Bx1xD, _ = self._mlp(x_Bx1xD + h_Bx1xD)
    return x_Bx1xD, entry

  def _mlp(self, x_BxSxD):
    h_BxSxD = self.post_attention_layernorm(x_BxSxD)
    if isinstance(self.mlp, moe.DeepseekMoE):
      y_BxSxD, aux = self.mlp(h_BxSxD)
    else:
      y_BxSxD, aux = self.mlp(h_BxSxD), None
    return x_BxSxD + y_BxSxD, aux


class DeepseekV2Model(CausalLM):
  def __init__(self, config: DeepseekV2Config, *, parallelism: Parallelism, rngs: nnx.Rngs):
    self.init_trunk(config, DeepseekV2Block, parallelism, rngs=rngs)
