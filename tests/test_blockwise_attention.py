"""Blockwise (flash) attention against the [S, S] reference: outputs and hand-written
gradients in float32 to 1e-5 (GQA, MLA-style K != V, ragged S, packed documents, one
block), bfloat16, jit/remat, and that no [S, S] buffer exists anywhere in its grad."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain.models import attention
from pretrain.models.blockwise_attention import blockwise_attention

# Uneven packed documents; with block 8 both rows' last query block meets neither row's
# first key block, so the document-level block skipping is exercised too.
DOC_LENGTHS = ([3, 17, 5, 15], [10, 6, 16, 8])


def _segment_ids(seq: int) -> jnp.ndarray:
  # Past 40 positions np.resize wraps round: ids recur out of order, which only equality
  # of ids, as the reference has it, may decide.
  rows = [np.repeat(np.arange(len(lengths)), lengths) for lengths in DOC_LENGTHS]
  return jnp.asarray(np.stack([np.resize(row, seq) for row in rows]), jnp.int32)


def _inputs(batch, seq, heads, kv_heads, qk_dim, v_dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(batch, seq, heads, qk_dim), (batch, seq, kv_heads, qk_dim), (batch, seq, kv_heads, v_dim),
            (batch, seq, heads, v_dim)]
  q, k, v, cotangent = (jnp.asarray(rng.normal(size=s), dtype) for s in shapes)
  return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent, segment_ids):
  """(output, d<out, cotangent>/d(q, k, v)) under jit."""
  def loss(q, k, v):
    out = fn(q, k, v, scale=q.shape[-1] ** -0.5, segment_ids_BxS=segment_ids)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim,seq,block,packed", [
    (4, 2, 24, 16, 40, 16, False),  # GQA, K != V, S not a multiple of the block
    (4, 2, 24, 16, 40, 16, True),
    (4, 2, 24, 16, 40, 8, True),  # 5 blocks, some skipped across documents
    (3, 3, 16, 16, 48, 16, True),  # plain multi-head, S a multiple of the block
    (2, 2, 24, 16, 40, 64, True),  # block >= S: one (diagonal) block
    (4, 2, 24, 16, 40, None, True),  # the default block (clamped to S)
    (2, 2, 8, 8, 40, 1, False),  # degenerate one-position blocks
])
def test_matches_reference_forward_and_gradients(heads, kv_heads, qk_dim, v_dim, seq, block, packed):
  q, k, v, cotangent = _inputs(2, seq, heads, kv_heads, qk_dim, v_dim)
  segment_ids = _segment_ids(seq) if packed else None
  want_out, want_grads = _value_and_grads(attention.dot_product_attention, q, k, v, cotangent, segment_ids)
  ours = blockwise_attention if block is None else functools.partial(blockwise_attention, block=block)
  got_out, got_grads = _value_and_grads(ours, q, k, v, cotangent, segment_ids)
  assert got_out.shape == want_out.shape and got_out.dtype == want_out.dtype
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for name, got, want in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_under_remat_matches_plain_gradients():
  q, k, v, cotangent = _inputs(1, 40, 4, 2, 24, 16)
  segment_ids = _segment_ids(40)[:1]
  fn = functools.partial(blockwise_attention, block=16)
  _, want = _value_and_grads(fn, q, k, v, cotangent, segment_ids)
  _, got = _value_and_grads(jax.checkpoint(fn), q, k, v, cotangent, segment_ids)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6)


def test_bfloat16_is_finite_and_close_to_float32_reference():
  q, k, v, cotangent = _inputs(2, 40, 4, 2, 24, 16)
  segment_ids = _segment_ids(40)
  want_out, want_grads = _value_and_grads(attention.dot_product_attention, q, k, v, cotangent, segment_ids)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, cotangent)]
  got_out, got_grads = _value_and_grads(functools.partial(blockwise_attention, block=16), *bf16, segment_ids)
  assert got_out.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in got_grads)
  np.testing.assert_allclose(got_out.astype(jnp.float32), want_out, atol=3e-2, rtol=3e-2)
  for name, got, want in zip("qkv", got_grads, want_grads):
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all(), name
    # bf16 inputs carry ~3 significant digits; compare at the gradient's own scale.
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max(), name


def _array_sizes(closed_jaxpr):
  """Element counts of every value in a jaxpr, sub-jaxprs (scan, while, cond, pjit) included."""
  def jaxprs_in(value):
    if hasattr(value, "eqns"):
      yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from jaxprs_in(v)

  stack, sizes = [closed_jaxpr.jaxpr], []
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      sizes += [int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape")]
      for param in eqn.params.values():
        stack.extend(jaxprs_in(param))
  return sizes


def test_no_sequence_squared_buffer_in_forward_or_backward():
  seq, block = 4096, 128
  q, k, v, _ = _inputs(1, seq, 1, 1, 16, 16)

  def grad_fn(fn):
    return jax.grad(lambda q, k, v: fn(q, k, v, scale=0.25).sum(), argnums=(0, 1, 2))

  ours = grad_fn(functools.partial(blockwise_attention, block=block))
  reference = grad_fn(attention.dot_product_attention)
  # The reference does hold [S, S] scores, so the check can see one.
  assert max(_array_sizes(jax.make_jaxpr(reference)(q, k, v))) >= seq * seq
  assert max(_array_sizes(jax.make_jaxpr(ours)(q, k, v))) <= seq * block
  # And after XLA: scratch memory stays far below one float32 [S, S] (64 MiB here; ours needs ~1.3 MiB).
  stats = jax.jit(ours).lower(q, k, v).compile().memory_analysis()
  if stats is not None:
    assert stats.temp_size_in_bytes < seq * seq * 4 // 16
