"""Named model shapes: the published checkpoints, and tiny ones for tests and CPU runs."""

from __future__ import annotations

import dataclasses

from pretrain.models.config import DeepseekV2Config, ModelConfig, Qwen2Config, RopeScaling

_DEEPSEEK_YARN = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                             beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)

PRESETS: dict[str, ModelConfig] = {
    # deepseek-ai/DeepSeek-Coder-V2-Lite-Base: 15,706,484,224 parameters, 2.4B active.
    "deepseek-coder-v2-lite": DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, first_k_dense_replace=1, moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True,
        rope_theta=10000.0, rope_scaling=_DEEPSEEK_YARN, rms_norm_eps=1e-6, max_position_embeddings=163840,
        bos_token_id=100000, eos_token_id=100001),
    # deepseek-ai/DeepSeek-Coder-V2-Base: the DeepSeek-V2 shape, ~236B parameters, 21B active.
    "deepseek-coder-v2": DeepseekV2Config(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, topk_method="group_limited_greedy", n_group=8, topk_group=3,
        routed_scaling_factor=16.0, norm_topk_prob=False, first_k_dense_replace=1, moe_layer_freq=1,
        aux_loss_alpha=0.003, seq_aux=True, rope_theta=10000.0, rope_scaling=_DEEPSEEK_YARN, rms_norm_eps=1e-6,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001),
    # DeepSeek-R1-Distill-Qwen-14B / agentica-org/DeepCoder-14B-Preview: 14.77B parameters.
    "qwen2-14b": Qwen2Config(
        vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=151646, eos_token_id=151643),
    # Tiny shapes with every feature of the big ones, for tests and CPU runs.
    "tiny-deepseek-v2": DeepseekV2Config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=256,
                                 mscale=0.707, mscale_all_dim=0.707),
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2),
    "tiny-qwen2": Qwen2Config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=2),
}


def get(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return dataclasses.replace(PRESETS[name], **overrides)
