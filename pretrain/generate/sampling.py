"""Choosing each row's next token: greedy, or a draw from softmax(logits / temperature) restricted to
the top-k tokens and then to the top-p nucleus, in transformers' order (temperature, top-k, top-p).

The nucleus is the smallest set of most likely tokens whose probability reaches top_p: a token is
kept when the tokens more likely than it hold less than top_p (so the most likely one always is).
Each row draws with its own key (engine.py derives it from the seed, the row and the step), so a
row's tokens do not depend on the batch it was generated in or on how the batch is split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pretrain.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen; a static part of the compiled programs (one compilation per setting)."""

  temperature: float = 0.0  # 0: greedy (top_p and top_k are then irrelevant)
  top_p: float = 1.0  # 1: no nucleus
  top_k: int = 0  # 0: no top-k limit

  def validate(self) -> None:
    if not self.temperature >= 0.0:
      raise ConfigError("--temperature", f"must be >= 0 (0: greedy), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError("--top-p", f"must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ConfigError("--top-k", f"must be >= 0 (0: no limit), got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def candidates(logits_BxV: jnp.ndarray, sampling: Sampling) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(logits / temperature [B, C], their token ids [B, C]) of the tokens a draw may pick: -inf outside
  the nucleus; C = top_k, or the whole vocabulary when neither top-k nor top-p limits it."""
  logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
  vocab = logits_BxV.shape[-1]
  k = min(sampling.top_k or vocab, vocab)
  if k == vocab and sampling.top_p >= 1.0:
    return logits_BxV, jnp.broadcast_to(jnp.arange(vocab), logits_BxV.shape)
  top_BxC, ids_BxC = jax.lax.top_k(logits_BxV, k)  # most likely first
  if sampling.top_p < 1.0:
    probs_BxC = jax.nn.softmax(top_BxC, axis=-1)
    before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC  # probability of the tokens more likely
    top_BxC = jnp.where(before_BxC < sampling.top_p, top_BxC, -jnp.inf)
  return top_BxC, ids_BxC


def sample(logits_BxV: jnp.ndarray, keys_B: jax.Array, sampling: Sampling) -> jnp.ndarray:
  """Each row's next token [B] int32; `keys_B` one random key per row (unused when greedy)."""
  if sampling.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxC, ids_BxC = candidates(logits_BxV, sampling)
  choice_B = jax.vmap(jax.random.categorical)(keys_B, logits_BxC)
  return jnp.take_along_axis(ids_BxC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
