"""Qwen2 tensor names: Hugging Face `Qwen2ForCausalLM` <-> pretrain.models.qwen2.

HF stores one tensor per layer; ours stacks the layers of a scanned stack
(models/block_stack.py), so layer i's tensor fills slot `index` of its stack's parameter.
"""

from __future__ import annotations

from pretrain.convert.tensor_map import TensorMap, embed, head, linear, rms_norm, same, swiglu
from pretrain.models import block_stack
from pretrain.models.config import Qwen2Config


def tensor_maps(c: Qwen2Config) -> list[TensorMap]:
  d, n, m, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
  maps = embed(c)
  for i in range(c.num_hidden_layers):
    stack, slot = block_stack.stack_slot(c, i)
    hf, ours, at = f"model.layers.{i}", ("layers", stack, "block"), (slot,)
    attn, our_attn = f"{hf}.self_attn", ours + ("self_attn",)
    maps += [
        rms_norm(f"{hf}.input_layernorm", ours + ("input_layernorm",), d, at),
        linear(f"{attn}.q_proj.weight", our_attn + ("q_proj",), n * h, d, at),
        same(f"{attn}.q_proj.bias", our_attn + ("q_bias",), (n * h,), at),
        linear(f"{attn}.k_proj.weight", our_attn + ("k_proj",), m * h, d, at),
        same(f"{attn}.k_proj.bias", our_attn + ("k_bias",), (m * h,), at),
        linear(f"{attn}.v_proj.weight", our_attn + ("v_proj",), m * h, d, at),
        same(f"{attn}.v_proj.bias", our_attn + ("v_bias",), (m * h,), at),
        linear(f"{attn}.o_proj.weight", our_attn + ("o_proj",), d, n * h, at),
        rms_norm(f"{hf}.post_attention_layernorm", ours + ("post_attention_layernorm",), d, at),
        *swiglu(f"{hf}.mlp", ours + ("mlp",), d, c.intermediate_size, at),
    ]
  return maps + head(c)
