"""Activation bytes of one block (one transformer layer) on one device, from the config alone.

The capacity planner (pretrain/plan/memory.py) asks these questions of a block at the
per-device sizes of one micro-batch (`Local`):

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

`BlockSizes` answers for what every family shares (the residual stream, SwiGLU, the
blockwise kernel's tiles, the loss); each family's subclass, beside its model
(qwen2_sizes.py, deepseek_v2_sizes.py), answers for its attention and, where it has
them, its routed experts. `models.block_sizes(config)` picks the subclass.
"""

from __future__ import annotations

import dataclasses

from pretrain.models import blockwise_attention

F32 = 4


@dataclasses.dataclass(frozen=True)
class Local:
  """Per-device sizes of one micro-batch, after the mesh has split what it splits."""

  rows: int  # sequences of one micro-batch on one device
  seq: int
  compute_bytes: int  # the model's compute dtype (parameters stay float32)
  heads: int  # query heads per device (split over `tensor` when the rules split `heads`)
  kv_heads: int  # key/value heads per device (grouped-query attention; the query heads where there is none)
  mlp: int  # dense SwiGLU hidden size per device
  vocab: int  # output-layer columns per device
  loss_chunk: int  # tokens per cross-entropy chunk (TrainConfig.loss_chunk)
  # Routed-expert (DeepSeekMoE) layers only:
  shared_mlp: int = 0  # the shared experts' hidden size per device
  moe_mlp: int = 0  # one routed expert's hidden size per device
  experts: int = 0  # routed experts held per device
  routed_tokens: int = 0  # tokens whose expert assignments one device's grouped matmuls take
  expert_parallel: bool = False  # the routed experts are split over the mesh (models/expert_parallel.py)
  ragged_dot: bool = False  # grouped experts as jax.lax.ragged_dot (TPU) rather than the blocked scan

  @property
  def tokens(self) -> int:
    return self.rows * self.seq


@dataclasses.dataclass(frozen=True)
class RoutedExperts:
  """A family's routed experts, as the planner splits them: [count, hidden, expert_hidden] per MoE layer."""

  count: int
  hidden: int
  expert_hidden: int
  shared_hidden: int  # the shared experts' total hidden size (0 without shared experts)
  implementation: str  # models/config.py MoeImplementation

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.count, self.hidden, self.expert_hidden)


class BlockSizes:
  """One family's block sizes. Subclasses give attention's parts; a family with routed experts also gives
  `routed_experts` and the `moe_*` parts."""

  def __init__(self, config):
    self.config = config

  # --- what a subclass says about its family -------------------------------------------------------

  @property
  def kv_heads(self) -> int:
    """Key/value heads of attention (the query heads without grouped-query attention)."""
    return self.config.num_attention_heads

  @property
  def routed_experts(self) -> RoutedExperts | None:
    return None

  def attention_residuals(self, local: Local) -> int:
    raise NotImplementedError

  def attention_matmul_outputs(self, local: Local) -> int:
    raise NotImplementedError

  def attention_operands(self, local: Local) -> tuple[int, int, int]:
    """(key head dimension, value head dimension, key/value heads per device) of the attention kernel."""
    raise NotImplementedError

  def ring_kv_width(self, local: Local) -> int:
    """Numbers per token a device sends round the context ring (its keys and values)."""
    raise NotImplementedError

  def moe_residuals(self, local: Local) -> int:
    raise NotImplementedError(f"{type(self.config).__name__} has no routed experts")

  def moe_matmul_outputs(self, local: Local) -> int:
    raise NotImplementedError(f"{type(self.config).__name__} has no routed experts")

  def moe_backward(self, local: Local) -> int:
    raise NotImplementedError(f"{type(self.config).__name__} has no routed experts")

  # --- the questions the planner asks ----------------------------------------------------------------

  def is_moe_layer(self, layer: int) -> bool:
    return self.routed_experts is not None and self.config.is_moe_layer(layer)

  def residuals(self, layer: int, local: Local) -> dict[str, int]:
    """Bytes block `layer` saves for its backward pass with no rematerialisation, by part."""
    t, c, d = local.tokens, local.compute_bytes, self.config.hidden_size
    out = {
        # The block input, the input norm's output, the stream after attention and the second norm's output,
        # plus both norms' float32 reciprocal RMS.
        "stream": t * (4 * d * c + 2 * F32),
        "attention": self.attention_residuals(local),
    }
    if self.is_moe_layer(layer):
      out["moe"] = self.moe_residuals(local)
    else:
      out["mlp"] = swiglu_residuals(t, local.mlp, c)
    return out

  def matmul_outputs(self, layer: int, local: Local) -> int:
    """Bytes of the weight-matmul outputs block `layer` computes: what the "dots" policy saves."""
    if self.is_moe_layer(layer):
      mlp = self.moe_matmul_outputs(local)
    else:
      mlp = local.tokens * local.compute_bytes * (2 * local.mlp + self.config.hidden_size)  # gate, up, down
    return self.attention_matmul_outputs(local) + mlp

  def backward_working_set(self, layer: int, local: Local) -> dict[str, int]:
    """Bytes that exist only while block `layer`'s backward pass runs (beyond its residuals), by part.

    Its sublayers' backward passes run one after the other, so the larger of the two counts: the MLP's
    (or MoE's) gradients of its hidden activations, or attention's float32 accumulators and score tiles.
    """
    t, c, d = local.tokens, local.compute_bytes, self.config.hidden_size
    mlp = self.moe_backward(local) if self.is_moe_layer(layer) else swiglu_backward(t, local.mlp, c)
    return {"gradients": max(mlp, self.attention_backward(local)), "stream": 2 * t * d * c}  # dy in, dx out

  def attention_backward(self, local: Local) -> int:
    """The custom backward: float32 dk/dv accumulators over the whole sequence, float32 dq and the row
    sums of dO * O, the gradients of q, k and v in the compute dtype, and two score tiles (p, ds)."""
    t, n, c = local.tokens, local.heads, local.compute_bytes
    key, value, kv = self.attention_operands(local)
    accumulators = t * kv * (key + value) * F32 + t * n * (key + 1) * F32
    gradients = t * (n * key + kv * (key + value)) * c
    return accumulators + gradients + score_tiles(local, count=2)

  def forward_working_set(self, local: Local) -> int:
    """Bytes the blockwise attention kernel's forward loop holds beyond its inputs and outputs."""
    return score_tiles(local, count=3)  # scores, probabilities, the masked select

  def cross_entropy_working_set(self, local: Local) -> dict[str, int]:
    """Bytes of the fused chunked cross-entropy's forward pass (which also forms the gradient)."""
    d = self.config.hidden_size
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


def swiglu_residuals(tokens: int, hidden: int, c: int) -> int:
  return 5 * tokens * hidden * c  # gate, up, sigmoid(gate), silu(gate), silu * up


def swiglu_backward(tokens: int, hidden: int, c: int) -> int:
  return 3 * tokens * hidden * c  # d(silu * up), d(gate), d(up)


def score_tiles(local: Local, count: int) -> int:
  block = min(blockwise_attention.default_block(local.seq), local.seq)
  return count * local.rows * local.heads * block * block * F32
