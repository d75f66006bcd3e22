"""The schedule's landmarks, the weight-decay mask on real models, and one AdamW step by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pretrain import models
from pretrain.models import presets
from pretrain.schema import ConfigError
from pretrain.train import optimizer as opt
from pretrain.train.config import OptimizerConfig

PEAK = 4.2e-4


def _lr(schedule, step):
  return float(schedule(jnp.asarray(step)))


def test_paper_schedule_landmarks():
  # 2000 warmup updates, then 8000 of cosine: update 10000 is the last of 10001.
  schedule = opt.learning_rate(OptimizerConfig(peak_learning_rate=PEAK), total_steps=10001)
  assert _lr(schedule, 0) == 0.0
  np.testing.assert_allclose(_lr(schedule, 1000), PEAK / 2, rtol=1e-6)
  np.testing.assert_allclose(_lr(schedule, 2000), PEAK, rtol=1e-6)
  np.testing.assert_allclose(_lr(schedule, 6000), (PEAK + 0.1 * PEAK) / 2, rtol=1e-6)
  np.testing.assert_allclose(_lr(schedule, 10000), 0.1 * PEAK, rtol=1e-6)
  np.testing.assert_allclose(_lr(schedule, 12345), 0.1 * PEAK, rtol=1e-6)  # past the end: stays

  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(10001)))
  assert np.all(np.diff(lrs[:2001]) > 0)  # warmup rises
  assert np.all(np.diff(lrs[2000:]) <= 0)  # decay falls
  assert lrs.max() == pytest.approx(PEAK, rel=1e-6)


def test_schedule_edge_cases():
  warmup_only = opt.learning_rate(OptimizerConfig(peak_learning_rate=PEAK, warmup_steps=100), total_steps=50)
  np.testing.assert_allclose(_lr(warmup_only, 49), PEAK * 49 / 100, rtol=1e-6)
  np.testing.assert_allclose(_lr(warmup_only, 500), PEAK, rtol=1e-6)  # warmup, then stays
  no_warmup = opt.learning_rate(OptimizerConfig(peak_learning_rate=PEAK, warmup_steps=0), total_steps=11)
  np.testing.assert_allclose(_lr(no_warmup, 0), PEAK, rtol=1e-6)
  np.testing.assert_allclose(_lr(no_warmup, 10), 0.1 * PEAK, rtol=1e-6)
  one_step = opt.learning_rate(OptimizerConfig(peak_learning_rate=PEAK, warmup_steps=0), total_steps=1)
  np.testing.assert_allclose(_lr(one_step, 0), PEAK, rtol=1e-6)
  with pytest.raises(ConfigError):
    opt.learning_rate(OptimizerConfig(), total_steps=0)


def _names(tree) -> dict[str, bool]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): bool(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen2"])
def test_mask_spares_exactly_norms_and_biases(preset):
  model = models.build(presets.get(preset))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  decay = _names(opt.weight_decay_mask(params, OptimizerConfig().no_weight_decay))
  spared = {name for name, d in decay.items() if not d}
  expected = {name for name in decay
              if name.endswith(("layernorm/scale", "_bias")) or name == "norm/scale"}
  assert spared == expected
  # Stacked (scanned) blocks: layers/<stack>/block/...
  assert "layers/0/block/input_layernorm/scale" in spared and "norm/scale" in spared
  assert decay["embed_tokens/table"] and decay["layers/0/block/self_attn/o_proj"]
  if preset == "tiny-qwen2":
    assert {"layers/0/block/self_attn/q_bias", "layers/0/block/self_attn/k_bias",
            "layers/0/block/self_attn/v_bias"} <= spared
  else:
    assert "layers/1/block/self_attn/kv_a_layernorm/scale" in spared
    assert (decay["lm_head"] and decay["layers/1/block/mlp/experts/gate_proj"]
            and decay["layers/1/block/mlp/gate"])
  # The same mask from an nnx.State, the tree nnx.Optimizer hands to optax.
  state_mask = opt.weight_decay_mask(nnx.state(model, nnx.Param), OptimizerConfig().no_weight_decay)
  assert jax.tree_util.tree_leaves(state_mask) == jax.tree_util.tree_leaves(
      opt.weight_decay_mask(params, OptimizerConfig().no_weight_decay))


def test_patterns_that_match_nothing_fail_at_start_up():
  params = {"layers": {"0": {"mlp": {"up_proj": jnp.ones(2)}, "input_layernorm": {"scale": jnp.ones(2)}}}}
  with pytest.raises(ConfigError, match="no_weight_decay"):
    opt.make_optimizer(OptimizerConfig(no_weight_decay=(r"layernorm/scale",)), 10, params)
  opt.make_optimizer(OptimizerConfig(), 10, params)
  opt.make_optimizer(OptimizerConfig(no_weight_decay=()), 10, params)  # decay everything: allowed


def _hand_adamw_first_step(config: OptimizerConfig, lr: float, param, grad, decays: bool):
  """AdamW's first update, bias-corrected, with decoupled decay: p - lr * (m/(sqrt(v)+eps) + wd*p)."""
  m_hat = grad  # (1 - b1) * g / (1 - b1)
  v_hat = grad * grad  # (1 - b2) * g^2 / (1 - b2)
  step = m_hat / (np.sqrt(v_hat) + config.eps) + (config.weight_decay * param if decays else 0.0)
  return param - lr * step


