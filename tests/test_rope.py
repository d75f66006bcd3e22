"""RoPE and YaRN tables against transformers' DeepSeek-V2, out to 128K positions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV2Config as HFDeepseekV2Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_ds

from pretrain.models import presets, rope


def _hf_config(ours):
  s = ours.rope_scaling
  rope_parameters = {"rope_type": "default", "rope_theta": ours.rope_theta}
  if s.type == "yarn":
    rope_parameters.update(rope_type="yarn", factor=s.factor,
                           original_max_position_embeddings=s.original_max_position_embeddings,
                           beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale,
                           mscale_all_dim=s.mscale_all_dim)
  return HFDeepseekV2Config(
      hidden_size=ours.hidden_size, num_attention_heads=ours.num_attention_heads, num_hidden_layers=1,
      kv_lora_rank=ours.kv_lora_rank, q_lora_rank=ours.q_lora_rank, qk_nope_head_dim=ours.qk_nope_head_dim,
      qk_rope_head_dim=ours.qk_rope_head_dim, v_head_dim=ours.v_head_dim,
      max_position_embeddings=ours.max_position_embeddings, rope_parameters=rope_parameters)


@pytest.mark.parametrize("scaling", ["yarn", "none"])
def test_rotary_tables_and_softmax_scale_match_transformers(scaling):
  ours = presets.get("deepseek-coder-v2-lite")
  if scaling == "none":
    ours = presets.get("deepseek-coder-v2-lite", rope_scaling=presets.RopeScaling())
  hf_config = _hf_config(ours)
  hf_rotary = hf_ds.DeepseekV2RotaryEmbedding(hf_config)
  positions = torch.tensor([[0, 1, 7, 4095, 4096, 16383, 32767, 65535, 100000, 131071]])
  freqs_cis = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)  # complex, times attention scaling

  inv_freq = rope.inverse_frequencies(ours.qk_rope_head_dim, ours.rope_theta, ours.rope_scaling)
  np.testing.assert_allclose(inv_freq, hf_rotary.inv_freq.numpy(), rtol=1e-6)
  cos, sin = rope.cos_sin(jnp.asarray(positions.numpy()), inv_freq, rope.cos_sin_scale(ours.rope_scaling))
  # Both sides form angles in float32, whose spacing near 1e5 rad is 0.0078: beyond the first
  # few positions one ulp of inv_freq (ours is correctly rounded, torch's pow is not
  # always) moves cos/sin by up to a few 1e-3, the precision float32 RoPE has at 128K.
  near, far = slice(0, 3), slice(3, None)
  np.testing.assert_allclose(cos[:, near], freqs_cis.real.numpy()[:, near], atol=1e-5)
  np.testing.assert_allclose(sin[:, near], freqs_cis.imag.numpy()[:, near], atol=1e-5)
  np.testing.assert_allclose(cos[:, far], freqs_cis.real.numpy()[:, far], atol=4e-3)
  np.testing.assert_allclose(sin[:, far], freqs_cis.imag.numpy()[:, far], atol=4e-3)

  hf_attention = hf_ds.DeepseekV2Attention(hf_config, layer_idx=0)
  ours_scale = rope.softmax_scale(ours.qk_head_dim, ours.rope_scaling)
  assert ours_scale == pytest.approx(hf_attention.scaling, rel=1e-12)
  if scaling == "yarn":
    assert ours_scale == pytest.approx(0.11472, abs=1e-5)  # the Lite config's, as the recipe states


def test_interleaved_rotation_is_complex_multiplication():
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  positions = jnp.array([[0, 5, 1000]])
  inv_freq = rope.inverse_frequencies(8, 10000.0)
  cos, sin = rope.cos_sin(positions, inv_freq)
  ours = np.asarray(rope.apply_interleaved(jnp.asarray(x), cos, sin))
  z = x[..., 0::2] + 1j * x[..., 1::2]
  angle = np.asarray(positions)[..., None, None] * inv_freq
  rotated = z * np.exp(1j * angle)
  np.testing.assert_allclose(ours[..., 0::2], rotated.real, atol=1e-4)
  np.testing.assert_allclose(ours[..., 1::2], rotated.imag, atol=1e-4)
