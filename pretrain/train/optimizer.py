"""AdamW with global-norm clipping, a warmup + cosine schedule, and no decay on norms and biases.

The schedule is a function of the update count optax keeps: update k (k = 0 for the first)
uses `learning_rate(k)`. Warmup is linear from 0, as `optax.linear_schedule(0, peak, warmup)`,
so the first update has learning rate 0 (and, AdamW's decay being scaled by it, changes
nothing); update `warmup_steps` is the first at the peak. The cosine then reaches
`end_learning_rate_fraction * peak` exactly at update `total_steps - 1`, the last one, and
would stay there if training went on.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from pretrain.schema import ConfigError
from pretrain.train.config import OptimizerConfig


def learning_rate(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps` updates, cosine decay to the end value at the last update."""
  if total_steps < 1:
    raise ConfigError("train.steps", f"must be >= 1, got {total_steps}")
  peak, warmup, last = config.peak_learning_rate, config.warmup_steps, total_steps - 1
  if warmup >= last:  # the run ends during (or right at the end of) warmup: no room for a decay
    return optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  decay = optax.cosine_decay_schedule(peak, decay_steps=last - warmup, alpha=config.end_learning_rate_fraction)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def _path_name(path: tuple[Any, ...]) -> str:
  """'layers/0/self_attn/q_bias' from a pytree key path (an nnx.State's Variable '.value' step dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      continue  # nnx.Variable nodes flatten through `.value`: not part of the parameter's name
    else:
      parts.append(str(key))
  return "/".join(parts)


def weight_decay_mask(params, no_weight_decay: tuple[str, ...]):
  """Pytree of bools like `params` (a pure dict or an nnx.State): True where weight decay applies.

  A parameter is spared when its '/'-joined path matches one of `no_weight_decay` in full
  (`re.fullmatch`), e.g. 'layers/0/input_layernorm/scale' or 'layers/0/self_attn/q_bias'.
  """
  patterns = [re.compile(p) for p in no_weight_decay]

  def decays(path, _):
    name = _path_name(path)
    return not any(p.fullmatch(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig, total_steps: int, params=None) -> optax.GradientTransformation:
  """clip_by_global_norm then AdamW on the schedule, decoupled decay masked by `no_weight_decay`.

  The mask is computed from whatever tree the optimizer is given (pure dict or nnx.State), so it
  always has the same structure. `params`, when passed, is only checked now: non-empty
  `no_weight_decay` patterns that spare no parameter at all are a typo, and fail at start-up.
  """
  if (params is not None and config.no_weight_decay
      and all(jax.tree_util.tree_leaves(weight_decay_mask(params, config.no_weight_decay)))):
    raise ConfigError("train.optimizer.no_weight_decay",
                      f"{config.no_weight_decay} match no parameter; names look like "
                      f"{_path_name(jax.tree_util.tree_leaves_with_path(params)[0][0])!r}")
  return optax.chain(
      optax.clip_by_global_norm(config.clip_global_norm),
      optax.adamw(learning_rate(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay,
                  mask=lambda tree: weight_decay_mask(tree, config.no_weight_decay)),
  )
