"""Activation bytes of one training step on one device, tensor by tensor, from the config alone.

`memory_plan` asks three questions of a block (one transformer layer) at the per-device
sizes of one micro-batch (`Local`):

- `residuals`: what its forward pass saves for the backward pass when nothing is
  rematerialised. Read off the code and checked against the buffers XLA keeps
  (tests/test_plan.py): the block input and both norms' outputs, the attention
  projections, the blockwise kernel's blocked q/k/v, output and float32 logsumexp
  (models/blockwise_attention.py saves nothing sequence-squared), SwiGLU's gate, up,
  sigmoid, silu and product, and for a DeepSeekMoE layer the router's float32 scores and
  the dispatch buffers of the grouped experts (models/grouped_experts.py).
- `matmul_outputs`: the subset the "dots" remat policy keeps (weight-matmul outputs).
- `backward_working_set`: what exists only while the block's backward pass runs, beyond its
  residuals: the larger of the MLP's (or MoE's) gradients of its hidden activations and
  the blockwise kernel's float32 dk/dv/dq accumulators and score tiles, and the gradient
  flowing through the residual stream.

and one question of the loss, `cross_entropy_working_set`: the fused chunked
cross-entropy (train/fused_cross_entropy.py) holds one chunk's float32 logits and their
gradient, the float32 output-layer gradient it accumulates, and dh for every token.

Sizes follow the code's data flow, not an idealised one: a routed-expert layer without
an `expert` mesh axis sorts the (token, expert) pairs of the whole micro-batch on every
device (the sort spans the sharded batch), and with one it gathers the tokens of its
expert group (models/expert_parallel.py); the grouped matmuls' row buffers are static,
all K x tokens rows, because dropless routing cannot know the split ahead of time.
"""

from __future__ import annotations

import dataclasses

from pretrain.models import blockwise_attention, grouped_experts
from pretrain.models.config import DeepseekV2Config, ModelConfig, Qwen2Config

F32 = 4


@dataclasses.dataclass(frozen=True)
class Local:
  """Per-device sizes of one micro-batch, after the mesh has split what it splits."""

  rows: int  # sequences of one micro-batch on one device
  seq: int
  compute_bytes: int  # the model's compute dtype (parameters stay float32)
  heads: int  # query heads per device (split over `tensor` when the rules split `heads`)
  kv_heads: int  # Qwen2 key/value heads per device
  mlp: int  # dense SwiGLU hidden size per device
  shared_mlp: int  # DeepSeekMoE shared experts' hidden size per device
  moe_mlp: int  # one routed expert's hidden size per device
  experts: int  # routed experts held per device
  routed_tokens: int  # tokens whose expert assignments one device's grouped matmuls take
  expert_parallel: bool  # the routed experts are split over the mesh (models/expert_parallel.py)
  vocab: int  # output-layer columns per device
  loss_chunk: int  # tokens per cross-entropy chunk (TrainConfig.loss_chunk)
  ragged_dot: bool  # grouped experts as jax.lax.ragged_dot (TPU) rather than the blocked scan

  @property
  def tokens(self) -> int:
    return self.rows * self.seq


def residuals(config: ModelConfig, layer: int, local: Local) -> dict[str, int]:
  """Bytes block `layer` saves for its backward pass with no rematerialisation, by part."""
  t, c, d = local.tokens, local.compute_bytes, config.hidden_size
  out = {
      # The block input, the input norm's output, the stream after attention and the second norm's output,
      # plus both norms' float32 reciprocal RMS.
      "stream": t * (4 * d * c + 2 * F32),
      "attention": _attention_residuals(config, local),
  }
  if isinstance(config, DeepseekV2Config) and config.is_moe_layer(layer):
    out["moe"] = _moe_residuals(config, local)
  else:
    out["mlp"] = _swiglu_residuals(t, local.mlp, c)
  return out


def matmul_outputs(config: ModelConfig, layer: int, local: Local) -> int:
  """Bytes of the weight-matmul outputs block `layer` computes: what the "dots" policy saves."""
  t, c, d = local.tokens, local.compute_bytes, config.hidden_size
  n = local.heads
  if isinstance(config, Qwen2Config):
    h = config.head_dim
    attention = t * c * (n * h + 2 * local.kv_heads * h + d)  # q, k, v, o
  else:
    q = n * config.qk_head_dim if config.q_lora_rank is None else config.q_lora_rank + n * config.qk_head_dim
    kv = config.kv_lora_rank + config.qk_rope_head_dim + n * (config.qk_nope_head_dim + config.v_head_dim)
    attention = t * c * (q + kv + d)
  if isinstance(config, DeepseekV2Config) and config.is_moe_layer(layer):
    mlp = t * (c * (3 * local.shared_mlp + d) + F32 * config.n_routed_experts)  # shared experts, router
  else:
    mlp = t * c * (2 * local.mlp + d)  # gate, up, down
  return attention + mlp


def backward_working_set(config: ModelConfig, layer: int, local: Local) -> dict[str, int]:
  """Bytes that exist only while block `layer`'s backward pass runs (beyond its residuals), by part.

  Its sublayers' backward passes run one after the other, so the larger of the two counts: the MLP's
  (or MoE's) gradients of its hidden activations, or attention's float32 accumulators and score tiles.
  """
  t, c, d = local.tokens, local.compute_bytes, config.hidden_size
  if isinstance(config, DeepseekV2Config) and config.is_moe_layer(layer):
    mlp = _moe_backward(config, local)
  else:
    mlp = _swiglu_backward(t, local.mlp, c)
  return {"gradients": max(mlp, _attention_backward(config, local)), "stream": 2 * t * d * c}  # dy in, dx out


