"""Generation for both families: a jitted prefill into a preallocated KV cache (DeepSeek-V2: MLA's
compressed latent cache), then a jitted on-device decode loop; greedy or top-k/top-p sampling."""

from __future__ import annotations

from pretrain.generate.engine import Generation, decode_step, generate, generate_with_stats, prefill
from pretrain.generate.sampling import Sampling
from pretrain.generate.text import generate_text

__all__ = ["Generation", "Sampling", "decode_step", "generate", "generate_text", "generate_with_stats", "prefill"]
