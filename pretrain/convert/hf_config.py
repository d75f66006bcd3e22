"""Hugging Face `config.json` <-> our typed model configs.

Reads config.json both as the released checkpoints write it (`rope_scaling` with
`type`, top-level `rope_theta`) and as transformers 5 writes it (`rope_parameters`
with `rope_type` and `rope_theta` inside). Keys that do not change the computation
(torch_dtype, transformers_version, use_cache, ...) are ignored; keys that would
change it in a way our models do not implement are refused with their name.
Writes the released-checkpoint style, which transformers 5 reads as well.
"""

from __future__ import annotations

from typing import Any

from pretrain import schema
from pretrain.convert.errors import ConversionError
from pretrain.models.config import DeepseekV2Config, ModelConfig, Qwen2Config, RopeScaling

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "qwen2")

# Keys that fix tensor shapes: a config.json without them is refused rather than guessed.
_QWEN2_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_DEEPSEEK_REQUIRED = _QWEN2_REQUIRED + (
    "moe_intermediate_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace")

# The rest default as transformers' (and DeepSeek's own) config classes default them.
_QWEN2_DEFAULTS = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
                       initializer_range=0.02, bos_token_id=None, eos_token_id=None)
_DEEPSEEK_DEFAULTS = dict(
    topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", moe_layer_freq=1,
    aux_loss_alpha=0.001, seq_aux=True, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048,
    initializer_range=0.02, bos_token_id=None, eos_token_id=None)
_DEFAULT_ROPE_THETA = 10000.0
_NO_SCALING = (None, "none", "default")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Our model config from a parsed config.json."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConversionError(f"config.json: model_type {model_type!r} is not supported; "
                          f"supported values: {', '.join(SUPPORTED_MODEL_TYPES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; only 'silu'")
  if model_type == "qwen2":
    cls, values = Qwen2Config, _qwen2_values(hf)
  else:
    cls, values = DeepseekV2Config, _deepseek_values(hf)
  try:
    return schema.parse(cls, values, "config.json")
  except schema.ConfigError as e:
    raise ConversionError(str(e)) from e


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The config.json transformers needs for `config` (without the storage dtype, which save_hf adds)."""
  common = dict(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
      hidden_act="silu", rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
      max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
      bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, rope_theta=config.rope_theta,
      attention_dropout=0.0, use_cache=True)
  if isinstance(config, Qwen2Config):
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **common,
                num_key_value_heads=config.num_key_value_heads, rope_scaling=None, use_sliding_window=False,
                sliding_window=None, max_window_layers=config.num_hidden_layers)
  c = config
  return dict(
      architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", **common,
      num_key_value_heads=c.num_attention_heads,  # unused by MLA; transformers wants it
      rope_scaling=_rope_scaling_to_hf(c.rope_scaling), attention_bias=False,
      moe_intermediate_size=c.moe_intermediate_size, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
      qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
      n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
      num_experts_per_tok=c.num_experts_per_tok, topk_method=c.topk_method, n_group=c.n_group,
      topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
      scoring_func=c.scoring_func, first_k_dense_replace=c.first_k_dense_replace, moe_layer_freq=c.moe_layer_freq,
      aux_loss_alpha=c.aux_loss_alpha, seq_aux=c.seq_aux)


def _require(hf: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
  missing = [k for k in keys if k not in hf]
  if missing:
    raise ConversionError(f"config.json: required key {missing[0]!r} is missing (all missing: {', '.join(missing)})")
  return {k: hf[k] for k in keys}


def _optional(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  values = {k: hf.get(k, default) for k, default in defaults.items()}
  for k in ("bos_token_id", "eos_token_id"):
    if isinstance(values[k], list):  # transformers allows several EOS ids; our config keeps one, the first
      values[k] = values[k][0] if values[k] else None
  return values


def _qwen2_values(hf: dict[str, Any]) -> dict[str, Any]:
  values = _require(hf, _QWEN2_REQUIRED) | _optional(hf, _QWEN2_DEFAULTS)
  values["num_key_value_heads"] = hf.get("num_key_value_heads") or values["num_attention_heads"]
  theta, rope = _rope_from_hf(hf)
  if rope.get("rope_type", rope.get("type")) not in _NO_SCALING:
    raise ConversionError(f"config.json: rope scaling {rope!r} is not supported for qwen2; only default RoPE")
  values["rope_theta"] = theta
  if hf.get("use_sliding_window"):
    raise ConversionError("config.json: use_sliding_window=true is not supported for qwen2")
  if "sliding_attention" in (hf.get("layer_types") or ()):
    raise ConversionError("config.json: layer_types with 'sliding_attention' are not supported for qwen2")
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * values["num_attention_heads"] != values["hidden_size"]:
    raise ConversionError(f"config.json: head_dim {head_dim} must equal hidden_size / num_attention_heads = "
                          f"{values['hidden_size']} / {values['num_attention_heads']}; other head dims are not "
                          "supported")
  return values


def _deepseek_values(hf: dict[str, Any]) -> dict[str, Any]:
  values = _require(hf, _DEEPSEEK_REQUIRED) | _optional(hf, _DEEPSEEK_DEFAULTS)
  values["n_shared_experts"] = values["n_shared_experts"] or 0  # DeepSeek's code: None means no shared experts
  values["n_group"] = hf.get("n_group") or 1  # transformers writes null for "no groups"
  values["topk_group"] = hf.get("topk_group") or 1
  if hf.get("attention_bias"):
    raise ConversionError("config.json: attention_bias=true is not supported for deepseek_v2")
  theta, rope = _rope_from_hf(hf)
  values["rope_theta"] = theta
  values["rope_scaling"] = _rope_scaling_from_hf(rope, values["max_position_embeddings"])
  return values


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
  """(rope_theta, scaling dict) with transformers' precedence: rope_scaling, then rope_parameters."""
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(rope, dict):
    raise ConversionError(f"config.json: rope_scaling/rope_parameters must be a mapping, got {rope!r}")
  if "rope_type" not in rope and "type" not in rope and any(isinstance(v, dict) for v in rope.values()):
    raise ConversionError("config.json: rope_parameters per layer type are not supported")
  theta = rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA))
  return theta, rope


