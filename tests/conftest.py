"""Shared fixtures: tiny random Hugging Face models built with transformers' own classes.

`tiny_qwen2_hf(**overrides)` and `tiny_deepseek_v2_hf(**overrides)` return a float32
`*ForCausalLM` in eval mode with eager attention (see `pretrain.convert.parity`).
`data_dir`: a two-component mixture of generated JSONL and its paths, for training runs.
`gcs_bucket`, `s3_bucket`: a bucket in a local emulator (tests/object_storage.py), for work directories and data.

Every test and every `pretrain` process a test starts shares one JAX persistent compilation cache, new for
each pytest run: a killed run's restart, a resume and a second test of the same tiny model load the step
they compiled before instead of compiling it again (the executable is the same, so results are too).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from tiny_tokenizers import sample_texts

from pretrain.convert import parity


# The modules that take longest (minutes each on 2 cores), in that order, then the rest in name order. A module
# runs whole on one xdist worker (--dist loadfile, --no-loadscope-reorder), and the two workers finish
# together only if the long ones start first; in name order test_train*.py came last.
LONGEST_FIRST = ("test_train.py", "test_multihost.py", "test_object_storage.py", "test_run_safety.py",
                 "test_loss.py", "test_models.py", "test_generate.py", "test_stages.py", "test_train_evals.py",
                 "test_export.py", "test_prepare_beam.py", "test_context_parallel.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module stays


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory) -> pathlib.Path:
  """The session's compilation cache, set for this process and (through the environment) its children."""
  import jax

  base = tmp_path_factory.getbasetemp()
  directory = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-compilation-cache"
  directory.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)
    jax.config.update(name, value)
  return directory


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
