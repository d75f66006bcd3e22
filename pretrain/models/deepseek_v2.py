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
    kv_BxSxNxE = layers.einsum("BSL,LNE->BSNE", kv_latent_BxSxL, self.kv_b_proj, dtype)
    k_nope, v_BxSxNxV = kv_BxSxNxE[..., :c.qk_nope_head_dim], kv_BxSxNxE[..., c.qk_nope_head_dim:]

    inv_freq = rope.inverse_frequencies(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
    cos, sin = rope.cos_sin(positions_BxS, inv_freq, rope.cos_sin_scale(c.rope_scaling))
    q_rope = rope.apply_interleaved(q_rope, cos, sin)
    k_rope_BxSx1xR = rope.apply_interleaved(k_rope_BxSx1xR, cos, sin)

    q_BxSxNxK = jnp.concatenate([q_nope, q_rope], axis=-1)
    k_BxSxNxK = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope_BxSx1xR, q_rope.shape)], axis=-1)
    out_BxSxNxV = attention.attend(
        q_BxSxNxK, k_BxSxNxK, v_BxSxNxV, scale=rope.softmax_scale(c.qk_head_dim, c.rope_scaling),
        segment_ids_BxS=segment_ids_BxS, implementation=c.attention_implementation,
        context_parallel=self.context_parallel)
    return layers.einsum("BSNV,NVD->BSD", out_BxSxNxV, self.o_proj, dtype)


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
    x_BxSxD = x_BxSxD + self.self_attn(self.input_layernorm(x_BxSxD), positions_BxS, segment_ids_BxS)
    h_BxSxD = self.post_attention_layernorm(x_BxSxD)
    if isinstance(self.mlp, moe.DeepseekMoE):
      y_BxSxD, aux = self.mlp(h_BxSxD)
    else:
      y_BxSxD, aux = self.mlp(h_BxSxD), None
    return x_BxSxD + y_BxSxD, aux


class DeepseekV2Model(CausalLM):
  def __init__(self, config: DeepseekV2Config, *, parallelism: Parallelism, rngs: nnx.Rngs):
    self.init_trunk(config, DeepseekV2Block, parallelism, rngs=rngs)
