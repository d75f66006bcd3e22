"""Causal attention on NVIDIA GPUs: cuDNN's fused flash attention, packed documents as ragged segments.

`jax.nn.dot_product_attention(implementation="cudnn")` takes no segment ids: it could
only keep packed documents apart with an [S, S] mask, the quadratic memory this path
exists to avoid. cuDNN itself can: its packed ("THD", ragged) layout takes, per batch
row, the start offset and length of each segment, and attends within segments only.
JAX exposes that layout in `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`
(`q_offsets`/`q_seqlen`, cuDNN >= 9.6, Hopper or newer), the function behind jax.nn's
cudnn path; we call it directly, with the causal mask applied within each segment.

Segments are the maximal runs of equal segment id along a row: the packer (data/packing.py)
numbers a row's documents 1, 2, ... and pads its tail with 0, so a run is a document, and
the padding is a run of its own (as in the reference, where padding attends to padding),
which keeps every output position defined. A row can hold up to S runs, and the layout's
arrays need a static size, so they are [B, S] (int32, negligible next to q, k, v).

JAX scales both offset arrays by q's per-token stride, which is right for k, v and the
output only when they share it; so with segment ids, grouped kv heads are repeated to the
query heads and MLA's 128-wide values padded to 192 (zero columns, sliced off), at the cost
of that much more key/value memory and PV work. (v_dim > qk_dim is refused.)

Requirements, checked by `unsupported_reason` (what `auto` consults before choosing this
path): a CUDA GPU, bfloat16 or float16 operands, head dim <= 256 and a multiple of 8, and
for MLA (q/k head dim != v head dim) cuDNN >= 9.10. Under a device mesh the cuDNN call
partitions itself over batch and heads (JAX registers its sharding rules), so no
shard_map is needed here.

No GPU was available where this was written. On CPU (tests/test_attention_backends.py) the
segment layout is checked to describe the reference mask exactly; this wrapper, run
against a plain-JAX emulation of the kernel's packed semantics, to match the reference with
its gradients; and, with a GPU pretended, JAX's own checks of the call to accept what both
model families pass, forward and backward. The kernel itself runs only in tests/test_gpu.py
and bench/gpu.py, on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_CUDNN = 90600  # the packed (ragged) layout
MIN_CUDNN_MLA = 91000  # q/k and v head dims that differ


def packed_layout(segment_ids_BxS: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(seqlen [B, S], offsets [B, S+1]) int32: each row's runs of equal id, in cuDNN's packed layout.

  Run r of row b starts at offsets[b, r] and has seqlen[b, r] positions; unused entries are
  -1 (a row of R runs fills seqlen[b, :R] and offsets[b, :R]).
  """
  batch, seq = segment_ids_BxS.shape
  starts_BxS = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids_BxS[:, 1:] != segment_ids_BxS[:, :-1]], axis=1)
  run_BxS = jnp.cumsum(starts_BxS, axis=1, dtype=jnp.int32) - 1  # which run each position is in
  rows_Bx1 = jnp.arange(batch)[:, None]
  counts_BxS = jnp.zeros((batch, seq), jnp.int32).at[rows_Bx1, run_BxS].add(1)
  seqlen_BxS = jnp.where(counts_BxS > 0, counts_BxS, -1)
  positions_BxS = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  slot_BxS = jnp.where(starts_BxS, run_BxS, seq + 1)  # non-starts scatter out of bounds: dropped
  offsets_BxS1 = jnp.full((batch, seq + 1), -1, jnp.int32).at[rows_Bx1, slot_BxS].set(positions_BxS, mode="drop")
  return seqlen_BxS, offsets_BxS1


def unsupported_reason(q_BxSxNxK, v_BxSxMxV) -> str | None:
  """Why cuDNN's fused attention cannot run these operands here, or None when it can."""
  if jax.default_backend() != "gpu":
    return f"it needs an NVIDIA GPU (the default backend is {jax.default_backend()})"
  if q_BxSxNxK.dtype not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16 or float16 operands (got {q_BxSxNxK.dtype}; set model.dtype)"
  qk_dim, v_dim = q_BxSxNxK.shape[-1], v_BxSxMxV.shape[-1]
  if qk_dim > 256 or qk_dim % 8:
    return f"its head dim must be <= 256 and a multiple of 8 (got {qk_dim})"
  if v_dim > qk_dim:
    return f"v head dim {v_dim} > q/k head dim {qk_dim}"
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    version = cudnn.check_cudnn_version()
  except (ImportError, RuntimeError) as e:
    return f"cuDNN is not available ({e})"
  if version < MIN_CUDNN or not cudnn.check_compute_capability("9.0"):
    return f"packed documents need cuDNN >= 9.6 on a Hopper or newer GPU (cuDNN {version})"
  if qk_dim != v_dim and version < MIN_CUDNN_MLA:
    return f"q/k head dim {qk_dim} != v head dim {v_dim} (MLA) needs cuDNN >= 9.10 (cuDNN {version})"
  return None


def cudnn_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, *, scale: float, segment_ids_BxS: jnp.ndarray | None = None,
                    uniform_strides: bool = True) -> jnp.ndarray:
  """softmax(q k^T * scale + causal/document mask) v -> [B, S, N, V], by cuDNN (raises where it cannot run).

  `uniform_strides=False` hands packed GQA/MLA operands over as they are: only for finding out on a
  GPU whether JAX's packed layout gets their strides right (bench/gpu.py reports it).
  """
  reason = unsupported_reason(q_BxSxNxK, v_BxSxMxV)
  if reason:
    raise ValueError(f"attention_implementation='cudnn' cannot run: {reason}")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  if segment_ids_BxS is None:
    return cudnn.dot_product_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale,
                                       mask_type=cudnn.MaskType.CAUSAL, qkv_layout="BTNH")
  seqlen_BxS, offsets_BxS1 = packed_layout(segment_ids_BxS)
  # JAX turns both offset arrays into element offsets with q's per-token stride (N * K), so k, v
  # (and the output) must have that stride too: kv heads repeated to N, v's head dim padded to K.
  num_heads, qk_dim, v_dim = q_BxSxNxK.shape[2], q_BxSxNxK.shape[3], v_BxSxMxV.shape[3]
  group = num_heads // k_BxSxMxK.shape[2] if uniform_strides else 1
  k_BxSxNxK = jnp.repeat(k_BxSxMxK, group, axis=2)
  pad = qk_dim - v_dim if uniform_strides else 0
  v_BxSxNxK = jnp.pad(jnp.repeat(v_BxSxMxV, group, axis=2), ((0, 0), (0, 0), (0, 0), (0, pad)))
  out_BxSxNxK = cudnn.dot_product_attention(
      q_BxSxNxK, k_BxSxNxK, v_BxSxNxK, q_seqlen=seqlen_BxS, kv_seqlen=seqlen_BxS, q_offsets=offsets_BxS1,
      kv_offsets=offsets_BxS1, scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
  return out_BxSxNxK[..., :v_dim]
