"""The Beam engine (prepare_beam) against the local one: the same kept documents, shard bytes and manifests.

Beam runs in process (its DirectRunner: in memory, threads or processes), nothing downloaded. The
corpus is a slice of the built-in one with exact and near duplicates and a near-duplicate chain
injected; the local engine prepares it once, and every Beam run must write the same bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("apache_beam")
import apache_beam as beam  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from pretrain import schema  # noqa: E402
from pretrain.data import builtin_corpus, dedup, prepare, prepare_steps, records, sources  # noqa: E402
from pretrain.data.components_beam import ConnectedComponents  # noqa: E402
from pretrain.data.config import Dedup, Prepare  # noqa: E402
from pretrain.data.mixture import Mixture  # noqa: E402
from pretrain.schema import ConfigError  # noqa: E402
from test_prepare import (CHAIN, ByteTokenizer, lightly_edited, make_mixture,  # noqa: E402
                          prepare_cli, read_documents, tokenizer_json, write_inputs)  # noqa: F401 (a fixture)

ROUNDS = "--near_dedup_rounds=8"  # enough for this corpus' components; fewer stages, a faster test


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("corpus")
  builtin_corpus.write_builtin_corpus(root, max_code_files=40)
  for stem, keep in (("text", 1), ("math", 2)):  # a few parts of each: enough documents, a short test
    for part in sorted((root / stem).glob("*.jsonl"))[keep:]:
      part.unlink()
  code = sorted(p for p in (root / "code").rglob("*.py") if p.stat().st_size > 2000)
  dups = root / "code" / "zz_dups"
  dups.mkdir()
  shutil.copy(code[0], dups / "copy0.py")  # exact duplicates
  shutil.copy(code[1], dups / "copy1.py")
  (dups / "edited0.py").write_text(lightly_edited(code[0].read_text()))  # a near duplicate
  a, b, c = CHAIN  # a~b~c, a and c not similar (asserted in test_prepare); in key order: c, a, b
  (dups / "chain0.py").write_text(c)
  (dups / "chain1.py").write_text(a)
  (dups / "chain2.py").write_text(b)
  lines = (root / "text" / "text-00000.jsonl").read_text().splitlines()
  edited = [json.dumps({"text": json.loads(line)["text"] + "\nSee also the tutorial."}) for line in lines[:20]]
  (root / "text" / "text-00001.jsonl").write_text("\n".join(lines[:10] + edited) + "\n")  # exact and near
  return root


def corpus_mixture(root: pathlib.Path, **inputs) -> Mixture:
  inputs = {"code": ["code"], "text": ["text/*.jsonl"], "math": ["math/*.jsonl"], **inputs}
  domains = {"code": "code", "text": "text", "math": "math"}
  return schema.parse(Mixture, {"name": "slice", "root": str(root), "components": [
      {"name": name, "domain": domains[name], "weight": 1.0, "inputs": paths} for name, paths in inputs.items()]})


def prepare_with(root, out, *beam_options, mixture=None, tokenizer=None, **config) -> dict:
  engine = {"engine": "beam", "beam_options": (ROUNDS, *beam_options)} if beam_options else {}
  config = Prepare(**{"docs_per_shard": 64, "workers": 2, **engine, **config})
  return prepare.prepare(mixture or corpus_mixture(root), out, tokenizer or ByteTokenizer(), config=config,
                         tokenizer_path="bytes")


def tree(out: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("local") / "out"
  prepare_with(corpus, out)
  return out


@pytest.mark.parametrize("options", [
    ("--direct_num_workers=1",),
    ("--direct_num_workers=4", "--direct_running_mode=multi_threading", "--unit_order_seed=1"),
    ("--direct_num_workers=4", "--direct_running_mode=multi_threading", "--unit_order_seed=2"),
], ids=["1-worker", "4-threads-split-1", "4-threads-split-2"])
def test_beam_writes_the_local_bytes(corpus, local, tmp_path, options):
  out = tmp_path / "beam"
  prepare_with(corpus, out, *options)
  expected, got = tree(local), tree(out)
  assert got.keys() == expected.keys()
  assert [name for name in expected if got[name] != expected[name]] == []  # shards, sidecars, plan, manifest


def test_dedup_counts_and_the_chain(corpus, local):
  manifest = json.loads((local / "manifest.json").read_text())
  code, text = manifest["components"]["code"], manifest["components"]["text"]
  assert code["dropped"]["exact_duplicate"] >= 2 and code["dropped"]["near_duplicate"] >= 3
  assert text["dropped"]["exact_duplicate"] >= 10 and text["dropped"]["near_duplicate"] >= 15
  sources_kept = {pathlib.Path(d.source).name for d in read_documents(local, "code")}
  # One component c~a~b: its smallest key (chain0.py, first in path order) alone is kept. Greedy dedup in
  # order kept chain0 and chain1 (a is not similar to c, the only document kept before it).
  assert {"chain0.py", "chain1.py", "chain2.py"} & sources_kept == {"chain0.py"}
  assert not {"copy0.py", "copy1.py", "edited0.py"} & sources_kept


@pytest.mark.parametrize("rule", [Dedup(near=False), Dedup(exact=False), Dedup(exact=False, near=False)],
                         ids=["exact-only", "near-only", "none"])
def test_dedup_settings_match(tmp_path, rule):
  write_inputs(tmp_path / "in")
  mixture = make_mixture(tmp_path / "in")
  local = prepare_with(tmp_path, tmp_path / "local", mixture=mixture, dedup=rule, docs_per_shard=2)
  assert prepare_with(tmp_path, tmp_path / "beam", "--direct_num_workers=1", mixture=mixture, dedup=rule,
                      docs_per_shard=2) == local
  assert tree(tmp_path / "beam") == tree(tmp_path / "local")


@pytest.mark.slow  # worker processes start a Python each: ~20 s
def test_beam_in_worker_processes(corpus, local, tmp_path, monkeypatch):
  here = str(pathlib.Path(__file__).parent)  # the workers unpickle the test tokenizer from test_prepare
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
  out = tmp_path / "beam"
  mixture = corpus_mixture(corpus, text=["text/text-00001.jsonl"], math=["math/math-00000.jsonl"])
  expected = prepare_with(corpus, tmp_path / "local", mixture=mixture)
  assert prepare_with(corpus, out, "--direct_num_workers=2", "--direct_running_mode=multi_processing",
                      mixture=mixture) == expected
  assert tree(out) == tree(tmp_path / "local")


def test_pipelines_do_not_carry_the_corpus(tmp_path, monkeypatch):
  """Both pipelines read their tasks (every input file; every kept document's position) from a file: a
  pipeline's description is the same size for 2 files of 10 documents as for 100 files of 30."""
  sizes = []
  run = beam.Pipeline.run

  def recording_run(pipeline, *args, **kwargs):
    sizes.append(len(pipeline.to_runner_api().SerializeToString()))
    return run(pipeline, *args, **kwargs)

  monkeypatch.setattr(beam.Pipeline, "run", recording_run)
  words = [f"w{i}" for i in range(500)]
  manifests = []
  for root, files, docs in ((tmp_path / "a", 2, 10), (tmp_path / "b", 100, 30)):
    root.mkdir()
    for f in range(files):
      rows = [" ".join(random.Random(f * 1000 + d).choices(words, k=60)) for d in range(docs)]
      (root / f"part-{f:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    mixture = schema.parse(Mixture, {"name": "n", "root": str(root), "components": [
        {"name": "text", "domain": "text", "weight": 1.0, "inputs": ["*.jsonl"]}]})
    manifests.append(prepare_with(root, root / "out", "--direct_num_workers=1", mixture=mixture,
                                  docs_per_shard=10_000)["components"]["text"])
  assert [m["documents_written"] for m in manifests] == [20, 3000]  # every document reached the shards
  (select_small, write_small), (select_large, write_large) = sizes[:2], sizes[2:]
  # Sent in a beam.Create, the larger corpus' tasks made the descriptions 1.5 kB and 7.7 kB larger (compressed).
  assert abs(select_large - select_small) < 200 and abs(write_large - write_small) < 200, sizes


