"""Next-token cross-entropy in float32, chunked over tokens, plus the MoE balance loss.

[B, S, V] logits would dominate memory at long context (1 x 32K x 102400 float32 is 13 GB),
so `token_nll` goes through `fused_cross_entropy.nll`: `chunk` tokens' logits at a time,
their gradient folded into dh and dw on the spot, nothing vocabulary-sized kept.

Gradient accumulation. Every value `loss_and_metrics` returns is one micro-batch's share of
the global batch's value, so the trainer sums losses, gradients and metrics over
micro-batches and gets the full-batch ones exactly:
- the cross-entropy is this micro-batch's nll sum divided by `normalizer`, the loss-mask
  token count of the whole global batch (a token-weighted mean, whatever the split);
- the balance loss is per micro-batch (its statistics are per sequence, or per batch without
  `seq_aux`) and is divided by `microbatches`: the sum is the mean over micro-batches, which
  for `seq_aux` and equal micro-batches equals the full-batch value;
- 'expert_load' is divided by `microbatches` likewise; token and nll sums are plain sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pretrain.train import fused_cross_entropy


def per_token_nll(model, h_BxSxD: jax.Array, targets_BxS: jax.Array, loss_mask_BxS: jax.Array,
                  chunk: int) -> tuple[jax.Array, jax.Array]:
  """(masked nll sum, differentiable; masked nll per token [B, S], not differentiable), float32.

  A masked position's target may be anything (padding), even out of range.
  """
  batch, seq, dim = h_BxSxD.shape
  total, nll_T = fused_cross_entropy.nll(h_BxSxD.reshape(batch * seq, dim).astype(model.dtype),
                                         model.output_weights(), targets_BxS.reshape(-1),
                                         loss_mask_BxS.reshape(-1), chunk)
  return total, nll_T.reshape(batch, seq)


def token_nll(model, h_BxSxD: jax.Array, targets_BxS: jax.Array, loss_mask_BxS: jax.Array,
              chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(masked nll sum, differentiable; nll sum per row [B] and loss-mask count per row [B], for metrics).

  All float32. A masked position's target may be anything (padding), even out of range.
  """
  total, nll_BxS = per_token_nll(model, h_BxSxD, targets_BxS, loss_mask_BxS, chunk)
  return total, nll_BxS.sum(axis=-1), loss_mask_BxS.astype(jnp.float32).sum(axis=-1)


def loss_and_metrics(model, batch: dict, *, chunk: int, num_components: int, normalizer: jax.Array | None = None,
                     microbatches: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss to differentiate, and metrics, for one (micro-)batch; see the module docstring for sums.

  normalizer: loss-mask tokens in the whole global batch (`batch['loss_mask'].sum()` before the
    split); default this batch's own count. Clamped to >= 1 so an all-masked batch gives 0.
  microbatches: how many micro-batches the trainer sums; scales the balance loss and expert load.
  """
  h_BxSxD, aux = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll_sum, nll_B, tokens_B = token_nll(model, h_BxSxD, batch["targets"], batch["loss_mask"], chunk)
  tokens = tokens_B.sum()
  normalizer = tokens if normalizer is None else jnp.asarray(normalizer, jnp.float32)
  ce_loss = nll_sum / jnp.maximum(normalizer, 1.0)
  balance_loss = aux["balance_loss"] / microbatches
  loss = ce_loss + balance_loss
  # Each row comes from one mixture component: per-domain sums are segment sums over rows.
  component_B = batch["component"]
  metrics = {
      "loss": loss,
      "ce_loss": ce_loss,
      "balance_loss": balance_loss,
      "nll_sum": nll_sum,
      "tokens": tokens,
      "component_nll_sum": jax.ops.segment_sum(nll_B, component_B, num_segments=num_components),
      "component_tokens": jax.ops.segment_sum(tokens_B, component_B, num_segments=num_components),
  }
  if "expert_load" in aux:
    metrics["expert_load"] = aux["expert_load"] / microbatches  # [moe_layers, n_routed_experts]
  return loss, metrics
