"""cuDNN attention on an NVIDIA GPU (skipped elsewhere: CI has no GPU; run by hand on a lent one).

  PYTHONPATH=. python3 -m pytest -p no:xdist -o addopts= tests/test_gpu.py

bfloat16 cuDNN against the float32 reference on the same (bfloat16-rounded) inputs, packed
documents with padding, for a GQA and an MLA (q/k 192, v 128) shape: outputs and
gradients within bfloat16 error; and `auto` picks cuDNN for bfloat16 operands there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packed_rows import packed_segment_ids

from pretrain.models import attention, cudnn_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim", [(8, 2, 128, 128), (8, 8, 192, 128)])
def test_cudnn_matches_reference_on_packed_documents(heads, kv_heads, qk_dim, v_dim):
  reason = cudnn_attention.unsupported_reason(jnp.zeros((1, 1, 1, qk_dim), jnp.bfloat16),
                                              jnp.zeros((1, 1, 1, v_dim), jnp.bfloat16))
  if reason:
    pytest.skip(reason)
  batch, seq = 2, 1024
  rng = np.random.default_rng(1)
  q, k, v, cotangent = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in [
      (batch, seq, heads, qk_dim), (batch, seq, kv_heads, qk_dim), (batch, seq, kv_heads, v_dim),
      (batch, seq, heads, v_dim)])
  segment_ids = packed_segment_ids(batch, seq, seed=0, min_length=8, padding_divisor=8)

  def value_and_grads(impl, dtype):
    run = lambda q, k, v: attention.attend(q, k, v, scale=qk_dim ** -0.5, segment_ids_BxS=segment_ids,
                                           implementation=impl)
    out, pullback = jax.vjp(run, *(x.astype(dtype) for x in (q, k, v)))
    return [x.astype(jnp.float32) for x in (out, *pullback(cotangent.astype(dtype)))]

  assert attention.resolve("auto", q, v) == "cudnn"
  want = jax.jit(lambda: value_and_grads("reference", jnp.float32))()
  got = jax.jit(lambda: value_and_grads("cudnn", jnp.bfloat16))()
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert float(jnp.max(jnp.abs(g - w))) <= 2e-2 * float(jnp.max(jnp.abs(w))), name