# Bad input: the same error or counts as locally, and nothing that looks finished.
def test_corrupt_jsonl_is_the_local_error(corpus, tmp_path):
  root = tmp_path / "in"
  shutil.copytree(corpus, root)
  with open(root / "text" / "text-00001.jsonl", "a") as f:
    f.write('{"text": "cut off\n')
  threads = ("--direct_num_workers=2", "--direct_running_mode=multi_threading")
  for out, options in ((tmp_path / "local", ()), (tmp_path / "beam", threads)):
    with pytest.raises(sources.CorruptInputError, match=r"text-00001\.jsonl:31: corrupt JSONL line"):
      prepare_with(root, out, *options)
    assert not out.exists()  # no plan, no component directory, no shard
  local = prepare_with(root, tmp_path / "local", skip_corrupt_records=True)
  assert local == prepare_with(root, tmp_path / "beam", "--direct_num_workers=1", skip_corrupt_records=True)
  assert local["components"]["text"]["skipped"]["corrupt_records"] == 1


def test_corrupt_parquet_counted_or_named(corpus, tmp_path):
  root = tmp_path / "in"
  shutil.copytree(corpus, root, ignore=shutil.ignore_patterns("code"))
  (root / "code").mkdir()
  (root / "code" / "a.py").write_text(CHAIN[0])
  pq.write_table(pa.table({"text": ["Problem: 1 + 1?\nAnswer: 2", "Problem: 2 + 2?\nAnswer: 4"]}), root / "ok.parquet")
  (root / "bad.parquet").write_bytes(b"PAR1 not really parquet")
  mixture = corpus_mixture(root, math=["ok.parquet", "bad.parquet"])
  with pytest.raises(sources.CorruptInputError, match=r"bad\.parquet#0: unreadable Parquet"):
    prepare_with(root, tmp_path / "beam", "--direct_num_workers=1", mixture=mixture)
  assert not (tmp_path / "beam").exists()
  local = prepare_with(root, tmp_path / "local", mixture=mixture, skip_corrupt_records=True)
  beam_run = prepare_with(root, tmp_path / "beam", "--direct_num_workers=1", mixture=mixture,
                          skip_corrupt_records=True)
  assert beam_run == local and local["components"]["math"]["skipped"]["corrupt_files"] == 1


