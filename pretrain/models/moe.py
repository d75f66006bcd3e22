"""DeepSeekMoE: shared experts plus fine-grained routed experts, dropless.

Routing follows DeepSeek-V2's modeling code: a softmax gate in float32, greedy or
group-limited top-k, then either renormalised weights (`norm_topk_prob`) or weights
times `routed_scaling_factor`. The routed experts run dropless: the T*K (token,
expert) assignments are sorted by expert and computed as grouped matmuls
(`grouped_experts.py`: `jax.lax.ragged_dot`, or blocks of rows scanned through their
expert where ragged_dot has no fast kernel), so no token is dropped and no expert
computes a token it was not given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.models import expert_parallel, grouped_experts, layers
from pretrain.models.config import DeepseekV2Config


def route(scores_TxE: jnp.ndarray, config: DeepseekV2Config) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Top-k expert weights [T, K] and indices [T, K] from gate probabilities."""
  k = config.num_experts_per_tok
  if config.topk_method == "group_limited_greedy":
    tokens, experts = scores_TxE.shape
    per_group = experts // config.n_group
    scores_TxGxP = scores_TxE.reshape(tokens, config.n_group, per_group)
    _, best_groups_TxK = jax.lax.top_k(scores_TxGxP.max(axis=-1), config.topk_group)
    keep_TxG = jnp.zeros((tokens, config.n_group), bool).at[jnp.arange(tokens)[:, None], best_groups_TxK].set(True)
    scores_TxE = jnp.where(keep_TxG[:, :, None], scores_TxGxP, 0.0).reshape(tokens, experts)
  weights_TxK, experts_TxK = jax.lax.top_k(scores_TxE, k)
  if k > 1 and config.norm_topk_prob:
    weights_TxK = weights_TxK / (weights_TxK.sum(axis=-1, keepdims=True) + 1e-20)
  else:
    weights_TxK = weights_TxK * config.routed_scaling_factor
  return weights_TxK, experts_TxK


def balance_loss(scores_BxSxE: jnp.ndarray, experts_BxSxK: jnp.ndarray, config: DeepseekV2Config) -> jnp.ndarray:
  """Expert-level balance loss, alpha * sum_i f_i * P_i (per sequence with `seq_aux`, as DeepSeek-V2)."""
  batch, seq, num_experts = scores_BxSxE.shape
  k = config.num_experts_per_tok
  one_hot_BxSxKxE = jax.nn.one_hot(experts_BxSxK, num_experts, dtype=jnp.float32)
  if config.seq_aux:
    f_BxE = one_hot_BxSxKxE.sum(axis=(1, 2)) * num_experts / (seq * k)
    p_BxE = scores_BxSxE.mean(axis=1)
    return config.aux_loss_alpha * (f_BxE * p_BxE).sum(axis=-1).mean()
  f_E = one_hot_BxSxKxE.reshape(-1, num_experts).mean(axis=0) * num_experts
  p_E = scores_BxSxE.reshape(-1, num_experts).mean(axis=0)
  return config.aux_loss_alpha * (f_E * p_E).sum()


ROUTED_EXPERT_AXES = ("expert", "embed", "mlp")  # gate and up projections [E, D, F]; sharding.py splits by them


class RoutedExperts(nnx.Module):
  """E SwiGLU experts stored as stacked [E, ...] weights and run with grouped matmuls."""

  def __init__(self, num_experts: int, dim: int, hidden: int, std: float, implementation: str, *,
               rngs: nnx.Rngs, parallel: expert_parallel.ExpertParallel | None = None):
    self.implementation = implementation
    self.parallel = parallel  # how the experts are split over the mesh (None: all here)
    self.gate_proj = layers.param(rngs, (num_experts, dim, hidden), ROUTED_EXPERT_AXES, std)
    self.up_proj = layers.param(rngs, (num_experts, dim, hidden), ROUTED_EXPERT_AXES, std)
    self.down_proj = layers.param(rngs, (num_experts, hidden, dim), ("expert", "mlp", "embed"), std)

  def __call__(self, x_TxD: jnp.ndarray, weights_TxK: jnp.ndarray, experts_TxK: jnp.ndarray) -> jnp.ndarray:
    weights = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
    if self.parallel is None:
      return grouped_experts.routed_swiglu(x_TxD, weights_TxK, experts_TxK, *weights, self.implementation)
    return expert_parallel.routed_swiglu(self.parallel, x_TxD, weights_TxK, experts_TxK, *weights,
                                         self.implementation)


class DeepseekMoE(nnx.Module):
  def __init__(self, config: DeepseekV2Config, *, rngs: nnx.Rngs,
               parallel: expert_parallel.ExpertParallel | None = None):
    self.config = config
    d, std = config.hidden_size, config.initializer_range
    self.gate = layers.param(rngs, (d, config.n_routed_experts), ("embed", "expert"), std)
    self.experts = RoutedExperts(config.n_routed_experts, d, config.moe_intermediate_size, std,
                                 config.moe_implementation, rngs=rngs, parallel=parallel)
    self.shared_experts = (
        layers.SwiGLU(d, config.moe_intermediate_size * config.n_shared_experts, std, rngs=rngs)
        if config.n_shared_experts else None)

  def __call__(self, x_BxSxD: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    batch, seq, d = x_BxSxD.shape
    x_TxD = x_BxSxD.reshape(batch * seq, d)
    # The router runs in float32 whatever the compute dtype, as in the reference code.
    logits_TxE = jnp.einsum("TD,DE->TE", x_TxD.astype(jnp.float32), self.gate[...],
                            preferred_element_type=jnp.float32)
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    weights_TxK, experts_TxK = route(scores_TxE, self.config)
    y_BxSxD = self.experts(x_TxD, weights_TxK, experts_TxK).reshape(batch, seq, d)
    if self.shared_experts is not None:
      y_BxSxD = y_BxSxD + self.shared_experts(x_BxSxD)
    num_experts = self.config.n_routed_experts
    aux = {
        "balance_loss": balance_loss(scores_TxE.reshape(batch, seq, -1),
                                     experts_TxK.reshape(batch, seq, -1), self.config),
        "expert_load": jnp.bincount(experts_TxK.reshape(-1), length=num_experts) / experts_TxK.size,
    }
    return y_BxSxD, aux


def all_experts_reference(layer: DeepseekMoE, x_BxSxD: jnp.ndarray) -> jnp.ndarray:
  """Every expert on every token, masked by the routing: the definition the dropless path must
  equal (tests) and the E/K-times cost it avoids (bench/moe_layer.py). Never used for training."""
  x_TxD = x_BxSxD.reshape(-1, x_BxSxD.shape[-1])
  scores_TxE = jax.nn.softmax(x_TxD @ layer.gate[...], axis=-1)
  weights_TxK, experts_TxK = route(scores_TxE, layer.config)
  combine_TxE = jnp.zeros(scores_TxE.shape).at[jnp.arange(len(x_TxD))[:, None], experts_TxK].add(weights_TxK)
  e = layer.experts
  h_ExTxF = (jax.nn.silu(jnp.einsum("TD,EDF->ETF", x_TxD, e.gate_proj[...]))
             * jnp.einsum("TD,EDF->ETF", x_TxD, e.up_proj[...]))
  y_TxD = jnp.einsum("ETD,TE->TD", jnp.einsum("ETF,EFD->ETD", h_ExTxF, e.down_proj[...]), combine_TxE)
  y_BxSxD = y_TxD.reshape(x_BxSxD.shape)
  return y_BxSxD if layer.shared_experts is None else y_BxSxD + layer.shared_experts(x_BxSxD)
