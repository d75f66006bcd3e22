"""`pretrain prepare` with its inputs and its output on object storage (local emulators: tests/object_storage.py).

Inputs on a bucket (a prefix read as a source tree, a glob of JSONL.gz objects, single JSONL and Parquet
objects) prepare into a bucket exactly as the same files do locally (the documents' sources named by their
URLs); a rerun writes nothing; the Beam engine writes the same objects as the local one. Missing buckets,
objects and corrupt inputs are one clear error naming the URL, with nothing left under the output.
"""

from __future__ import annotations

import json
import pathlib
import re

import fsspec
import pytest
from test_object_storage import upload
from test_prepare import (ByteTokenizer, make_mixture, prepare_cli, read_documents, tokenizer_json,  # noqa: F401
                          write_inputs)

from pretrain import storage
from pretrain.data import prepare, records
from pretrain.data.config import Prepare
from pretrain.schema import ConfigError


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("inputs")
  write_inputs(root)
  (root / "src" / ".git").mkdir()
  (root / "src" / ".git" / "hidden.py").write_text("x = 1\n")  # skipped, as a local walk skips it
  return root


def run(mixture, out, **config) -> dict:
  return prepare.prepare(mixture, out, ByteTokenizer(), config=Prepare(**{"docs_per_shard": 2, "workers": 1,
                                                                           **config}), tokenizer_path="bytes")


def objects(url: str) -> dict[str, bytes]:
  fs, root = fsspec.core.url_to_fs(url)
  return {name.removeprefix(root.rstrip("/") + "/"): fs.cat_file(name) for name in sorted(fs.find(root))}


def local_documents(out: pathlib.Path, component: str) -> list[tuple]:
  return [(d.tokens.tolist(), d.domain, d.language, d.source) for d in read_documents(out, component)]


def bucket_documents(url: str, component: str, tmp_path: pathlib.Path, sources_at: str) -> list[tuple]:
  """A bucket's shards read back, their sources' URLs given as the local paths they mirror."""
  copy = tmp_path / "copy"
  for name, data in objects(url).items():
    (copy / name).parent.mkdir(parents=True, exist_ok=True)
    (copy / name).write_bytes(data)
  return [(tokens, domain, language, source.replace(sources_at, str(tmp_path / "in")))
          for tokens, domain, language, source in local_documents(copy, component)]


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_inputs_and_output_on_a_bucket_prepare_as_local_files_do(local_inputs, tmp_path, bucket, request):
  root = f"{request.getfixturevalue(bucket)}/{tmp_path.name}"
  local = tmp_path / "in"
  upload(local_inputs, f"{root}/in")
  write_inputs(local)  # the same tree, for the local run the bucket's must match
  want = run(make_mixture(local), tmp_path / "local")
  got = run(make_mixture(local, code=[f"{root}/in/src"], text=[f"{root}/in/text.jsonl", f"{root}/in/*.jsonl.gz"],
                         math=[f"{root}/in/math.parquet"]), f"{root}/out")

  assert json.loads(storage.as_path(f"{root}/out/manifest.json").read_text()) == got
  for name in ("code", "text", "math"):
    assert got["components"][name]["documents_written"] == want["components"][name]["documents_written"] > 0
    assert bucket_documents(f"{root}/out", name, tmp_path, f"{root}/in") == local_documents(tmp_path / "local", name)
  strip = ("inputs", "shards")
  assert ({n: {k: v for k, v in c.items() if k not in strip} for n, c in got["components"].items()}
          == {n: {k: v for k, v in c.items() if k not in strip} for n, c in want["components"].items()})
  assert got["components"]["code"]["skipped"]["binary_files"] == 1  # the walk of a prefix skips as a local one
  plan = json.loads(storage.as_path(f"{root}/out/plan.json").read_text())
  assert plan["fingerprint"]["config"] == json.loads((tmp_path / "local" / "plan.json").read_text()
                                                     )["fingerprint"]["config"]

  before = objects(f"{root}/out")
  lines = []
  assert prepare.prepare(make_mixture(local, code=[f"{root}/in/src"], text=[f"{root}/in/text.jsonl",
                                                                             f"{root}/in/*.jsonl.gz"],
                                      math=[f"{root}/in/math.parquet"]), f"{root}/out", ByteTokenizer(),
                         config=Prepare(docs_per_shard=2, workers=1), tokenizer_path="bytes",
                         log=lines.append) == got
  assert not [line for line in lines if "tokenizing" in line or "wrote shard" in line]  # nothing redone
  assert objects(f"{root}/out") == before


