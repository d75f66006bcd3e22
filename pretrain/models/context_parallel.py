"""Context parallelism: causal attention over a sequence split across the `context` mesh axis.

For 128K-token rows one device cannot hold every layer's activations of a whole row, so
the trainer splits each row's tokens over the `n` devices of the context axis (the
`sequence` axis rule). Everything in the model but attention works token by token; here
attention runs in a `shard_map` as ring attention: each device keeps its own queries and
passes its keys and values (with their segment ids) to the next device, n - 1 times,
folding each visiting block into the queries' online softmax (running max, normaliser and
output: `blockwise_attention.forward_blocks`, the same FlashAttention-2 kernel, continued
across ring steps). Memory stays linear in the sequence: a device holds S/n queries, its
own, the visiting and the next visitor's S/n keys and values, and one tile of scores. The
backward pass (a `jax.custom_vjp`) goes round the ring again from the saved output and
logsumexp, carrying each key block's dk and dv with it until they are back home.

Load balancing (zigzag). With contiguous chunks, the device holding the end of the row
would attend to every key while the first attends to few. Instead the row is cut into 2n
chunks and device i holds chunks i and 2n-1-i (`zigzag_order`); the trainer lays every
[B, S] batch array out in that order on the host (`to_zigzag`), a free permutation since
only attention looks across tokens. Then every ring step is the same work on every
device: from a device before it in the ring (s < i), all 2C local queries against the
visitor's first chunk; from one after it (s > i), the local second chunk against both
visiting chunks (C = S/2n). Which chunk precedes which is known from the layout alone,
so the causal mask needs no positions, and packed documents are masked by segment id.
A model whose attention layers have `context_parallel` set must therefore be given its
rows in zigzag order, with their positions (the default arange would be wrong).

Keys and values travel rather than being all-gathered: a gather would hold the whole
sequence's keys and values on every device (for MLA with 128 heads, GBs per layer at
128K tokens). The next block's transfer is issued before the current block's compute,
so XLA can overlap the two.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from pretrain.models import blockwise_attention as bw


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  mesh: Mesh
  batch_axes: tuple[str, ...]  # mesh axes the batch rows are split over
  seq_axes: tuple[str, ...]  # mesh axes the tokens of a row are split over (the ring), zigzag order
  head_axes: tuple[str, ...] = ()  # mesh axes heads are split over, where they divide q and kv heads
  block: int | None = None  # kernel tile; default: the largest divisor of a chunk up to default_block

  @property
  def ways(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.seq_axes)


def zigzag_order(seq: int, ways: int) -> np.ndarray:
  """[S] the row position held at each place of the zigzag layout: device i's S/n places hold chunks i, 2n-1-i."""
  if seq % (2 * ways):
    raise ValueError(f"a sequence of {seq} does not split into 2 x {ways} equal chunks")
  chunk = seq // (2 * ways)
  chunks = np.stack([np.arange(ways), 2 * ways - 1 - np.arange(ways)], axis=1).reshape(-1)
  return (chunks[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def to_zigzag(batch: dict[str, np.ndarray], ways: int) -> dict[str, np.ndarray]:
  """Every [B, S, ...] array of a host batch in zigzag order along S; [B] arrays unchanged."""
  seq = next(x.shape[1] for x in batch.values() if x.ndim >= 2)
  order = zigzag_order(seq, ways)
  return {name: x[:, order] if x.ndim >= 2 else x for name, x in batch.items()}


def from_zigzag(x_BxSx___, ways: int):
  """The inverse of `to_zigzag` for one array: row order along axis 1."""
  return x_BxSx___[:, np.argsort(zigzag_order(x_BxSx___.shape[1], ways))]


def attention(parallel: ContextParallel, q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, *, scale: float,
              segment_ids_BxS: jnp.ndarray | None = None) -> jnp.ndarray:
  """Causal attention within packed documents -> [B, S, N, V], S in zigzag order and split over seq_axes.

  The same values as `blockwise_attention` on the rows in their own order (`from_zigzag`
  of this output); N query heads share M = N/G key/value heads, K and V may differ.
  """
  batch, seq, num_heads, _ = q_BxSxNxK.shape
  kv_heads, ways = k_BxSxMxK.shape[2], parallel.ways
  if ways == 1:  # nothing to go round (and the zigzag order is the row's own)
    return bw.blockwise_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, scale=scale, segment_ids_BxS=segment_ids_BxS,
                                  block=parallel.block)
  if seq % (2 * ways):
    raise ValueError(f"context parallelism over {ways} devices needs the sequence ({seq}) divisible by {2 * ways}")
  mesh = parallel.mesh
  rows = dividing(parallel.batch_axes, batch, mesh)
  heads = dividing(parallel.head_axes, math.gcd(num_heads, kv_heads), mesh)
  tokens = PartitionSpec(rows, parallel.seq_axes)
  per_head = PartitionSpec(rows, parallel.seq_axes, heads, None)
  ring = _Ring(parallel.seq_axes, ways)

  def local(q_BxLxNxK, k_BxLxMxK, v_BxLxMxV, seg_BxL):
    chunk = q_BxLxNxK.shape[1] // 2
    block = _block(chunk, parallel.block)
    local_kv_heads = k_BxLxMxK.shape[2]
    q_scaled = q_BxLxNxK * jnp.asarray(scale, q_BxLxNxK.dtype)
    out_NbxBxMxRxV = _ring_attention(
        ring, bw.to_blocks(q_scaled, local_kv_heads, block), bw.to_blocks(k_BxLxMxK, local_kv_heads, block),
        bw.to_blocks(v_BxLxMxV, local_kv_heads, block), None if seg_BxL is None else bw.segment_blocks(seg_BxL, block))
    return bw.from_blocks(out_NbxBxMxRxV, q_BxLxNxK.shape[2] // local_kv_heads, block)

  return jax.shard_map(
      local, mesh=mesh, in_specs=(per_head, per_head, per_head, None if segment_ids_BxS is None else tokens),
      out_specs=per_head, check_vma=False,
  )(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, segment_ids_BxS)


def dividing(axes: tuple[str, ...], size: int, mesh: Mesh):
  """The longest prefix of `axes` whose devices divide `size`, as a PartitionSpec entry."""
  axes = list(axes)
  while axes and size % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes) or None


def _block(chunk: int, block: int | None) -> int:
  """The kernel tile: the largest divisor of the chunk up to `block` (default: default_block of 2 chunks).

  Tiles never straddle chunks, so a ring step's half of the queries or keys is whole blocks.
  """
  target = min(chunk, bw.default_block(2 * chunk) if block is None else block)
  return next(b for b in range(target, 0, -1) if chunk % b == 0)


# --- the ring, inside the shard_map: blocked operands [nb, B, M, R or C, D] -------------------
#
# A device's nb blocks are its two chunks, nb/2 blocks each: the first half chunk i, the
# second chunk 2n-1-i. Step t brings the keys and values of device s = i - t (mod n).


@dataclasses.dataclass(frozen=True)
class _Ring:
  axes: tuple[str, ...]
  ways: int


def _shift(ring: _Ring, tree):
  """Every array of `tree` sent one device along the ring (i -> i + 1); None stays None."""
  perm = [(j, (j + 1) % ring.ways) for j in range(ring.ways)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axes, perm), tree)


