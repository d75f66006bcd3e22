"""Rotary position embeddings: plain RoPE and YaRN as the DeepSeek-V2 checkpoints compute it.

Two layouts exist in the checkpoints we read: Qwen2 rotates the halves of a head
(`rotate_half`: x[i] pairs with x[i + d/2]); DeepSeek-V2 rotates adjacent pairs
(x[2i], x[2i+1]), the "interleaved" layout its weights were trained with.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from pretrain.models.config import RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  if factor <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """inv_freq [dim/2] float32; YaRN blends interpolated and extrapolated frequencies with a ramp."""
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  freq_extra = 1.0 / theta**exponents
  if scaling is None or scaling.type == "none":
    return freq_extra.astype(np.float32)
  freq_inter = freq_extra / scaling.factor

  def correction_dim(num_rotations: float) -> float:
    orig = scaling.original_max_position_embeddings
    return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
  high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # the reference code's guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  return (freq_inter * ramp + freq_extra * (1.0 - ramp)).astype(np.float32)


def cos_sin_scale(scaling: RopeScaling | None) -> float:
  """YaRN's multiplier on cos and sin (1.0 for the DeepSeek configs, where mscale == mscale_all_dim)."""
  if scaling is None or scaling.type == "none":
    return 1.0
  return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)


def softmax_scale(head_dim: int, scaling: RopeScaling | None) -> float:
  """head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN, at every sequence length."""
  scale = head_dim**-0.5
  if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
    scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
  return scale


def cos_sin(positions_BxS: jnp.ndarray, inv_freq: np.ndarray, scale: float = 1.0):
  """cos, sin [B, S, dim/2] in float32."""
  angles_BxSxF = positions_BxS.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles_BxSxF) * scale, jnp.sin(angles_BxSxF) * scale


def apply_rotate_half(x_BxSxNxD: jnp.ndarray, cos_BxSxF, sin_BxSxF) -> jnp.ndarray:
  """Qwen2/Llama layout: the two halves of the head dim are the real and imaginary parts."""
  x1, x2 = jnp.split(x_BxSxNxD.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_BxSxF[:, :, None, :], sin_BxSxF[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxSxNxD.dtype)


def apply_interleaved(x_BxSxNxD: jnp.ndarray, cos_BxSxF, sin_BxSxF) -> jnp.ndarray:
  """DeepSeek-V2 layout: adjacent pairs (x[2i], x[2i+1]) are the real and imaginary parts."""
  x = x_BxSxNxD.astype(jnp.float32).reshape(*x_BxSxNxD.shape[:-1], -1, 2)
  re, im = x[..., 0], x[..., 1]
  cos, sin = cos_BxSxF[:, :, None, :], sin_BxSxF[:, :, None, :]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x_BxSxNxD.shape).astype(x_BxSxNxD.dtype)
