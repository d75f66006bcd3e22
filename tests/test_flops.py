"""Analytic FLOPs against the parameter counts, a hand formula for attention, the peak table and probe, MFU."""

from __future__ import annotations

import types

import jax
import pytest

from pretrain.models import param_count, presets
from pretrain.train import flops


def _matmul_part(breakdown: dict[str, float]) -> float:
  # Everything but the scores/mix, which multiply activations with activations.
  return sum(v for k, v in breakdown.items() if k != "attention_scores")


def test_qwen2_14b_matmuls_are_twice_the_non_embedding_weights():
  config = presets.get("qwen2-14b")
  counts = param_count.count(config)
  # Biases and norm scales are parameters a token adds or scales with, not multiplies through.
  biases = config.num_hidden_layers * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
  weights = counts.total - counts.by_group["embedding"] - counts.by_group["norms"] - biases
  breakdown = flops.flops_breakdown(config, 1)
  assert _matmul_part(breakdown) == 2 * weights
  # At a short sequence the forward approaches 2 x (non-embedding parameters, lm_head included).
  non_embedding = counts.total - counts.by_group["embedding"]
  assert sum(breakdown.values()) == pytest.approx(2 * non_embedding, rel=1e-3)


def test_qwen2_attention_scores_hand_formula():
  config = presets.get("qwen2-14b")
  seq = 4096
  # Per layer, each of 40 query heads: q.k over 128 dims and probs.v over 128 dims, (S+1)/2 keys on average.
  expected = 48 * 2 * 40 * (128 + 128) * (seq + 1) / 2
  assert flops.flops_breakdown(config, seq)["attention_scores"] == expected
  assert flops.flops_breakdown(config, seq, causal=False)["attention_scores"] == 48 * 2 * 40 * 256 * seq


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek-coder-v2-lite", "deepseek-coder-v2", "tiny-deepseek-v2"])
def test_deepseek_matmuls_are_twice_the_active_weights(name):
  config = presets.get(name)
  counts = param_count.count(config)
  # `active` drops the embedding table and the routed experts a token skips; norm scales are the only
  # non-matmul parameters left (DeepSeek-V2 has no biases), so the identity is exact.
  assert _matmul_part(flops.flops_breakdown(config, 4096)) == 2 * (counts.active - counts.by_group["norms"])


def test_deepseek_lite_attention_scores_hand_formula():
  config = presets.get("deepseek-coder-v2-lite")
  seq = 4096
  # 27 layers x 16 heads: scores over 128 nope + 64 rope dims, mix over v_head_dim 128.
  expected = 27 * 2 * 16 * ((128 + 64) + 128) * (seq + 1) / 2
  breakdown = flops.flops_breakdown(config, seq)
  assert breakdown["attention_scores"] == expected
  # MoE parts: 26 MoE layers, 6 of 64 routed experts of width 1408, shared experts 2 x 1408, dense layer 0.
  assert breakdown["routed_experts"] == 26 * 6 * 2 * 3 * 2048 * 1408
  assert breakdown["shared_experts"] == 26 * 2 * 3 * 2048 * 2816
  assert breakdown["router"] == 26 * 2 * 2048 * 64
  assert breakdown["mlp"] == 1 * 2 * 3 * 2048 * 10944


def test_flops_per_token_is_three_forwards():
  for name in ("qwen2-14b", "deepseek-coder-v2-lite"):
    config = presets.get(name)
    forward = sum(flops.flops_breakdown(config, 4096).values())
    assert flops.flops_per_token(config, 4096) == 3 * forward
    assert isinstance(flops.flops_per_token(config, 4096), float)
  assert set(flops.flops_breakdown(presets.get("tiny-qwen2"), 8)) == set(flops.PARTS)


def test_q_lora_counts_both_projections():
  config = presets.get("deepseek-coder-v2")
  full_rank = presets.get("deepseek-coder-v2", q_lora_rank=None)
  d, r, n, k = 5120, 1536, 128, 192
  difference = (flops.flops_breakdown(config, 16)["attention_projections"]
                - flops.flops_breakdown(full_rank, 16)["attention_projections"])
  assert difference == 60 * 2 * (d * r + r * n * k - d * n * k)


def _fake_device(kind: str, platform: str) -> types.SimpleNamespace:
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind, platform, peak", [
    ("TPU v4", "tpu", 275e12),
    ("TPU v5 lite", "tpu", 197e12),
    ("TPU v5", "tpu", 459e12),
    ("TPU v5p", "tpu", 459e12),
    ("TPU v6 lite", "tpu", 918e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
    ("NVIDIA H200", "gpu", 989e12),
])
def test_datasheet_table(kind, platform, peak):
  value, source = flops.peak_flops_per_device(_fake_device(kind, platform))
  assert value == peak
  assert source.startswith("datasheet bf16 dense")


def test_cpu_probe_is_plausible_and_cached():
  device = jax.devices("cpu")[0]
  peak, source = flops.peak_flops_per_device(device)
  # Two slow cores reach a few GFLOP/s; a big server well under 100 TFLOP/s in float32.
  assert 1e8 < peak < 1e14
  assert source.startswith("measured")
  assert flops.peak_flops_per_device(device) == (peak, source)  # cached: the identical figure


def test_unknown_accelerator_is_probed_with_a_label(monkeypatch):
  monkeypatch.setattr(flops, "_probe", lambda device: (1e12, "measured: stub"))
  peak, source = flops.peak_flops_per_device(_fake_device("Mystery NPU", "npu"))
  assert peak == 1e12
  assert source.startswith("unknown accelerator, measured")


def test_mfu_arithmetic():
  # 1000 tokens/s x 6e9 FLOPs/token = 6e12 FLOP/s on 4 devices of 3e12 peak: half.
  assert flops.mfu(1000.0, 6e9, 3e12, 4) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    flops.mfu(1.0, 1.0, 0.0, 1)
