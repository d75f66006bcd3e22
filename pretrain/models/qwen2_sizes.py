"""Qwen2's block sizes for the capacity planner: grouped-query attention and a dense SwiGLU (block_sizes.py)."""

from __future__ import annotations

from pretrain.models.block_sizes import F32, BlockSizes, Local


class Qwen2Sizes(BlockSizes):

  @property
  def kv_heads(self) -> int:
    return self.config.num_key_value_heads

  def attention_residuals(self, local: Local) -> int:
    t, c, n = local.tokens, local.compute_bytes, local.heads
    h, m = self.config.head_dim, local.kv_heads
    # q and k before and after RoPE, the kernel's blocked q, k and v, its output blocked and back in
    # [B, S, N, H] for o_proj, and its float32 logsumexp per head.
    return t * (c * (6 * n * h + 5 * m * h) + F32 * n)

  def attention_matmul_outputs(self, local: Local) -> int:
    h = self.config.head_dim
    return local.tokens * local.compute_bytes * (local.heads * h + 2 * local.kv_heads * h + self.config.hidden_size)

  def attention_operands(self, local: Local) -> tuple[int, int, int]:
    return self.config.head_dim, self.config.head_dim, local.kv_heads

  def ring_kv_width(self, local: Local) -> int:
    return 2 * local.kv_heads * self.config.hidden_size // self.config.num_attention_heads
