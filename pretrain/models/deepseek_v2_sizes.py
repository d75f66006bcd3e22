"""DeepSeek-V2's block sizes for the capacity planner: Multi-head Latent Attention and DeepSeekMoE's
shared and routed experts (block_sizes.py).

Sizes follow the code's data flow, not an idealised one: a routed-expert layer without
an `expert` mesh axis sorts the (token, expert) pairs of the whole micro-batch on every
device (the sort spans the sharded batch), and with one it gathers the tokens of its
expert group (models/expert_parallel.py); the grouped matmuls' row buffers are static,
all K x tokens rows, because dropless routing cannot know the split ahead of time.
"""

from __future__ import annotations

from pretrain.models import grouped_experts
from pretrain.models.block_sizes import F32, BlockSizes, Local, RoutedExperts, swiglu_backward, swiglu_residuals


class DeepseekV2Sizes(BlockSizes):

  @property
  def routed_experts(self) -> RoutedExperts:
    c = self.config
    return RoutedExperts(count=c.n_routed_experts, hidden=c.hidden_size, expert_hidden=c.moe_intermediate_size,
                         shared_hidden=c.moe_intermediate_size * c.n_shared_experts,
                         implementation=c.moe_implementation)

  def attention_residuals(self, local: Local) -> int:
    config, t, c, n = self.config, local.tokens, local.compute_bytes, local.heads
    qk, v = config.qk_head_dim, config.v_head_dim
    q = n * qk if config.q_lora_rank is None else 2 * config.q_lora_rank + n * qk  # q_a and its norm, q_b
    kv = 2 * config.kv_lora_rank + config.qk_rope_head_dim + n * (config.qk_nope_head_dim + v)  # kv_a, norm, kv_b
    # [nope | rope] q and k, their blocked copies, blocked v, output blocked and back, float32 logsumexp.
    return t * (c * (q + kv + 4 * n * qk + 3 * n * v) + F32 * n)

  def attention_matmul_outputs(self, local: Local) -> int:
    config, n = self.config, local.heads
    q = n * config.qk_head_dim if config.q_lora_rank is None else config.q_lora_rank + n * config.qk_head_dim
    kv = config.kv_lora_rank + config.qk_rope_head_dim + n * (config.qk_nope_head_dim + config.v_head_dim)
    return local.tokens * local.compute_bytes * (q + kv + config.hidden_size)

  def attention_operands(self, local: Local) -> tuple[int, int, int]:
    # Keys and values are up-projected per query head: no grouping.
    return self.config.qk_head_dim, self.config.v_head_dim, local.heads

  def ring_kv_width(self, local: Local) -> int:
    return local.heads * (self.config.qk_head_dim + self.config.v_head_dim)

  def moe_residuals(self, local: Local) -> int:
    config, t, c, d = self.config, local.tokens, local.compute_bytes, self.config.hidden_size
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
    shared = swiglu_residuals(t, local.shared_mlp, c) if config.n_shared_experts else 0
    return router + rows * d * c + grouped + outputs + gathered + shared + t * d * c  # + the routed output

  def moe_matmul_outputs(self, local: Local) -> int:
    c = local.compute_bytes
    # The shared experts' gate, up and down, and the router's float32 logits.
    return local.tokens * (c * (3 * local.shared_mlp + self.config.hidden_size) + F32 * self.config.n_routed_experts)

  def moe_backward(self, local: Local) -> int:
    """The routed rows' output and input gradients (in the padded block layout too, for the blocked scan),
    and the shared experts' SwiGLU gradients."""
    t, c, d = local.tokens, local.compute_bytes, self.config.hidden_size
    rows = local.routed_tokens * self.config.num_experts_per_tok
    if local.ragged_dot:
      routed = rows * (2 * d + 3 * local.moe_mlp) * c
    else:
      routed = rows * d * c + 2 * _padded_rows(rows, local.experts) * d * c
    shared = swiglu_backward(t, local.shared_mlp, c) if self.config.n_shared_experts else 0
    return routed + shared


def _padded_rows(rows: int, experts: int) -> int:
  """The blocked grouped matmul's static row count: every expert's rows padded to whole blocks."""
  block = grouped_experts.block_size(rows, experts)
  return -(-(rows + experts * (block - 1)) // block) * block