def _around_ring(ring: _Ring, visit, kv, carry):
  """carry = visit(t, kv_t, carry) for t = 1 .. n-1, kv_t the blocks of device i - t.

  The transfer of kv_{t+1} is issued before step t computes, so the two can overlap.
  """
  def body(t, loop_carry):
    kv, carry = loop_carry
    return _shift(ring, kv), visit(t, kv, carry)

  kv, carry = jax.lax.fori_loop(1, ring.ways - 1, body, (_shift(ring, kv), carry))
  return visit(ring.ways - 1, kv, carry)


def _visible_pairs(ring: _Ring, t, nblocks: int) -> jnp.ndarray:
  """[nb, nb] bool: the (local query block, visiting key block) pairs step t computes.

  From a device before this one (s < i): the visitor's first chunk, to all local queries.
  From one after it: both its chunks, to the local second chunk only. Either way half the
  pairs, on every device at every step.
  """
  me = jax.lax.axis_index(ring.axes)
  half = jnp.arange(nblocks) >= nblocks // 2
  return jnp.where((me - t) % ring.ways < me, ~half[None, :], half[:, None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring, q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC):
  return _ring_forward(ring, q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC)[0]


def _ring_forward(ring, q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC):
  """(out in v's dtype, logsumexp float32) of the local queries against the whole row."""
  nblocks = q_NbxBxMxRxK.shape[0]
  # Step 0, the device's own chunks: causal attention over [chunk i, chunk 2n-1-i], in row order.
  state = bw.forward_blocks(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, seg_NbxBxC, causal=True)

  def visit(t, kv, state):
    k_t, v_t, seg_t = kv
    return bw.forward_blocks(q_NbxBxMxRxK, k_t, v_t, seg_NbxBxC, seg_t, causal=False, state=state,
                             pairs_NbxNk=_visible_pairs(ring, t, nblocks))

  state = _around_ring(ring, visit, (k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC), state)
  out, lse = bw.finish(state)
  return out.astype(v_NbxBxMxCxV.dtype), lse


def _ring_attention_fwd(ring, q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC):
  out, lse = _ring_forward(ring, q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC)
  return out, (q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, out, lse)


def _ring_attention_bwd(ring, residuals, dout_NbxBxMxRxV):
  q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, out_NbxBxMxRxV, lse_NbxBxMxR = residuals
  nblocks = q_NbxBxMxRxK.shape[0]
  delta_NbxBxMxR = bw.output_delta(dout_NbxBxMxRxV, out_NbxBxMxRxV)
  dout_NbxBxMxRxV = dout_NbxBxMxRxV.astype(v_NbxBxMxCxV.dtype)
  # Each key block's share of the gradient needs only the final logsumexp and delta, so the
  # shares of the ring steps add up; dq stays here, dk and dv travel with their keys.
  grads = bw.backward_blocks(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, seg_NbxBxC, dout_NbxBxMxRxV,
                             lse_NbxBxMxR, delta_NbxBxMxR, causal=True)

  def visit(t, kv, grads):
    k_t, v_t, seg_t = kv
    dq, dk_t, dv_t = grads
    dk_t, dv_t = _shift(ring, (dk_t, dv_t))  # the sums so far for the blocks now here
    g_q, g_k, g_v = bw.backward_blocks(q_NbxBxMxRxK, k_t, v_t, seg_NbxBxC, seg_t, dout_NbxBxMxRxV, lse_NbxBxMxR,
                                       delta_NbxBxMxR, causal=False, pairs_NbxNk=_visible_pairs(ring, t, nblocks))
    return dq + g_q, dk_t + g_k, dv_t + g_v

  dq, dk, dv = _around_ring(ring, visit, (k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC), grads)
  dk, dv = _shift(ring, (dk, dv))  # after n - 1 steps they sit one device short of home
  return dq.astype(q_NbxBxMxRxK.dtype), dk.astype(k_NbxBxMxCxK.dtype), dv.astype(v_NbxBxMxCxV.dtype), None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)