def _rope_scaling_from_hf(rope: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
  kind = rope.get("rope_type", rope.get("type"))
  if kind in _NO_SCALING:
    return {"type": "none"}
  if kind != "yarn":
    raise ConversionError(f"config.json: rope scaling type {kind!r} is not supported; supported values: "
                          "none/default, yarn")
  if rope.get("attention_factor") is not None:
    raise ConversionError("config.json: rope_scaling.attention_factor is not supported; YaRN's scale comes "
                          "from mscale/mscale_all_dim")
  if rope.get("truncate", True) is not True:
    raise ConversionError("config.json: rope_scaling.truncate=false is not supported")
  def get(key: str, default: Any) -> Any:  # a null in config.json means the default, as in transformers
    value = rope.get(key)
    return default if value is None else value

  return dict(type="yarn", factor=rope.get("factor"),
              original_max_position_embeddings=get("original_max_position_embeddings", max_position_embeddings),
              beta_fast=get("beta_fast", 32.0), beta_slow=get("beta_slow", 1.0), mscale=get("mscale", 1.0),
              mscale_all_dim=get("mscale_all_dim", 0.0))


def _rope_scaling_to_hf(scaling: RopeScaling) -> dict[str, Any] | None:
  if scaling.type == "none":
    return None
  # Both `type` (DeepSeek's own code) and `rope_type` (transformers) so either reads it.
  return dict(type="yarn", rope_type="yarn", factor=scaling.factor,
              original_max_position_embeddings=scaling.original_max_position_embeddings,
              beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, mscale=scaling.mscale,
              mscale_all_dim=scaling.mscale_all_dim)
