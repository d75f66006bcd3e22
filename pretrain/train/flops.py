"""Analytic training FLOPs per token, the accelerator's peak, and MFU.

FLOPs count the matmuls one token takes part in, 2 per multiply-add, from the
config alone: every weight matmul (for DeepSeek-V2 only the routed experts a token
is sent to), and the attention score (q.k) and mix (probs.v) matmuls over the
causal average context of (seq_len + 1) / 2 keys. Norms, RoPE, softmax, the
router's top-k and the embedding lookup are left out: they are elementwise or
gathers, a rounding error beside the matmuls. Training is 3x the forward (the
backward pass is two matmuls per forward one). Rematerialisation is not counted:
MFU measures useful work, so recomputed forwards only lower it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from pretrain.models.config import DeepseekV2Config, ModelConfig, Qwen2Config

PARTS = ("attention_projections", "attention_scores", "mlp", "router", "routed_experts", "shared_experts",
         "lm_head")


def _attention_context(seq_len: int, causal: bool) -> float:
  # Token i (1-based) attends to i keys under a causal mask; the mean over a row of seq_len is (seq_len+1)/2.
  return (seq_len + 1) / 2 if causal else float(seq_len)


def _swiglu(dim: int, hidden: int) -> float:
  return 2.0 * 3 * dim * hidden  # gate, up and down projections


def _qwen2(c: Qwen2Config, context: float) -> dict[str, float]:
  d, n, m, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
  per_layer_proj = 2.0 * d * (n * h + 2 * m * h) + 2.0 * n * h * d  # q, k, v (GQA: m kv heads), o
  # Every query head scores against `context` keys (h wide) and mixes as many values (h wide);
  # GQA shares the key/value heads but not this work.
  per_layer_scores = 2.0 * n * (h + h) * context
  layers = c.num_hidden_layers
  return {
      "attention_projections": layers * per_layer_proj,
      "attention_scores": layers * per_layer_scores,
      "mlp": layers * _swiglu(d, c.intermediate_size),
      "router": 0.0,
      "routed_experts": 0.0,
      "shared_experts": 0.0,
      "lm_head": 2.0 * d * c.vocab_size,
  }


def _deepseek_v2(c: DeepseekV2Config, context: float) -> dict[str, float]:
  d, n = c.hidden_size, c.num_attention_heads
  if c.q_lora_rank is None:
    q_proj = 2.0 * d * n * c.qk_head_dim
  else:
    q_proj = 2.0 * (d * c.q_lora_rank + c.q_lora_rank * n * c.qk_head_dim)  # q_a_proj, q_b_proj
  kv_a = 2.0 * d * (c.kv_lora_rank + c.qk_rope_head_dim)  # latent plus the one shared rotary key
  kv_b = 2.0 * c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)  # per-head k_nope and v from the latent
  o_proj = 2.0 * n * c.v_head_dim * d
  # Scores span [nope | rope] = qk_head_dim per head; the mix spans v_head_dim.
  per_layer_scores = 2.0 * n * (c.qk_head_dim + c.v_head_dim) * context
  moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
  dense_layers = c.num_hidden_layers - moe_layers
  layers = c.num_hidden_layers
  return {
      "attention_projections": layers * (q_proj + kv_a + kv_b + o_proj),
      "attention_scores": layers * per_layer_scores,
      "mlp": dense_layers * _swiglu(d, c.intermediate_size),
      "router": moe_layers * 2.0 * d * c.n_routed_experts,
      # Dropless routing: each token runs exactly num_experts_per_tok experts.
      "routed_experts": moe_layers * c.num_experts_per_tok * _swiglu(d, c.moe_intermediate_size),
      "shared_experts": moe_layers * _swiglu(d, c.n_shared_experts * c.moe_intermediate_size),
      "lm_head": 2.0 * d * c.vocab_size,
  }


def flops_breakdown(config: ModelConfig, seq_len: int, *, causal: bool = True) -> dict[str, float]:
  """Forward FLOPs per token by part (the keys of `PARTS`); their sum times 3 is `flops_per_token`."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  context = _attention_context(seq_len, causal)
  if isinstance(config, Qwen2Config):
    return _qwen2(config, context)
  if isinstance(config, DeepseekV2Config):
    return _deepseek_v2(config, context)
  raise TypeError(f"no FLOPs formula for {type(config).__name__}")


def flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
  """Training (forward + backward) FLOPs per token at this sequence length."""
  return 3.0 * sum(flops_breakdown(config, seq_len, causal=causal).values())


# bf16 dense (no sparsity) peaks per chip from the vendors' datasheets. TPU kinds are exact
# `device_kind` strings (v5e and v6e report themselves as "lite"); NVIDIA kinds are substrings
# of names like "NVIDIA H100 80GB HBM3", first match wins.
_TPU_PEAKS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5": 459e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}
_NVIDIA_PEAKS = (
    ("h200", 989e12),  # also GH200: the same H100 SXM compute
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
)
_PROBE_CACHE: dict[tuple[str, str], tuple[float, str]] = {}


def _probe(device, n: int = 1024, repeats: int = 10) -> tuple[float, str]:
  # The CPU has no meaningful datasheet number; what a plain matmul reaches is the honest ceiling.
  # float32 on CPU (bf16 matmuls there are emulated and slower), bf16 on an accelerator.
  dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
  a_NxN = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
  b_NxN = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), device)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a_NxN, b_NxN).block_until_ready()  # compile and warm up outside the timing
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a_NxN, b_NxN).block_until_ready()
    best = min(best, time.perf_counter() - start)
  peak = 2.0 * n**3 / best
  source = (f"measured: best of {repeats} {jnp.dtype(dtype).name} {n}x{n} matmuls on {device.device_kind} "
            f"({peak / 1e9:.1f} GFLOP/s; an achieved rate, not a datasheet peak)")
  return peak, source


def datasheet_peak(device_kind: str, platform: str = "") -> float | None:
  """bf16 dense peak FLOP/s of one chip of this kind (`device.device_kind`), or None if the table lacks it."""
  kind = device_kind.lower()
  if kind in _TPU_PEAKS:
    return _TPU_PEAKS[kind]
  if platform == "gpu" or "nvidia" in kind:
    return next((peak for name, peak in _NVIDIA_PEAKS if name in kind), None)
  return None


def peak_flops_per_device(device=None) -> tuple[float, str]:
  """(peak FLOP/s of one device, how it was obtained): the datasheet table, else a measured matmul probe."""
  device = device if device is not None else jax.local_devices()[0]
  peak = datasheet_peak(device.device_kind, device.platform)
  if peak is not None:
    return peak, f"datasheet bf16 dense ({device.device_kind})"
  key = (device.platform, device.device_kind)
  if key not in _PROBE_CACHE:  # once per process: the probe costs a compile and a few matmuls
    peak, source = _probe(device)
    if device.platform != "cpu":
      source = f"unknown accelerator, {source}"
    _PROBE_CACHE[key] = (peak, source)
  return _PROBE_CACHE[key]


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float, num_devices: int) -> float:
  """Model FLOPs utilisation: achieved training FLOP/s over the devices' summed peak."""
  if peak_flops <= 0 or num_devices < 1:
    raise ValueError(f"need peak_flops > 0 and num_devices >= 1, got {peak_flops}, {num_devices}")
  return tokens_per_second * flops_per_token / (peak_flops * num_devices)
