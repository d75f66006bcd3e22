"""Qwen2 dense decoder: grouped-query attention with q/k/v bias, SwiGLU, RMSNorm, RoPE."""

from __future__ import annotations

from flax import nnx

from pretrain.models import attention, layers, rope
from pretrain.models.causal_lm import CausalLM
from pretrain.models.config import Qwen2Config
from pretrain.models.context_parallel import ContextParallel
from pretrain.models.parallelism import Parallelism


class Qwen2Attention(nnx.Module):
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
    dtype = x_BxSxD.dtype
    q_BxSxNxH = layers.einsum("BSD,DNH->BSNH", x_BxSxD, self.q_proj, dtype) + self.q_bias[...].astype(dtype)
    k_BxSxMxH = layers.einsum("BSD,DMH->BSMH", x_BxSxD, self.k_proj, dtype) + self.k_bias[...].astype(dtype)
    v_BxSxMxH = layers.einsum("BSD,DMH->BSMH", x_BxSxD, self.v_proj, dtype) + self.v_bias[...].astype(dtype)
    head_dim = self.config.head_dim
    cos, sin = rope.cos_sin(positions_BxS, rope.inverse_frequencies(head_dim, self.config.rope_theta))
    q_BxSxNxH = rope.apply_rotate_half(q_BxSxNxH, cos, sin)
    k_BxSxMxH = rope.apply_rotate_half(k_BxSxMxH, cos, sin)
    out_BxSxNxH = attention.attend(q_BxSxNxH, k_BxSxMxH, v_BxSxMxH, scale=head_dim**-0.5,
                                   segment_ids_BxS=segment_ids_BxS,
                                   implementation=self.config.attention_implementation,
                                   context_parallel=self.context_parallel)
    return layers.einsum("BSNH,NHD->BSD", out_BxSxNxH, self.o_proj, dtype)


class Qwen2Block(nnx.Module):
  def __init__(self, config: Qwen2Config, layer: int, parallelism: Parallelism, *, rngs: nnx.Rngs):
    del layer  # every Qwen2 block is the same
    self.input_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    self.self_attn = Qwen2Attention(config, rngs=rngs, context_parallel=parallelism.attention)
    self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    self.mlp = layers.SwiGLU(config.hidden_size, config.intermediate_size, config.initializer_range, rngs=rngs)

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    x_BxSxD = x_BxSxD + self.self_attn(self.input_layernorm(x_BxSxD), positions_BxS, segment_ids_BxS)
    x_BxSxD = x_BxSxD + self.mlp(self.post_attention_layernorm(x_BxSxD))
    return x_BxSxD, None


class Qwen2Model(CausalLM):
  def __init__(self, config: Qwen2Config, *, parallelism: Parallelism, rngs: nnx.Rngs):
    self.init_trunk(config, Qwen2Block, parallelism, rngs=rngs)