def forward_working_set(config: ModelConfig, local: Local) -> int:
  """Bytes the blockwise attention kernel's forward loop holds beyond its inputs and outputs."""
  return _score_tiles(config, local, count=3)  # scores, probabilities, the masked select


def cross_entropy_working_set(config: ModelConfig, local: Local) -> dict[str, int]:
  """Bytes of the fused chunked cross-entropy's forward pass (which also forms the gradient)."""
  d = config.hidden_size
  chunk = min(local.loss_chunk, local.tokens)
  return {
      # One chunk's float32 logits, and their gradient (softmax - one_hot) in the compute dtype: in place
      # of the logits when that is float32 too.
      "logits": chunk * local.vocab * F32,
      "logit_gradient": chunk * local.vocab * local.compute_bytes if local.compute_bytes != F32 else 0,
      "output_weights": d * local.vocab * local.compute_bytes,  # w [D, V] in the compute dtype
      "output_gradient": 2 * d * local.vocab * F32,  # dw, the scan's float32 carry in and out
      "hidden_gradient": local.tokens * d * local.compute_bytes,  # dh of every token, kept for backward
      "final_norm": local.tokens * (2 * d * local.compute_bytes + F32),
  }


def _swiglu_residuals(tokens: int, hidden: int, c: int) -> int:
  return 5 * tokens * hidden * c  # gate, up, sigmoid(gate), silu(gate), silu * up


def _swiglu_backward(tokens: int, hidden: int, c: int) -> int:
  return 3 * tokens * hidden * c  # d(silu * up), d(gate), d(up)


def _attention_residuals(config: ModelConfig, local: Local) -> int:
  t, c, n = local.tokens, local.compute_bytes, local.heads
  if isinstance(config, Qwen2Config):
    h, m = config.head_dim, local.kv_heads
    # q and k before and after RoPE, the kernel's blocked q, k and v, its output blocked and back in
    # [B, S, N, H] for o_proj, and its float32 logsumexp per head.
    return t * (c * (6 * n * h + 5 * m * h) + F32 * n)
  qk, v = config.qk_head_dim, config.v_head_dim
  q = n * qk if config.q_lora_rank is None else 2 * config.q_lora_rank + n * qk  # q_a and its norm, q_b
  kv = 2 * config.kv_lora_rank + config.qk_rope_head_dim + n * (config.qk_nope_head_dim + v)  # kv_a, norm, kv_b
  # [nope | rope] q and k, their blocked copies, blocked v, output blocked and back, float32 logsumexp.
  return t * (c * (q + kv + 4 * n * qk + 3 * n * v) + F32 * n)


def _attention_backward(config: ModelConfig, local: Local) -> int:
  """The custom backward: float32 dk/dv accumulators over the whole sequence, float32 dq and the row
  sums of dO * O, the gradients of q, k and v in the compute dtype, and two score tiles (p, ds)."""
  t, n, c = local.tokens, local.heads, local.compute_bytes
  if isinstance(config, Qwen2Config):
    key, value, kv = config.head_dim, config.head_dim, local.kv_heads
  else:
    key, value, kv = config.qk_head_dim, config.v_head_dim, n
  accumulators = t * kv * (key + value) * F32 + t * n * (key + 1) * F32
  gradients = t * (n * key + kv * (key + value)) * c
  return accumulators + gradients + _score_tiles(config, local, count=2)


def _score_tiles(config: ModelConfig, local: Local, count: int) -> int:
  block = min(blockwise_attention.default_block(local.seq), local.seq)
  return count * local.rows * local.heads * block * block * F32


def _moe_residuals(config: DeepseekV2Config, local: Local) -> int:
  t, c, d = local.tokens, local.compute_bytes, config.hidden_size
  k, e = config.num_experts_per_tok, config.n_routed_experts
  router = t * (2 * e * F32 + 2 * k * F32)  # softmax scores and exp; top-k weights and indices
  rows = local.routed_tokens * k  # A: every (token, expert) pair the device's grouped matmuls take
  if local.ragged_dot:
    grouped = rows * local.moe_mlp * c * 4  # ragged_dot's gate, up, silu and product
  else:
    # The rows in expert-aligned blocks (padded): the layout, its scatter and the scan's blocked view are
    # separate buffers on XLA.
    grouped = 3 * _padded_rows(rows, local.experts) * d * c
  # The rows gathered in expert order; their outputs back in (token, k) order: inside the expert group
  # under expert parallelism, else resharded to this device's tokens.
  outputs = (local.routed_tokens if local.expert_parallel else t) * k * d * c
  gathered = local.routed_tokens * d * c if local.expert_parallel and local.routed_tokens > t else 0
  shared = _swiglu_residuals(t, local.shared_mlp, c) if config.n_shared_experts else 0
  return router + rows * d * c + grouped + outputs + gathered + shared + t * d * c  # + the routed output


def _moe_backward(config: DeepseekV2Config, local: Local) -> int:
  """The routed rows' output and input gradients (in the padded block layout too, for the blocked scan),
  and the shared experts' SwiGLU gradients."""
  t, c, d = local.tokens, local.compute_bytes, config.hidden_size
  rows = local.routed_tokens * config.num_experts_per_tok
  if local.ragged_dot:
    routed = rows * (2 * d + 3 * local.moe_mlp) * c
  else:
    routed = rows * d * c + 2 * _padded_rows(rows, local.experts) * d * c
  shared = _swiglu_backward(t, local.shared_mlp, c) if config.n_shared_experts else 0
  return routed + shared


def _padded_rows(rows: int, experts: int) -> int:
  """The blocked grouped matmul's static row count: every expert's rows padded to whole blocks."""
  block = grouped_experts.block_size(rows, experts)
  return -(-(rows + experts * (block - 1)) // block) * block
