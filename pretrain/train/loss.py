"""Next-token cross-entropy in float32, chunked over the sequence, plus the MoE balance loss.

[B, S, V] logits would dominate memory at long context (1 x 32K x 102400 float32 is 13 GB),
so `token_nll` scans over chunks of `chunk` positions: each chunk's logits exist only inside
its step, and `jax.checkpoint` makes the backward pass recompute them instead of keeping
them, so at most one [B, chunk, V] block is live in either direction.

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
from flax import nnx


def token_nll(model, h_BxSxD: jax.Array, targets_BxS: jax.Array, loss_mask_BxS: jax.Array,
              chunk: int) -> tuple[jax.Array, jax.Array]:
  """(masked nll sum per row [B], loss-mask count per row [B]), both float32.

  `model.logits` is applied `chunk` positions at a time; S need not be a multiple of `chunk`
  (the last chunk is padded and the padding masked).
  """
  batch, seq, dim = h_BxSxD.shape
  chunk = min(chunk, seq)
  num_chunks = -(-seq // chunk)
  pad = num_chunks * chunk - seq
  mask_BxS = loss_mask_BxS.astype(jnp.float32)
  if pad:
    h_BxSxD = jnp.pad(h_BxSxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxS = jnp.pad(targets_BxS, ((0, 0), (0, pad)))
    mask_BxS = jnp.pad(mask_BxS, ((0, 0), (0, pad)))
  # Chunks lead so lax.scan walks them: [N, B, C, ...].
  h_NxBxCxD = h_BxSxD.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
  targets_NxBxC = targets_BxS.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
  mask_NxBxC = mask_BxS.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

  # The parameters enter as an explicit argument so the transforms see (and differentiate) them.
  graphdef, state = nnx.split(model)

  def chunk_nll(state, h_BxCxD, targets_BxC, mask_BxC):
    logits_BxCxV = nnx.merge(graphdef, state).logits(h_BxCxD).astype(jnp.float32)
    logz_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    # where, not only multiply: a masked position's target may be anything (padding), even out of range.
    return jnp.where(mask_BxC > 0, (logz_BxC - target_logit_BxC) * mask_BxC, 0.0).sum(axis=-1)

  if num_chunks == 1:
    # One chunk: its logits are live in full anyway, so recomputing them in the backward pass
    # (a third lm_head matmul, the largest in a small model) would buy no memory.
    return chunk_nll(state, h_BxSxD, targets_BxS, mask_BxS), mask_BxS.sum(axis=-1)
  remat_nll = jax.checkpoint(chunk_nll, prevent_cse=False)

  def step(nll_B, xs):
    h_BxCxD, targets_BxC, mask_BxC = xs
    return nll_B + remat_nll(state, h_BxCxD, targets_BxC, mask_BxC), None

  # Recompute each chunk's logits in the backward pass rather than keep them. prevent_cse=False:
  # under scan there is no common subexpression to guard against (jax.checkpoint docs).
  nll_B, _ = jax.lax.scan(step, jnp.zeros((batch,), jnp.float32), (h_NxBxCxD, targets_NxBxC, mask_NxBxC))
  return nll_B, mask_BxS.sum(axis=-1)


def loss_and_metrics(model, batch: dict, *, chunk: int, num_components: int, normalizer: jax.Array | None = None,
                     microbatches: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss to differentiate, and metrics, for one (micro-)batch; see the module docstring for sums.

  normalizer: loss-mask tokens in the whole global batch (`batch['loss_mask'].sum()` before the
    split); default this batch's own count. Clamped to >= 1 so an all-masked batch gives 0.
  microbatches: how many micro-batches the trainer sums; scales the balance loss and expert load.
  """
  h_BxSxD, aux = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll_B, tokens_B = token_nll(model, h_BxSxD, batch["targets"], batch["loss_mask"], chunk)
  nll_sum, tokens = nll_B.sum(), tokens_B.sum()
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
