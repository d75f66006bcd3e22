"""Shared fixtures: tiny random Hugging Face models built with transformers' own classes.

`tiny_qwen2_hf(**overrides)` and `tiny_deepseek_v2_hf(**overrides)` return a float32
`*ForCausalLM` in eval mode with eager attention (see `pretrain.convert.parity`).
`data_dir`: a two-component mixture of generated JSONL and its paths, for training runs.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from tiny_tokenizers import sample_texts

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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """A two-component mixture of generated JSONL, its tokenizer and prepared shards."""
  root = tmp_path_factory.mktemp("data")
  for seed, name in enumerate(("code", "text")):
    (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(300, seed)))
  (root / "mixture.py").write_text(
      "def get_mixture(arg=None):\n"
      "  return {'name': 'tiny', 'components': [\n"
      "      {'name': 'code', 'domain': 'code', 'weight': 0.7, 'inputs': ['code.jsonl'], 'fim_rate': 0.5},\n"
      "      {'name': 'text', 'domain': 'text', 'weight': 0.3, 'inputs': ['text.jsonl'], 'language': 'english'}]}\n")
  return root
