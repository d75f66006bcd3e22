"""The chunked cross-entropy against plain log_softmax, masking, per-component sums, and
gradient accumulation: summed micro-batch gradients equal the full batch's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain import models
from pretrain.models import presets
from pretrain.train.loss import loss_and_metrics, token_nll

FAMILIES = ["tiny-deepseek-v2", "tiny-qwen2"]
VOCAB = 1024


def _batch(batch=4, seq=10, seed=0) -> dict[str, jax.Array]:
  k_in, k_tgt, k_mask = jax.random.split(jax.random.key(seed), 3)
  # Two documents per row, and a loss mask with holes (as at document boundaries and padding).
  segment_ids = jnp.where(jnp.arange(seq) < seq // 2, 1, 2)[None].repeat(batch, 0).astype(jnp.int32)
  positions = jnp.where(segment_ids == 1, jnp.arange(seq), jnp.arange(seq) - seq // 2).astype(jnp.int32)
  return {
      "inputs": jax.random.randint(k_in, (batch, seq), 0, VOCAB, dtype=jnp.int32),
      "targets": jax.random.randint(k_tgt, (batch, seq), 0, VOCAB, dtype=jnp.int32),
      "segment_ids": segment_ids,
      "positions": positions,
      "loss_mask": (jax.random.uniform(k_mask, (batch, seq)) > 0.3).astype(jnp.float32),
      "component": jnp.arange(batch, dtype=jnp.int32) % 3,
  }


def _reference_nll(model, batch):
  """Plain log_softmax over the full [B, S, V] logits: (nll sum per row, token count per row)."""
  h, _ = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  logp = jax.nn.log_softmax(model.logits(h), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return (nll * batch["loss_mask"]).sum(-1), batch["loss_mask"].sum(-1)


def _chunked_nll(model, batch, chunk):
  h, _ = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  return token_nll(model, h, batch["targets"], batch["loss_mask"], chunk)


def _assert_trees_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 3, 10, 40, 45])  # 4 x 10 tokens: one per token, ragged, whole, longer
def test_chunked_equals_full_logits(preset, chunk):
  model = models.build(presets.get(preset))
  batch = _batch()
  total, nll, count = _chunked_nll(model, batch, chunk)
  nll_ref, count_ref = _reference_nll(model, batch)
  assert nll.shape == (4,) and nll.dtype == jnp.float32 and count.dtype == jnp.float32 and total.shape == ()
  np.testing.assert_allclose(nll, nll_ref, rtol=1e-6)
  np.testing.assert_allclose(total, nll_ref.sum(), rtol=1e-6)
  np.testing.assert_array_equal(count, count_ref)

  grads = nnx.grad(lambda m: _chunked_nll(m, batch, chunk)[0])(model)
  grads_ref = nnx.grad(lambda m: _reference_nll(m, batch)[0].sum())(model)
  # dw sums the chunks in order, not as one matmul: float32 rounding of a sum of up to 40 terms.
  _assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", FAMILIES)
def test_masked_tokens_contribute_nothing(preset):
  model = models.build(presets.get(preset))
  batch = _batch()
  h, _ = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  masked = batch["loss_mask"] == 0
  # Anything at masked targets, out-of-range ids included, changes nothing.
  garbage = jnp.where(masked, jnp.array([-1, VOCAB + 7])[jnp.arange(10) % 2], batch["targets"])
  for clean, dirty in zip(token_nll(model, h, batch["targets"], batch["loss_mask"], 3),
                          token_nll(model, h, garbage, batch["loss_mask"], 3), strict=True):
    np.testing.assert_array_equal(clean, dirty)
  # No gradient reaches the hidden state of a masked position.
  grad_h = jax.grad(lambda h: token_nll(model, h, garbage, batch["loss_mask"], 3)[0])(h)
  assert np.all(np.isfinite(grad_h))
  assert np.all(grad_h[masked] == 0) and np.any(grad_h[~masked] != 0)
  # An all-masked batch: zero loss, zero tokens, no NaN.
  empty = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
  loss, metrics = loss_and_metrics(model, empty, chunk=4, num_components=3)
  assert float(metrics["tokens"]) == 0 and float(metrics["ce_loss"]) == 0 and np.isfinite(float(loss))


@pytest.mark.parametrize("preset", FAMILIES)
def test_loss_and_metrics(preset):
  model = models.build(presets.get(preset))
  batch = _batch()
  loss, metrics = loss_and_metrics(model, batch, chunk=4, num_components=3)
  nll_ref, count_ref = _reference_nll(model, batch)
  _, aux = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  np.testing.assert_allclose(metrics["ce_loss"], nll_ref.sum() / count_ref.sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics["balance_loss"], aux["balance_loss"], rtol=1e-6)
  np.testing.assert_allclose(loss, metrics["ce_loss"] + metrics["balance_loss"], rtol=1e-6)
  assert metrics["loss"] is loss and float(metrics["tokens"]) == float(count_ref.sum())
  # Per-component sums: rows 0 and 3 are component 0, row 1 component 1, row 2 component 2.
  assert metrics["component_nll_sum"].shape == metrics["component_tokens"].shape == (3,)
  np.testing.assert_allclose(metrics["component_nll_sum"],
                             [nll_ref[0] + nll_ref[3], nll_ref[1], nll_ref[2]], rtol=1e-6)
  np.testing.assert_array_equal(metrics["component_tokens"], [count_ref[0] + count_ref[3], count_ref[1],
                                                               count_ref[2]])
  np.testing.assert_allclose(metrics["component_nll_sum"].sum(), metrics["nll_sum"], rtol=1e-6)
  np.testing.assert_array_equal(metrics["component_tokens"].sum(), metrics["tokens"])
  if preset == "tiny-deepseek-v2":
    assert float(metrics["balance_loss"]) > 0
    np.testing.assert_array_equal(metrics["expert_load"], aux["expert_load"])
  else:
    assert float(metrics["balance_loss"]) == 0 and "expert_load" not in metrics


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_microbatch_gradients_sum_to_full_batch(preset):
  model = models.build(presets.get(preset))
  batch = _batch(batch=4)
  assert batch["loss_mask"][:2].sum() != batch["loss_mask"][2:].sum()  # unequal counts: the normalizer matters

  @nnx.jit(static_argnames=("microbatches",))
  def grads_and_metrics(model, batch, normalizer, microbatches):
    def loss_fn(model):
      return loss_and_metrics(model, batch, chunk=3, num_components=3, normalizer=normalizer,
                              microbatches=microbatches)
    return nnx.grad(loss_fn, has_aux=True)(model)

  full_grads, full_metrics = grads_and_metrics(model, batch, None, 1)
  global_tokens = batch["loss_mask"].sum()
  halves = [jax.tree.map(lambda x: x[:2], batch), jax.tree.map(lambda x: x[2:], batch)]
  parts = [grads_and_metrics(model, half, global_tokens, 2) for half in halves]
  summed_grads = jax.tree.map(lambda a, b: a + b, parts[0][0], parts[1][0])
  summed_metrics = jax.tree.map(lambda a, b: a + b, parts[0][1], parts[1][1])
  # The CE part always; for DeepSeek-V2 (seq_aux) the balance loss too, micro-batches being equal.
  _assert_trees_close(summed_grads, full_grads, rtol=1e-6, atol=1e-6)
  _assert_trees_close(summed_metrics, full_metrics, rtol=1e-6, atol=1e-7)
