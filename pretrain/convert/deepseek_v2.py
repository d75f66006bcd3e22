"""DeepSeek-V2 tensor names: Hugging Face `DeepseekV2ForCausalLM` <-> pretrain.models.deepseek_v2.

On disk every layer, and every routed expert, has its own tensors
(`model.layers.L.mlp.experts.N.gate_proj.weight`); ours stacks the layers of a scanned
stack (models/block_stack.py) into [layers, ...] parameters and the experts into
[layers, E, ...] ones, so each tensor fills one slot: (L's slot,) or (L's slot, N).
The rope part of q and k stays interleaved, as the checkpoints store it and our
model consumes it, so no permutation is needed.
"""

from __future__ import annotations

from pretrain.convert.tensor_map import TensorMap, embed, head, linear, rms_norm, swiglu
from pretrain.models import block_stack
from pretrain.models.config import DeepseekV2Config


def tensor_maps(c: DeepseekV2Config) -> list[TensorMap]:
  d = c.hidden_size
  maps = embed(c)
  for i in range(c.num_hidden_layers):
    stack, slot = block_stack.stack_slot(c, i)
    hf, ours, at = f"model.layers.{i}", ("layers", stack, "block"), (slot,)
    maps += [rms_norm(f"{hf}.input_layernorm", ours + ("input_layernorm",), d, at),
             *_attention(c, f"{hf}.self_attn", ours + ("self_attn",), at),
             rms_norm(f"{hf}.post_attention_layernorm", ours + ("post_attention_layernorm",), d, at)]
    if c.is_moe_layer(i):
      maps += _moe(c, f"{hf}.mlp", ours + ("mlp",), at)
    else:
      maps += swiglu(f"{hf}.mlp", ours + ("mlp",), d, c.intermediate_size, at)
  return maps + head(c)


def _attention(c: DeepseekV2Config, hf: str, ours: tuple, at: tuple[int, ...]) -> list[TensorMap]:
  d, n = c.hidden_size, c.num_attention_heads
  if c.q_lora_rank is None:
    maps = [linear(f"{hf}.q_proj.weight", ours + ("q_proj",), n * c.qk_head_dim, d, at)]
  else:
    maps = [linear(f"{hf}.q_a_proj.weight", ours + ("q_a_proj",), c.q_lora_rank, d, at),
            rms_norm(f"{hf}.q_a_layernorm", ours + ("q_a_layernorm",), c.q_lora_rank, at),
            linear(f"{hf}.q_b_proj.weight", ours + ("q_b_proj",), n * c.qk_head_dim, c.q_lora_rank, at)]
  return maps + [
      linear(f"{hf}.kv_a_proj_with_mqa.weight", ours + ("kv_a_proj_with_mqa",),
             c.kv_lora_rank + c.qk_rope_head_dim, d, at),
      rms_norm(f"{hf}.kv_a_layernorm", ours + ("kv_a_layernorm",), c.kv_lora_rank, at),
      linear(f"{hf}.kv_b_proj.weight", ours + ("kv_b_proj",), n * (c.qk_nope_head_dim + c.v_head_dim),
             c.kv_lora_rank, at),
      linear(f"{hf}.o_proj.weight", ours + ("o_proj",), d, n * c.v_head_dim, at),
  ]


def _moe(c: DeepseekV2Config, hf: str, ours: tuple, at: tuple[int, ...]) -> list[TensorMap]:
  d, inter = c.hidden_size, c.moe_intermediate_size
  maps = [linear(f"{hf}.gate.weight", ours + ("gate",), c.n_routed_experts, d, at)]
  experts = ours + ("experts",)
  for e in range(c.n_routed_experts):
    maps += [linear(f"{hf}.experts.{e}.gate_proj.weight", experts + ("gate_proj",), inter, d, at + (e,)),
             linear(f"{hf}.experts.{e}.up_proj.weight", experts + ("up_proj",), inter, d, at + (e,)),
             linear(f"{hf}.experts.{e}.down_proj.weight", experts + ("down_proj",), d, inter, at + (e,))]
  if c.n_shared_experts:
    maps += swiglu(f"{hf}.shared_experts", ours + ("shared_experts",), d, inter * c.n_shared_experts, at)
  return maps
