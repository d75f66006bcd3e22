"""Qwen2 tensor names: Hugging Face `Qwen2ForCausalLM` <-> pretrain.models.qwen2."""

from __future__ import annotations

from pretrain.convert.tensor_map import TensorMap, embed, head, linear, rms_norm, same, swiglu
from pretrain.models.config import Qwen2Config


def tensor_maps(c: Qwen2Config) -> list[TensorMap]:
  d, n, m, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
  maps = embed(c)
  for i in range(c.num_hidden_layers):
    hf, ours = f"model.layers.{i}", ("layers", i)
    attn, our_attn = f"{hf}.self_attn", ours + ("self_attn",)
    maps += [
        rms_norm(f"{hf}.input_layernorm", ours + ("input_layernorm",), d),
        linear(f"{attn}.q_proj.weight", our_attn + ("q_proj",), n * h, d),
        same(f"{attn}.q_proj.bias", our_attn + ("q_bias",), (n * h,)),
        linear(f"{attn}.k_proj.weight", our_attn + ("k_proj",), m * h, d),
        same(f"{attn}.k_proj.bias", our_attn + ("k_bias",), (m * h,)),
        linear(f"{attn}.v_proj.weight", our_attn + ("v_proj",), m * h, d),
        same(f"{attn}.v_proj.bias", our_attn + ("v_bias",), (m * h,)),
        linear(f"{attn}.o_proj.weight", our_attn + ("o_proj",), d, n * h),
        rms_norm(f"{hf}.post_attention_layernorm", ours + ("post_attention_layernorm",), d),
        *swiglu(f"{hf}.mlp", ours + ("mlp",), d, c.intermediate_size),
    ]
  return maps + head(c)
