"""The train state and one optimizer step: micro-batched gradients, a guard against bad updates.

State (a pytree, checkpointed whole): `params` (nnx.State of float32 parameters),
`opt_state` (optax), `step`, `grad_norms` (the last GRAD_NORM_WINDOW accepted gradient
norms, NaN-padded, for the spike test), `bad_steps` (consecutive skipped updates) and
`skipped` (all skipped updates).

The global batch is split into `microbatches` sequential parts whose gradients are
summed; the cross-entropy of each part is normalised by the token count of the whole
batch, so the sum is exactly the full batch's gradient. An update is skipped (state
unchanged but for the counters) when the loss or gradient norm is not finite, or the
norm exceeds `grad_spike_factor` times the median of recent accepted norms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pretrain.train import loss as loss_lib
from pretrain.train.config import TrainConfig

GRAD_NORM_WINDOW = 64
MIN_HISTORY = 8  # accepted steps before the spike test applies


def init_state(params: nnx.State, tx: optax.GradientTransformation | None, opt_state=None) -> dict[str, Any]:
  return {
      "params": params,
      "opt_state": tx.init(params) if opt_state is None else opt_state,
      "step": jnp.zeros((), jnp.int32),
      "grad_norms": jnp.full((GRAD_NORM_WINDOW,), jnp.nan, jnp.float32),
      "bad_steps": jnp.zeros((), jnp.int32),
      "skipped": jnp.zeros((), jnp.int32),
  }


def restart_state(state: dict[str, Any]) -> dict[str, Any]:
  """`state` at step 0 of a new stage: parameters and Adam moments kept, the schedule and guard restarted."""
  def restart(leaf):
    return leaf._replace(count=jnp.zeros_like(leaf.count)) if isinstance(leaf, optax.ScaleByScheduleState) else leaf

  fresh = init_state(state["params"], None, opt_state=jax.tree.map(
      restart, state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)))
  return fresh


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: TrainConfig,
                    num_components: int):
  microbatches = config.microbatches

  def micro_loss(params, batch, normalizer):
    model = nnx.merge(graphdef, params)
    return loss_lib.loss_and_metrics(model, batch, chunk=config.loss_chunk, num_components=num_components,
                                     normalizer=normalizer, microbatches=microbatches)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    params = state["params"]
    normalizer = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    if microbatches == 1:
      (loss, metrics), grads = grad_fn(params, batch, normalizer)
    else:
      parts = jax.tree.map(lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch)

      def accumulate(carry, part):
        (loss, metrics), grads = grad_fn(params, part, normalizer)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      # Each part's loss and metrics are its share of the whole batch's (loss.py), so they add up.
      # Starting from zeros (x + 0 == x exactly) keeps one traced copy of the gradient in the scan body.
      first = jax.tree.map(lambda x: x[0], parts)
      (loss, metrics), grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                            jax.eval_shape(grad_fn, params, first, normalizer))
      (loss, metrics, grads), _ = jax.lax.scan(accumulate, (loss, metrics, grads), parts)

    grad_norm = optax.tree.norm(grads)
    history = state["grad_norms"]
    accepted = jnp.sum(jnp.isfinite(history))
    median = jnp.nanmedian(history)
    spike = (accepted >= MIN_HISTORY) & (grad_norm > config.grad_spike_factor * median)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~spike

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A cond, not a select per leaf: the select would read and write every parameter and
    # moment once more per step (about a tenth of a CPU step for a 40M-parameter model).
    new_params, opt_state = jax.lax.cond(ok, update, lambda *old: old, params, state["opt_state"])
    new_state = {
        "params": new_params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "grad_norms": jnp.where(ok, jnp.roll(history, 1).at[0].set(grad_norm), history),
        "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
    }
    metrics = dict(metrics, grad_norm=grad_norm, update_skipped=(~ok).astype(jnp.float32),
                   bad_steps=new_state["bad_steps"], skipped_updates=new_state["skipped"])
    return new_state, metrics

  return train_step