@pytest.mark.slow
def test_the_beam_engine_writes_the_same_objects_into_a_bucket(local_inputs, tmp_path, gcs_bucket):
  pytest.importorskip("apache_beam")
  root = f"{gcs_bucket}/{tmp_path.name}"
  upload(local_inputs, f"{root}/in")
  mixture = make_mixture(local_inputs, code=[f"{root}/in/src"], text=[f"{root}/in/*.jsonl*"],
                         math=[f"{root}/in/math.parquet"])
  want = run(mixture, f"{root}/local")
  got = run(mixture, f"{root}/beam", engine="beam", beam_options=("--direct_num_workers=1",
                                                                  "--near_dedup_rounds=4"))
  assert got == want
  assert objects(f"{root}/beam") == objects(f"{root}/local")


@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_bad_urls_are_one_clear_error_and_leave_nothing_behind(local_inputs, tmp_path, bucket, request, tokenizer_json,
                                                               capsys):
  scheme = request.getfixturevalue(bucket).split("://")[0]
  root = f"{request.getfixturevalue(bucket)}/{tmp_path.name}"
  upload(local_inputs, f"{root}/in")
  out = f"{root}/out"
  key = "mixture tiny.components[0].inputs"
  cases = [
      ([f"{scheme}://no-such-bucket/src"], f"{key}: {scheme}://no-such-bucket/src: bucket {scheme}://no-such-bucket "
       "does not exist"),
      ([f"{root}/in/nothing"], f"{key}: '{root}/in/nothing': {root}/in/nothing: no such object, nor objects under it"),
      ([f"{root}/in/src/*.rs"], f"{key}: '{root}/in/src/*.rs' ({root}/in/src/*.rs) matches no object"),
  ]
  for inputs, message in cases:
    with pytest.raises(ConfigError, match=re.escape(message)):
      run(make_mixture(local_inputs, code=inputs), out)
  (storage.as_path(root) / "in" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
  with pytest.raises(ConfigError, match=re.escape(f"{root}/in/bad.jsonl:2: corrupt JSONL line")):
    run(make_mixture(local_inputs, text=[f"{root}/in/bad.jsonl"]), out)
  assert not objects(out)
  with pytest.raises(ConfigError, match=f"config.data.prepared_dir: {scheme}://no-such-bucket/out: bucket "):
    run(make_mixture(local_inputs), f"{scheme}://no-such-bucket/out")
  assert prepare_cli(tokenizer_json, f"{scheme}://no-such-bucket/out", "--input", str(local_inputs / "src")) == 2
  assert f"--out: {scheme}://no-such-bucket/out: bucket {scheme}://no-such-bucket does not exist" in capsys.readouterr().err


def test_shards_written_into_a_bucket_read_back(tmp_path, gcs_bucket):
  import numpy as np
  url = f"{gcs_bucket}/{tmp_path.name}/shard-00000-of-00001{records.SHARD_SUFFIX}"
  docs = [records.Document(tokens=np.arange(n, dtype=np.int32), domain="code", language="python", source=f"s{n}")
          for n in (3, 5)]
  assert records.write_shard(url, docs) == 2
  copy = storage.download(f"{gcs_bucket}/{tmp_path.name}", "shards") / pathlib.Path(url).name
  assert [d.tokens.tolist() for d in records.read_shard(copy)] == [[0, 1, 2], [0, 1, 2, 3, 4]]
  assert records.document_lengths(copy).tolist() == [3, 5]