@pytest.mark.parametrize("preset", [pytest.param("tiny-deepseek-v2", marks=pytest.mark.slow), "tiny-qwen2"])
def test_one_step_matches_hand_adamw(preset):
  # No warmup, so the first update uses the peak; a large eps keeps the update sensitive to clipping.
  config = OptimizerConfig(peak_learning_rate=1e-2, warmup_steps=0, eps=1e-3, weight_decay=0.5)
  model = models.build(presets.get(preset))
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, opt.make_optimizer(config, 100, before), wrt=nnx.Param)
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), nnx.state(model, nnx.Param))
  norm = float(optax.tree.norm(grads))
  assert norm > 1.0  # so clipping at 1.0 acts
  optimizer.update(model, grads)

  decays = _names(opt.weight_decay_mask(before, config.no_weight_decay))
  names = list(decays)
  flat_before = dict(zip(names, map(np.asarray, jax.tree_util.tree_leaves(before))))
  flat_grads = {n: np.asarray(g) / norm for n, g in zip(names, jax.tree_util.tree_leaves(grads))}
  flat_after = dict(zip(names, map(np.asarray, jax.tree_util.tree_leaves(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))))))
  assert not all(decays.values())
  for name in names:
    expected = _hand_adamw_first_step(config, 1e-2, flat_before[name], flat_grads[name], decays[name])
    np.testing.assert_allclose(flat_after[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_clipping_at_one():
  config = OptimizerConfig(warmup_steps=0)
  params = {"w": jnp.zeros((3,)), "b": {"x_bias": jnp.zeros((4,))}}
  grads = {"w": jnp.full((3,), 3.0), "b": {"x_bias": jnp.full((4,), 4.0)}}
  np.testing.assert_allclose(optax.tree.norm(grads), np.sqrt(27 + 64), rtol=1e-6)
  tx = opt.make_optimizer(config, 10, params)
  _, state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")  # (1 - b1) * the clipped gradient
  clipped = jax.tree.map(lambda m: m / (1 - config.b1), mu)
  np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
  np.testing.assert_allclose(clipped["w"], 3.0 / np.sqrt(91), rtol=1e-6)
  small = jax.tree.map(lambda g: g * 0.01, grads)  # under the threshold: untouched
  _, state = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], (1 - config.b1) * 0.03, rtol=1e-6)


def test_defaults_follow_the_paper():
  config = OptimizerConfig()
  assert (config.b1, config.b2, config.weight_decay, config.warmup_steps) == (0.9, 0.95, 0.1, 2000)
  assert config.end_learning_rate_fraction == 0.1 and config.clip_global_norm == 1.0
