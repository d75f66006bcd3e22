"""Building blocks shared by both families.

Every weight is an `nnx.Param` whose `out_sharding` metadata holds logical axis
names (vocab, embed, heads, kv_heads, head_dim, mlp, expert, q_lora, kv_lora,
norm). One table in the training config maps them to mesh axes; nothing here
knows about devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: Axes, std: float | None) -> nnx.Param:
  """A float32 parameter: normal(0, std) initialised, or ones when std is None (norm scales)."""
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.ones(shape, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  # Axis names are metadata only; the trainer places parameters through its logical-axis table.
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def zeros(shape: tuple[int, ...], axes: Axes) -> nnx.Param:
  """A float32 parameter initialised to zero (biases)."""
  return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def einsum(spec: str, x: jnp.ndarray, w: nnx.Param | jnp.ndarray, dtype, out_dtype=None) -> jnp.ndarray:
  """x @ w in the compute dtype (result in `out_dtype`, default the same); parameters are
  stored float32 and cast here.

  A weight contraction (x's trailing axes against all of w's leading or trailing axes:
  "BSD,DNH->BSNH", "BSNH,NHD->BSD", "BSD,VD->BSV") runs as one 2-D matmul on flattened
  operands. XLA:CPU runs the multi-axis dot_generals of these einsums' gradients (e.g.
  "BSD,BSF->DF") much slower than a plain [rows, k] @ [k, cols]: 2x on an MLP's backward
  pass. Any other spec goes to jnp.einsum.
  """
  out_dtype = dtype if out_dtype is None else out_dtype
  x = x.astype(dtype)
  w = (w[...] if isinstance(w, nnx.Param) else w).astype(dtype)
  inputs, out_axes = spec.replace(" ", "").split("->")
  x_axes, w_axes = inputs.split(",")
  contracted = "".join(a for a in x_axes if a in w_axes)
  lead = x_axes[:len(x_axes) - len(contracted)]
  if not contracted or not x_axes.endswith(contracted):
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
  if w_axes.startswith(contracted) and out_axes == lead + w_axes[len(contracted):]:
    w_KxO = w.reshape(math.prod(w.shape[:len(contracted)]), -1)  # w is [contracted..., kept...]
    kept_shape = w.shape[len(contracted):]
  elif w_axes.endswith(contracted) and out_axes == lead + w_axes[:-len(contracted)]:
    w_KxO = w.reshape(-1, math.prod(w.shape[-len(contracted):])).T  # w is [kept..., contracted...]
    kept_shape = w.shape[:-len(contracted)]
  else:
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
  lead_shape = x.shape[:len(lead)]
  y_RxO = jnp.dot(x.reshape(math.prod(lead_shape), -1), w_KxO, preferred_element_type=out_dtype)
  return y_RxO.reshape(*lead_shape, *kept_shape)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ("norm",), std=None)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * normed.astype(x.dtype)).astype(x.dtype)


class Embedding(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, std: float, *, rngs: nnx.Rngs):
    self.table = param(rngs, (vocab_size, dim), ("vocab", "embed"), std)

  def __call__(self, input_ids_BxS: jnp.ndarray, dtype) -> jnp.ndarray:
    return jnp.take(self.table[...], input_ids_BxS, axis=0).astype(dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)): the dense MLP of both families and DeepSeek's shared experts."""

  def __init__(self, dim: int, hidden: int, std: float, *, rngs: nnx.Rngs):
    self.gate_proj = param(rngs, (dim, hidden), ("embed", "mlp"), std)
    self.up_proj = param(rngs, (dim, hidden), ("embed", "mlp"), std)
    self.down_proj = param(rngs, (hidden, dim), ("mlp", "embed"), std)

  def __call__(self, x_BxSxD: jnp.ndarray) -> jnp.ndarray:
    dtype = x_BxSxD.dtype
    gate_BxSxF = einsum("BSD,DF->BSF", x_BxSxD, self.gate_proj, dtype)
    up_BxSxF = einsum("BSD,DF->BSF", x_BxSxD, self.up_proj, dtype)
    return einsum("BSF,FD->BSD", jax.nn.silu(gate_BxSxF) * up_BxSxF, self.down_proj, dtype)


def decode_softmax(scores_cache, scores_self, valid_cache):
  """Softmax of a new token's query over its row's cached keys (where `valid_cache`, broadcast to
  scores_cache [..., T]) and its own key (scores_self [...]) -> (probabilities [..., T], [...]).

  Decoding keeps the new token's key and value out of the cache until every layer has run
  (kv_cache.write updates the whole cache once per step, in place), so the attention takes them
  as a separate term; scores and probabilities in float32.
  """
  scores_cache = jnp.where(valid_cache, scores_cache.astype(jnp.float32), -jnp.inf)
  scores_self = scores_self.astype(jnp.float32)
  peak = jnp.maximum(scores_cache.max(axis=-1), scores_self)  # finite: the token's own score is
  e_cache = jnp.exp(scores_cache - peak[..., None])
  e_self = jnp.exp(scores_self - peak)
  total = e_cache.sum(axis=-1) + e_self
  return e_cache / total[..., None], e_self / total
