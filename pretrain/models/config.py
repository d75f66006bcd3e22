"""The two model families' settings, as typed, validated dataclasses.

Field names follow the Hugging Face `config.json` of each family, so a released
checkpoint's config reads across one to one and users recognise every knob.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pretrain.schema import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
# How attention computes (pretrain/models/attention.py); not part of the checkpoint.
AttentionImplementation = Literal["auto", "reference", "blockwise", "splash", "cudnn"]
# How routed experts compute (pretrain/models/grouped_experts.py); not part of the checkpoint.
MoeImplementation = Literal["auto", "ragged_dot", "blocked"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE scaling; `type='yarn'` is YaRN exactly as the DeepSeek-V2 checkpoints compute it."""

  type: Literal["none", "yarn"] = "none"
  factor: float = 1.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0

  def validate(self, key: str) -> None:
    if self.type == "yarn":
      if self.factor < 1.0:
        raise ConfigError(f"{key}.factor", f"YaRN needs factor >= 1, got {self.factor}")
      if self.beta_fast <= self.beta_slow:
        raise ConfigError(f"{key}.beta_fast", f"must exceed beta_slow ({self.beta_slow}), got {self.beta_fast}")
      if self.original_max_position_embeddings <= 0:
        raise ConfigError(f"{key}.original_max_position_embeddings", "must be positive")


def _positive(obj, key: str, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if value <= 0:
      raise ConfigError(f"{key}.{name}", f"must be positive, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config:
  """Qwen2 dense decoder (DeepSeek-R1-Distill-Qwen-14B / DeepCoder-14B family)."""

  family: Literal["qwen2"] = "qwen2"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  attention_implementation: AttentionImplementation = "auto"
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  initializer_range: float = 0.02
  dtype: DType = "float32"  # compute dtype; parameters stay float32

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def is_moe_layer(self, layer: int) -> bool:
    del layer  # a dense family: every block has the same structure (models/block_stack.py)
    return False

  def validate(self, key: str) -> None:
    _positive(self, key, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"{key}.num_attention_heads",
                        f"must divide hidden_size={self.hidden_size}, got {self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f"{key}.num_key_value_heads",
                        f"must divide num_attention_heads={self.num_attention_heads}; allowed values: "
                        f"{_divisors(self.num_attention_heads)}, got {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"{key}.num_attention_heads", f"head_dim={self.head_dim} must be even for RoPE")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekV2Config:
  """DeepSeek-V2: Multi-head Latent Attention + DeepSeekMoE (shared + fine-grained routed experts)."""

  family: Literal["deepseek_v2"] = "deepseek_v2"
  vocab_size: int
  hidden_size: int
  intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
  moe_intermediate_size: int  # each routed expert; shared experts use n_shared_experts times this
  num_hidden_layers: int
  num_attention_heads: int
  # Multi-head Latent Attention
  q_lora_rank: int | None = None  # None: a full-rank q_proj
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # DeepSeekMoE
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  topk_method: Literal["greedy", "group_limited_greedy"] = "greedy"
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = False
  scoring_func: Literal["softmax"] = "softmax"
  first_k_dense_replace: int = 1
  moe_layer_freq: int = 1
  aux_loss_alpha: float = 0.001
  seq_aux: bool = True
  moe_implementation: MoeImplementation = "auto"
  attention_implementation: AttentionImplementation = "auto"
  # positions and the rest
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 163840
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  initializer_range: float = 0.02
  dtype: DType = "float32"

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  def is_moe_layer(self, layer: int) -> bool:
    # The rule of DeepSeek's own modeling code.
    return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

  def validate(self, key: str) -> None:
    _positive(self, key, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
              "topk_group", "moe_layer_freq", "rope_theta", "rms_norm_eps")
    if self.q_lora_rank is not None and self.q_lora_rank <= 0:
      raise ConfigError(f"{key}.q_lora_rank", f"must be positive or None, got {self.q_lora_rank}")
    if self.n_shared_experts < 0:
      raise ConfigError(f"{key}.n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
    if self.first_k_dense_replace < 0:
      raise ConfigError(f"{key}.first_k_dense_replace", f"must be >= 0, got {self.first_k_dense_replace}")
    if self.qk_rope_head_dim % 2:
      raise ConfigError(f"{key}.qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
    if self.num_experts_per_tok > self.n_routed_experts:
      raise ConfigError(f"{key}.num_experts_per_tok",
                        f"must be <= n_routed_experts={self.n_routed_experts}; allowed values: "
                        f"1..{self.n_routed_experts}, got {self.num_experts_per_tok}")
    if self.n_routed_experts % self.n_group:
      raise ConfigError(f"{key}.n_group", f"must divide n_routed_experts={self.n_routed_experts}; allowed values: "
                        f"{_divisors(self.n_routed_experts)}, got {self.n_group}")
    if self.topk_group > self.n_group:
      raise ConfigError(f"{key}.topk_group", f"must be <= n_group={self.n_group}, got {self.topk_group}")
    if self.topk_method == "group_limited_greedy":
      reachable = self.topk_group * (self.n_routed_experts // self.n_group)
      if self.num_experts_per_tok > reachable:
        raise ConfigError(f"{key}.num_experts_per_tok",
                          f"topk_group={self.topk_group} groups hold only {reachable} experts, "
                          f"fewer than num_experts_per_tok={self.num_experts_per_tok}")


ModelConfig = Qwen2Config | DeepseekV2Config


def parse_model_config(values, key: str = "config.model") -> ModelConfig:
  """Picks the family's schema from `values['family']`, then parses against it."""
  from pretrain import schema

  return schema.parse_value(ModelConfig, values, key)


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
