"""Cross-entropy of a linear output layer, fused: logits never exist beyond one chunk.

`nll(h, w, targets, mask)` is sum_t mask_t * (logsumexp(h_t @ w) - (h_t @ w)[target_t]),
computed `chunk` tokens at a time. Under differentiation the forward pass also forms
each chunk's logit gradient (softmax - one_hot) and folds it straight into dh and dw,
so the backward pass only scales them by the incoming scalar. Against autodiff of
chunked logits this saves the recomputation of every chunk's logits (a fourth
vocabulary-sized matmul) and the [chunk, V] buffers the backward pass would keep
live; against unchunked logits, all but one chunk's memory ([T, V] float32 is 13 GB
for 32K tokens of a 102400 vocabulary).

The loss is a scalar, so its gradient is a scalar multiple of the saved dh, dw; the
per-token values come back too, for metrics, with their gradient stopped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def nll(h_TxD: jax.Array, w_DxV: jax.Array, targets_T: jax.Array, mask_T: jax.Array,
        chunk: int) -> tuple[jax.Array, jax.Array]:
  """(masked nll sum, a float32 scalar; per-token masked nll [T], not differentiable).

  h and w are in the compute dtype; logits are accumulated and normalised in float32.
  A masked token's target may be anything (padding), even out of range.
  """
  tokens = h_TxD.shape[0]
  chunk = max(1, min(chunk, tokens))
  pad = -tokens % chunk
  mask_T = mask_T.astype(jnp.float32)
  if pad:
    h_TxD = jnp.pad(h_TxD, ((0, pad), (0, 0)))
    targets_T, mask_T = jnp.pad(targets_T, (0, pad)), jnp.pad(mask_T, (0, pad))
  total, nll_T = _fused(h_TxD, w_DxV, targets_T, mask_T, chunk)
  return total, jax.lax.stop_gradient(nll_T[:tokens])


def _chunks(chunk: int, *arrays):
  """[T, ...] -> [T / chunk, chunk, ...], chunk n holding tokens n, n + N, n + 2N, ... (N = T / chunk).

  Strided, not contiguous: every chunk spans the whole token range, so where the tokens are split
  over devices (batch rows, a context-parallel sequence) each device computes its own share of
  every chunk, instead of the scan gathering all [T, D] hidden states onto every device.
  """
  return tuple(a.reshape(chunk, -1, *a.shape[1:]).swapaxes(0, 1) for a in arrays)


def _unchunk(x_NxCx):
  return x_NxCx.swapaxes(0, 1).reshape(-1, *x_NxCx.shape[2:])


def _chunk_logits(h_CxD, w_DxV):
  return jnp.einsum("CD,DV->CV", h_CxD, w_DxV, preferred_element_type=jnp.float32)


def _chunk_nll(logits_CxV, targets_C, mask_C):
  logz_C = jax.nn.logsumexp(logits_CxV, axis=-1)
  target_C = jnp.take_along_axis(logits_CxV, jnp.clip(targets_C, 0, logits_CxV.shape[-1] - 1)[:, None], axis=-1)[:, 0]
  return jnp.where(mask_C > 0, (logz_C - target_C) * mask_C, 0.0), logz_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h_TxD, w_DxV, targets_T, mask_T, chunk):
  def step(_, xs):
    h_CxD, targets_C, mask_C = xs
    return None, _chunk_nll(_chunk_logits(h_CxD, w_DxV), targets_C, mask_C)[0]

  _, nll_NxC = jax.lax.scan(step, None, _chunks(chunk, h_TxD, targets_T, mask_T))
  nll_T = _unchunk(nll_NxC)
  return nll_T.sum(), nll_T


def _fused_fwd(h_TxD, w_DxV, targets_T, mask_T, chunk):
  dtype = h_TxD.dtype

  def step(dw_DxV, xs):
    h_CxD, targets_C, mask_C = xs
    logits_CxV = _chunk_logits(h_CxD, w_DxV)
    nll_C, logz_C = _chunk_nll(logits_CxV, targets_C, mask_C)
    # d nll / d logits = softmax - one_hot(target), for the tokens that count.
    one_hot_CxV = jax.nn.one_hot(targets_C, logits_CxV.shape[-1], dtype=jnp.float32)
    dlogits_CxV = ((jnp.exp(logits_CxV - logz_C[:, None]) - one_hot_CxV) * mask_C[:, None]).astype(dtype)
    dh_CxD = jnp.einsum("CV,DV->CD", dlogits_CxV, w_DxV, preferred_element_type=jnp.float32).astype(dtype)
    dw_DxV = dw_DxV + jnp.einsum("CD,CV->DV", h_CxD, dlogits_CxV, preferred_element_type=jnp.float32)
    return dw_DxV, (nll_C, dh_CxD)

  dw_DxV, (nll_NxC, dh_NxCxD) = jax.lax.scan(step, jnp.zeros(w_DxV.shape, jnp.float32),
                                             _chunks(chunk, h_TxD, targets_T, mask_T))
  nll_T = _unchunk(nll_NxC)
  return (nll_T.sum(), nll_T), (_unchunk(dh_NxCxD), dw_DxV.astype(w_DxV.dtype), targets_T, mask_T)


def _fused_bwd(chunk, residuals, cotangents):
  del chunk
  dh_TxD, dw_DxV, targets_T, mask_T = residuals
  d_total, _ = cotangents  # the per-token output's gradient is stopped in `nll`
  return ((dh_TxD * d_total.astype(dh_TxD.dtype)), dw_DxV * d_total.astype(dw_DxV.dtype),
          _zero_cotangent(targets_T), jnp.zeros_like(mask_T))


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.zeros(x.shape, jax.dtypes.float0)
  return jnp.zeros_like(x)


_fused.defvjp(_fused_fwd, _fused_bwd)
