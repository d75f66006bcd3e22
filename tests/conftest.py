"""Shared fixtures: tiny random Hugging Face models built with transformers' own classes.

`tiny_qwen2_hf(**overrides)` and `tiny_deepseek_v2_hf(**overrides)` return a float32
`*ForCausalLM` in eval mode with eager attention (see `pretrain.convert.parity`).
`data_dir`: a two-component mixture of generated JSONL and its paths, for training runs.
`gcs_bucket`, `s3_bucket`: a bucket in a local emulator (tests/object_storage.py), for work directories and data.
"""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="session")
def object_storage_env():
  """Local GCS (fake-gcs-server) and S3 (moto) emulators on 127.0.0.1, the clients pointed at them through
  the environment (so subprocesses reach them too), each with an empty bucket named `bucket`; stopped,
  and the environment restored, at the end of the session. Yields (gcs url, s3 url)."""
  import fsspec.config
  import object_storage

  from pretrain import storage

  with object_storage.gcs_emulator() as gcs, object_storage.s3_emulator() as s3:
    env = storage.emulator_env(gcs=gcs, s3=s3)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its FSSPEC_* settings when first imported
    object_storage.create_gcs_bucket(gcs, "bucket")
    object_storage.create_s3_bucket(s3, "bucket")
    try:
      yield gcs, s3
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      fsspec.config.conf.get("gcs", {}).pop("token", None)


@pytest.fixture
def gcs_bucket(object_storage_env) -> str:
  """`gs://bucket` in the GCS emulator."""
  return "gs://bucket"


@pytest.fixture
def s3_bucket(object_storage_env) -> str:
  """`s3://bucket` in the S3 emulator."""
  return "s3://bucket"
