"""Total and active (per-token) parameter counts, from shapes alone (`jax.eval_shape`).

Active parameters are those one token's forward pass multiplies with: all of them,
less the routed experts it is not sent to (each MoE layer activates
num_experts_per_tok of n_routed_experts) and less the input embedding table, which
is a lookup, not a matmul. This is the convention of the DeepSeek-V2 reports
(DeepSeek-Coder-V2-Lite: 15.7B total, 2.4B active).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from pretrain import models
from pretrain.models.config import DeepseekV2Config, ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  active: int
  by_group: dict[str, int]  # embedding, attention, mlp, shared_experts, routed_experts, router, norms, lm_head


def _group(path: tuple[str, ...]) -> str:
  names = [str(p) for p in path]
  if names[0] == "embed_tokens":
    return "embedding"
  if names[0] == "lm_head":
    return "lm_head"
  if "self_attn" in names:
    return "norms" if names[-2].endswith("layernorm") else "attention"
  if names[-2].endswith("layernorm") or names[0] == "norm":
    return "norms"
  if "experts" in names and "shared_experts" not in names:
    return "routed_experts"
  if "shared_experts" in names:
    return "shared_experts"
  if names[-1] == "gate" and "mlp" in names:
    return "router"
  return "mlp"


def count(config: ModelConfig) -> ParamCount:
  abstract = models.build_abstract(config)
  by_group: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    group = _group(keys)
    by_group[group] = by_group.get(group, 0) + math.prod(leaf.shape)
  total = sum(by_group.values())
  inactive = 0 if config.tie_word_embeddings else by_group.get("embedding", 0)
  if isinstance(config, DeepseekV2Config):
    routed = by_group.get("routed_experts", 0)
    inactive += routed - routed * config.num_experts_per_tok // config.n_routed_experts
  return ParamCount(total=total, active=total - inactive, by_group=by_group)
