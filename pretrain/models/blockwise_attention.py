"""Causal attention in blocks (FlashAttention-2 in pure JAX): memory linear in the sequence.

`attention.dot_product_attention` materialises the [S, S] scores of every head, and its
autodiff backward keeps them (and the probabilities) alive: quadratic memory, and a
handful of elementwise passes over [S, S] buffers that dominate its time on XLA:CPU.
Here queries and keys are cut into blocks of `block` positions; the forward pass keeps a
running max, normaliser and output per query row (online softmax), so only one block's
scores exist at a time, and it saves for the backward pass only the output and the
float32 logsumexp of each row. The backward pass (a `jax.custom_vjp`) recomputes each
block's probabilities from that logsumexp, as FlashAttention-2 does.

Causality is exploited, not masked: the loop over key blocks of query block i runs i
times (a `fori_loop` with a traced bound) plus the diagonal block, the only one that
needs the causal mask, so causal attention does about half the work of full attention.
With packed documents, off-diagonal blocks whose query and key segment-id ranges cannot
meet (in any batch row) are skipped too. Such loops cannot be reverse-differentiated by
JAX, which is why the backward pass is written by hand.

Inside, operands are heads-major and blocked: a query block is [B, M, G*C, K] (the G
query heads of one key/value head stacked along rows, R = G*C), so each block product is
one batched matmul against that kv head's [B, M, C, K] keys, without repeating k or v G
times. Same semantics as the reference: q is scaled in its own dtype before the product,
scores and softmax run in float32, the output is in the value dtype.

The kernel's two halves, `forward_blocks` (the online-softmax state, resumable) and
`backward_blocks` (one key range's share of the gradients), also serve ring attention
(context_parallel.py), where the keys arrive one device's blocks at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": a fully masked block row then gives exp(0) = 1 terms while
# the running max is still _NEG, but the diagonal block (never fully masked) brings a
# real max and rescales them by exp(_NEG - max) = 0. No NaNs from
# -inf - -inf, and exp(_NEG - lse) is exactly 0 in the backward pass.
_NEG = float(jnp.finfo(jnp.float32).min)


def default_block(seq: int) -> int:
  """The largest power of two <= S/4, within [128, 512]: the fastest on XLA:CPU.

  Forward+backward, 8 heads of 64 (B=4 at S <= 512, else B=1): at S=512 block 128 takes
  56 ms against 63/70/84 ms for 64/256/512; at S=1024 the best is 256, from S=2048 on
  512 (S=8192: 1.8 s against 2.3 s at 256, 2.8 s at 128, 2.0 s at 1024). Small blocks
  make matmuls too small to run near peak; a block large against S wastes the masked
  half of too many diagonal blocks, and beyond 512 the [B, M, R, C] scores spill caches.
  """
  return min(512, max(128, 1 << max(0, (seq // 4).bit_length() - 1)))


def blockwise_attention(q_BxSxNxK, k_BxSxMxK, v_BxSxMxV, *, scale: float,
                        segment_ids_BxS: jnp.ndarray | None = None, block: int | None = None) -> jnp.ndarray:
  """softmax(q k^T * scale + causal/document mask) v -> [B, S, N, V], in `block`-sized tiles.

  Drop-in for `attention.dot_product_attention`; `block` defaults to `default_block(S)`.
  S need not be a multiple of `block`: the sequence is padded at the end, where causality
  already hides the padded keys from every real query; padded query rows are computed
  and dropped.
  """
  seq = q_BxSxNxK.shape[1]
  kv_heads = k_BxSxMxK.shape[2]
  group = q_BxSxNxK.shape[2] // kv_heads
  block = max(1, min(default_block(seq) if block is None else block, seq))
  pad = -seq % block

  def padded(x_BxSx___):
    return jnp.pad(x_BxSx___, ((0, 0), (0, pad)) + ((0, 0),) * (x_BxSx___.ndim - 2))

  q_scaled = q_BxSxNxK * jnp.asarray(scale, q_BxSxNxK.dtype)
  q_NbxBxMxRxK = to_blocks(padded(q_scaled), kv_heads, block)
  k_NbxBxMxCxK = to_blocks(padded(k_BxSxMxK), kv_heads, block)
  v_NbxBxMxCxV = to_blocks(padded(v_BxSxMxV), kv_heads, block)
  seg_NbxBxC = None
  if segment_ids_BxS is not None:
    # Edge padding keeps every block's segment-id range as tight as the real ids allow.
    seg_NbxBxC = segment_blocks(jnp.pad(segment_ids_BxS, ((0, 0), (0, pad)), mode="edge"), block)
  out_NbxBxMxRxV = _attention(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC)
  return from_blocks(out_NbxBxMxRxV, group, block)[:, :seq]


def to_blocks(x_BxSxHxD, kv_heads: int, block: int) -> jnp.ndarray:
  """[B, S, M*G, D] -> [nb, B, M, G*C, D]: per sequence block, heads-major rows (S a multiple of C)."""
  batch, seq, heads, _ = x_BxSxHxD.shape
  group, nblocks = heads // kv_heads, seq // block
  x = x_BxSxHxD.reshape(batch, nblocks, block, kv_heads, group, -1)
  x = x.transpose(1, 0, 3, 4, 2, 5)  # [nb, B, M, G, C, D]
  return x.reshape(nblocks, batch, kv_heads, group * block, -1)


def from_blocks(x_NbxBxMxRxD, group: int, block: int) -> jnp.ndarray:
  """The inverse of `to_blocks`: [nb, B, M, G*C, D] -> [B, nb*C, M*G, D]."""
  nblocks, batch, kv_heads, _, _ = x_NbxBxMxRxD.shape
  x = x_NbxBxMxRxD.reshape(nblocks, batch, kv_heads, group, block, -1)
  return x.transpose(1, 0, 4, 2, 3, 5).reshape(batch, nblocks * block, kv_heads * group, -1)


def segment_blocks(segment_ids_BxS, block: int) -> jnp.ndarray:
  """[B, S] -> [nb, B, C] (S a multiple of C)."""
  batch, seq = segment_ids_BxS.shape
  return segment_ids_BxS.reshape(batch, seq // block, block).transpose(1, 0, 2)


# --- the blocked kernel: leading axis = block index -----------------------------------
#
# `forward_blocks` and `backward_blocks` take query blocks and key/value blocks that may
# be different slices of the sequence (context_parallel.py runs them on the blocks a ring
# step brings in). `causal=True`: the two are the same blocks (query block i's diagonal is
# key block i, later key blocks are skipped); `causal=False`: every key block precedes
# every query block, so all are visible but for the document mask. `pairs_NbxNk`, if
# given, says which (query block, key block) pairs to compute at all.


def _take(x, i):
  return jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)


def _diagonal_mask(rows: int, block: int) -> jnp.ndarray:
  """[R, C] causal mask of a diagonal block; row r is position r % C of its head."""
  row_R = jnp.arange(rows) % block
  return row_R[:, None] >= jnp.arange(block)[None, :]


def _block_scores(q_BxMxRxK, k_BxMxCxK, seg_q_BxC, seg_k_BxC, diagonal: bool):
  """Masked float32 scores of one (query block, key block) pair: [B, M, R, C]."""
  s_BxMxRxC = jnp.einsum("BMRK,BMCK->BMRC", q_BxMxRxK, k_BxMxCxK, preferred_element_type=jnp.float32)
  batch, _, rows, block = s_BxMxRxC.shape
  mask = None
  if diagonal:
    mask = _diagonal_mask(rows, block)[None, None]
  if seg_q_BxC is not None:
    same_Bx1xGxCxC = (seg_q_BxC[:, :, None] == seg_k_BxC[:, None, :])[:, None, None]
    same_Bx1xRxC = jnp.broadcast_to(
        same_Bx1xGxCxC, (batch, 1, rows // block, block, block)).reshape(batch, 1, rows, block)
    mask = same_Bx1xRxC if mask is None else mask & same_Bx1xRxC
  return s_BxMxRxC if mask is None else jnp.where(mask, s_BxMxRxC, _NEG)


def _pairs(seg_q_NbxBxC, seg_k_NkxBxC, pairs_NbxNk):
  """[nb, nk] bool: the given pairs that could share a document in some batch row (None: all pairs)."""
  if seg_q_NbxBxC is None:
    return pairs_NbxNk
  lo_q_NbxB, hi_q_NbxB = seg_q_NbxBxC.min(-1), seg_q_NbxBxC.max(-1)
  lo_k_NkxB, hi_k_NkxB = seg_k_NkxBxC.min(-1), seg_k_NkxBxC.max(-1)
  meet_NbxNkxB = (lo_k_NkxB[None, :] <= hi_q_NbxB[:, None]) & (hi_k_NkxB[None, :] >= lo_q_NbxB[:, None])
  meet_NbxNk = meet_NbxNkxB.any(-1)
  return meet_NbxNk if pairs_NbxNk is None else meet_NbxNk & pairs_NbxNk


def _key_blocks(i, nkeys: int, pairs_NbxNk, step, carry, causal: bool):
  """Runs step(j, carry, diagonal) over the key blocks query block i sees, skipping ones that cannot meet it.

  Causal: j < i, then the diagonal j = i. Otherwise all nkeys blocks, none diagonal.
  """
  def off_diagonal(j, carry):
    if pairs_NbxNk is None:
      return step(j, carry, False)
    return jax.lax.cond(pairs_NbxNk[i, j], lambda c: step(j, c, False), lambda c: c, carry)

  if not causal:
    return jax.lax.fori_loop(0, nkeys, off_diagonal, carry)
  carry = jax.lax.fori_loop(0, i, off_diagonal, carry)
  return step(i, carry, True)


def forward_blocks(q_NbxBxMxRxK, k_NkxBxMxCxK, v_NkxBxMxCxV, seg_q_NbxBxC, seg_k_NkxBxC, *, causal: bool,
                   state=None, pairs_NbxNk=None):
  """The online-softmax state (running max m, normaliser l, float32 output sum acc) of every query
  row after the given key blocks: ([nb, B, M, R], [nb, B, M, R], [nb, B, M, R, V]).

  `state` continues an earlier call's (the key blocks of another ring step). A row that has
  seen no visible key yet holds a meaningless state that the first real key wipes out
  (its weight is exp(_NEG - max) = 0), so start with a causal call: each row sees itself.
  """
  nblocks, batch, kv_heads, rows, _ = q_NbxBxMxRxK.shape
  nkeys, value_dim = k_NkxBxMxCxK.shape[0], v_NkxBxMxCxV.shape[-1]
  pairs_NbxNk = _pairs(seg_q_NbxBxC, seg_k_NkxBxC, pairs_NbxNk)
  if state is None:
    state = (jnp.full((nblocks, batch, kv_heads, rows), _NEG, jnp.float32),
             jnp.zeros((nblocks, batch, kv_heads, rows), jnp.float32),
             jnp.zeros((nblocks, batch, kv_heads, rows, value_dim), jnp.float32))

  def query_block(_, xs):
    i, q_BxMxRxK, seg_q_BxC, carry = xs

    def step(j, carry, diagonal):
      m_BxMxR, l_BxMxR, acc_BxMxRxV = carry
      seg_k_BxC = None if seg_k_NkxBxC is None else _take(seg_k_NkxBxC, j)
      s_BxMxRxC = _block_scores(q_BxMxRxK, _take(k_NkxBxMxCxK, j), seg_q_BxC, seg_k_BxC, diagonal)
      m_new_BxMxR = jnp.maximum(m_BxMxR, s_BxMxRxC.max(-1))
      alpha_BxMxR = jnp.exp(m_BxMxR - m_new_BxMxR)
      p_BxMxRxC = jnp.exp(s_BxMxRxC - m_new_BxMxR[..., None])
      l_BxMxR = alpha_BxMxR * l_BxMxR + p_BxMxRxC.sum(-1)
      v_BxMxCxV = _take(v_NkxBxMxCxV, j)
      pv_BxMxRxV = jnp.einsum("BMRC,BMCV->BMRV", p_BxMxRxC.astype(v_BxMxCxV.dtype), v_BxMxCxV,
                              preferred_element_type=jnp.float32)
      return m_new_BxMxR, l_BxMxR, alpha_BxMxR[..., None] * acc_BxMxRxV + pv_BxMxRxV

    return None, _key_blocks(i, nkeys, pairs_NbxNk, step, carry, causal)

  # A None segment array is an empty pytree: the scan passes None through to the body.
  _, state = jax.lax.scan(query_block, None, (jnp.arange(nblocks), q_NbxBxMxRxK, seg_q_NbxBxC, state))
  return state


def finish(state):
  """(output [nb, B, M, R, V] float32, logsumexp [nb, B, M, R] float32) from a forward state."""
  m_NbxBxMxR, l_NbxBxMxR, acc_NbxBxMxRxV = state
  return acc_NbxBxMxRxV / l_NbxBxMxR[..., None], m_NbxBxMxR + jnp.log(l_NbxBxMxR)


def backward_blocks(q_NbxBxMxRxK, k_NkxBxMxCxK, v_NkxBxMxCxV, seg_q_NbxBxC, seg_k_NkxBxC, dout_NbxBxMxRxV,
                    lse_NbxBxMxR, delta_NbxBxMxR, *, causal: bool, pairs_NbxNk=None):
  """float32 (dq, dk, dv) of the given key blocks' share of the attention, from the final logsumexp
  and delta = rowsum(dout * out) of the whole attention (so shares of a ring add up)."""
  nblocks = q_NbxBxMxRxK.shape[0]
  nkeys = k_NkxBxMxCxK.shape[0]
  pairs_NbxNk = _pairs(seg_q_NbxBxC, seg_k_NkxBxC, pairs_NbxNk)

  # Outer loop over query blocks (dq_i stays a loop-local accumulator); dk and dv are
  # float32 carries over all key blocks updated in place, one key block at a time.
  def query_block(carry, xs):
    i, q_BxMxRxK, dout_BxMxRxV, lse_BxMxR, delta_BxMxR, seg_q_BxC = xs

    def step(j, carry, diagonal):
      dq_BxMxRxK, dk_NkxBxMxCxK, dv_NkxBxMxCxV = carry
      seg_k_BxC = None if seg_k_NkxBxC is None else _take(seg_k_NkxBxC, j)
      k_BxMxCxK, v_BxMxCxV = _take(k_NkxBxMxCxK, j), _take(v_NkxBxMxCxV, j)
      s_BxMxRxC = _block_scores(q_BxMxRxK, k_BxMxCxK, seg_q_BxC, seg_k_BxC, diagonal)
      p_BxMxRxC = jnp.exp(s_BxMxRxC - lse_BxMxR[..., None])  # masked scores give exactly 0
      dv_BxMxCxV = jnp.einsum("BMRC,BMRV->BMCV", p_BxMxRxC.astype(dout_BxMxRxV.dtype), dout_BxMxRxV,
                              preferred_element_type=jnp.float32)
      dp_BxMxRxC = jnp.einsum("BMRV,BMCV->BMRC", dout_BxMxRxV, v_BxMxCxV, preferred_element_type=jnp.float32)
      ds_BxMxRxC = p_BxMxRxC * (dp_BxMxRxC - delta_BxMxR[..., None])
      dq_BxMxRxK = dq_BxMxRxK + jnp.einsum("BMRC,BMCK->BMRK", ds_BxMxRxC.astype(k_BxMxCxK.dtype), k_BxMxCxK,
                                           preferred_element_type=jnp.float32)
      dk_BxMxCxK = jnp.einsum("BMRC,BMRK->BMCK", ds_BxMxRxC.astype(q_BxMxRxK.dtype), q_BxMxRxK,
                              preferred_element_type=jnp.float32)
      dk_NkxBxMxCxK = dk_NkxBxMxCxK.at[j].add(dk_BxMxCxK)
      dv_NkxBxMxCxV = dv_NkxBxMxCxV.at[j].add(dv_BxMxCxV)
      return dq_BxMxRxK, dk_NkxBxMxCxK, dv_NkxBxMxCxV

    dk_NkxBxMxCxK, dv_NkxBxMxCxV = carry
    dq_BxMxRxK = jnp.zeros(q_BxMxRxK.shape, jnp.float32)
    dq_BxMxRxK, dk_NkxBxMxCxK, dv_NkxBxMxCxV = _key_blocks(
        i, nkeys, pairs_NbxNk, step, (dq_BxMxRxK, dk_NkxBxMxCxK, dv_NkxBxMxCxV), causal)
    return (dk_NkxBxMxCxK, dv_NkxBxMxCxV), dq_BxMxRxK

  init = (jnp.zeros(k_NkxBxMxCxK.shape, jnp.float32), jnp.zeros(v_NkxBxMxCxV.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(
      query_block, init,
      (jnp.arange(nblocks), q_NbxBxMxRxK, dout_NbxBxMxRxV, lse_NbxBxMxR, delta_NbxBxMxR, seg_q_NbxBxC))
  return dq, dk, dv


def output_delta(dout_NbxBxMxRxV, out_NbxBxMxRxV) -> jnp.ndarray:
  """D_i = rowsum(dO_i * O_i) = sum_j p_ij dp_ij, the softmax Jacobian's diagonal term, float32."""
  return jnp.einsum("NBMRV,NBMRV->NBMR", dout_NbxBxMxRxV.astype(jnp.float32), out_NbxBxMxRxV.astype(jnp.float32))