class FailingTokenizer(ByteTokenizer):
  """Fails on one document, as a worker that dies mid-shard."""

  def encode(self, text):
    if "cut here" in text:
      raise ValueError("tokenizer failed")
    return super().encode(text)


def test_failed_run_leaves_no_finished_looking_shard(corpus, local, tmp_path):
  root, out = tmp_path / "in", tmp_path / "beam"
  shutil.copytree(corpus, root)
  doomed = sorted((root / "math").glob("*.jsonl"))[-1]
  lines = doomed.read_text().splitlines()
  lines[-1] = json.dumps({"text": json.loads(lines[-1])["text"] + " cut here"})
  doomed.write_text("\n".join(lines) + "\n")
  with pytest.raises(Exception, match="tokenizer failed"):
    prepare_with(root, out, "--direct_num_workers=1", tokenizer=FailingTokenizer())
  assert not (out / "manifest.json").exists()
  for shard in out.glob(f"*/shard-*{records.SHARD_SUFFIX}"):
    assert prepare_steps.stats_path(shard).exists() or not shard.exists()
    list(records.read_shard(shard))  # every file named like a shard is a whole one
  assert not list(out.glob("*/.*.tmp-*"))
  assert len(list(out.glob("math/shard-*.stats.json"))) < len(list(local.glob("math/shard-*.stats.json")))
  rerun = prepare_with(root, out, "--direct_num_workers=1")  # completes what is missing
  assert rerun["documents_written"] == json.loads((local / "manifest.json").read_text())["documents_written"]


def test_cli_engine_flags(tmp_path, tokenizer_json, capsys):
  (tmp_path / "src").mkdir()
  for i, text in enumerate(CHAIN):
    (tmp_path / "src" / f"c{i}.py").write_text(text)
  assert prepare_cli(tokenizer_json, tmp_path / "local", "--input", str(tmp_path / "src")) == 0
  assert prepare_cli(tokenizer_json, tmp_path / "beam", "--input", str(tmp_path / "src"), "--engine", "beam",
                     "--beam-option=--direct_num_workers=2", "--beam-option=--direct_running_mode=multi_threading",
                     f"--beam-option={ROUNDS}") == 0
  out = capsys.readouterr().out
  assert "beam: reading" in out and out.count("code: kept 1 of 3 documents") == 2  # the chain: one kept
  assert tree(tmp_path / "beam") == tree(tmp_path / "local")


# Connected components on their own.
def run_components(edges, rounds, expected):
  with beam.Pipeline() as pipeline:
    assert_that(pipeline | beam.Create(edges) | ConnectedComponents(rounds), equal_to(expected))


def test_components_of_chains_and_stars():
  path = [(i + 1, i) for i in range(40)]  # 0-1-2-...-40: a chain whose keys follow it, the slowest case
  star = [(100 + i, 100) for i in range(1, 10)] + [(200, 150), (150, 120)]
  run_components(path + star, 24, [(i, 0) for i in range(1, 41)] + [(100 + i, 100) for i in range(1, 10)]
                 + [(200, 120), (150, 120)])


def test_components_not_converged_fail_loudly():
  with pytest.raises(Exception, match=r"did not converge in 1 rounds .*--near_dedup_rounds"):
    run_components([(i + 1, i) for i in range(40)], 1, [])


def test_engine_setting():
  with pytest.raises(ConfigError, match=r"prepare\.engine: must be 'local' or 'beam', got 'spark'"):
    Prepare(engine="spark").validate("prepare")
  with pytest.raises(ConfigError, match=r"prepare\.beam_options: set only with engine='beam'"):
    Prepare(beam_options=("--runner=DirectRunner",)).validate("prepare")
  assert "engine" not in prepare._config_dict(Prepare(engine="beam"))  # how it runs: not in plan or manifest
  assert dedup.band_split(Dedup().threshold, Dedup().num_perm)[0] > 1
