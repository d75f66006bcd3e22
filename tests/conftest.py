"""Shared fixtures: tiny random Hugging Face models built with transformers' own classes.

`tiny_qwen2_hf(**overrides)` and `tiny_deepseek_v2_hf(**overrides)` return a float32
`*ForCausalLM` in eval mode with eager attention (see `pretrain.convert.parity`).
"""

from __future__ import annotations

import pytest

from pretrain.convert import parity


@pytest.fixture
def tiny_qwen2_hf():
  def make(seed: int = 0, **overrides):
    return parity.random_hf_model("qwen2", seed, **overrides)
  return make


@pytest.fixture
def tiny_deepseek_v2_hf():
  def make(seed: int = 0, **overrides):
    return parity.random_hf_model("deepseek_v2", seed, **overrides)
  return make