# --- causal attention over one whole sequence ------------------------------------------


def _forward(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC):
  """(out [nb, B, M, R, V] in v's dtype, logsumexp [nb, B, M, R] float32)."""
  state = forward_blocks(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, seg_NbxBxC, causal=True)
  out, lse = finish(state)
  return out.astype(v_NbxBxMxCxV.dtype), lse


@jax.custom_vjp
def _attention(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC):
  return _forward(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC)[0]


def _attention_fwd(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC):
  out, lse = _forward(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC)
  return out, (q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, out, lse)


def _attention_bwd(residuals, dout_NbxBxMxRxV):
  q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, out_NbxBxMxRxV, lse_NbxBxMxR = residuals
  delta_NbxBxMxR = output_delta(dout_NbxBxMxRxV, out_NbxBxMxRxV)
  dq, dk, dv = backward_blocks(q_NbxBxMxRxK, k_NbxBxMxCxK, v_NbxBxMxCxV, seg_NbxBxC, seg_NbxBxC,
                               dout_NbxBxMxRxV.astype(v_NbxBxMxCxV.dtype), lse_NbxBxMxR, delta_NbxBxMxR, causal=True)
  return dq.astype(q_NbxBxMxRxK.dtype), dk.astype(k_NbxBxMxCxK.dtype), dv.astype(v_NbxBxMxCxV.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
