"""`prepare` end to end on a tiny mixture: counts, shards, dedup, resuming, and bad inputs.

The tokenizer here is a stand-in (UTF-8 bytes as ids) so these tests do not depend on a
trained one; one test at the end runs the real sentencepiece trainer and loader.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHashLSH

from pretrain import schema
from pretrain.data import dedup, prepare, prepare_steps, records, sources
from pretrain.data.config import Dedup, Prepare
from pretrain.data.mixture import Mixture
from pretrain.schema import ConfigError


class ByteTokenizer:
  """UTF-8 bytes as ids: lossless."""

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)

  def normalize(self, text: str) -> str:
    return text

  def is_byte_exact(self, text: str, ids) -> bool:
    return bytes(np.asarray(ids, np.uint8)) == self.normalize(text).encode()

  def describe(self) -> dict:
    return {"kind": "bytes", "vocab_size": 256}


class AsciiTokenizer(ByteTokenizer):
  """Loses every non-ASCII character, as a tokenizer without byte fallback would."""

  def encode(self, text: str) -> np.ndarray:
    return super().encode(text.encode("ascii", "ignore").decode())


def code_file(seed: int, words: int = 400) -> str:
  rng = random.Random(seed)
  vocabulary = ["value", "index", "result", "count", "items", "total", "name", "data", "buffer", "offset",
                "return", "for", "in", "if", "else", "while", "not", "and", "or", "len", "range", "append"]
  out = []
  for i in range(words // 8):
    out.append(f"def f{seed}_{i}(" + ", ".join(rng.choice(vocabulary) for _ in range(3)) + "):")
    out.append("  " + " ".join(rng.choice(vocabulary) for _ in range(5)))
  return "\n".join(out) + "\n"


def lightly_edited(text: str) -> str:
  lines = text.splitlines()
  lines[3] = lines[3].replace("(", "(extra, ", 1)
  lines[20] = "  # a comment added"
  return "\n".join(lines) + "\n"


ORIGINAL = code_file(1)
TEXTS = ["The first text document has plenty of words in it.", "A second one, about something else entirely.",
         "Third: another unrelated paragraph of prose."]
GZ_TEXTS = ["Gzipped document number one, with its own words.", "Gzipped document number two is different."]
MATH = ["Problem: Compute 2 + 3.\nAnswer: 5", "Problem: Compute 7 * 6.\nAnswer: 42", "Problem: What is 10% of 50?"]


def write_inputs(root: pathlib.Path) -> None:
  src = root / "src"
  (src / "pkg" / "__pycache__").mkdir(parents=True)
  (src / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0compiled")
  (src / "a.py").write_text(ORIGINAL)
  (src / "pkg" / "a_copy.py").write_text(ORIGINAL)  # exact duplicate
  (src / "pkg" / "a_edited.py").write_text(lightly_edited(ORIGINAL))  # near duplicate
  (src / "other.js").write_text(code_file(2).replace("def ", "function "))  # unrelated
  (src / "tiny.json").write_text('{"name": "value"}')  # json_yaml_size
  (src / "minified.js").write_text("var x=1;" * 200)  # avg_line_length
  (src / "empty.py").write_text("\n\n")  # empty
  (src / "image.png").write_bytes(b"\x89PNG\0\0")  # unknown type
  (src / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8
  (src / "blob.c").write_bytes(b"int x;\0\0\0")  # binary
  (root / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:2]) + "\n\n"
                                   + json.dumps({"text": TEXTS[2], "language": "french"}) + "\n")
  with gzip.open(root / "more.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps({"text": t}) + "\n" for t in GZ_TEXTS))
  pq.write_table(pa.table({"text": MATH}), root / "math.parquet", row_group_size=2)


def make_mixture(root: pathlib.Path, **inputs) -> Mixture:
  inputs = {"code": ["src"], "text": ["text.jsonl", "*.jsonl.gz"], "math": ["math.parquet"], **inputs}
  domains = {"code": "code", "text": "text", "math": "math"}
  return schema.parse(Mixture, {"name": "tiny", "root": str(root), "components": [
      {"name": name, "domain": domains[name], "weight": 1.0, "inputs": paths,
       "language": "english" if name == "math" else ""} for name, paths in inputs.items()]})


@pytest.fixture
def inputs(tmp_path):
  write_inputs(tmp_path / "in")
  return tmp_path / "in"


def run(inputs: pathlib.Path, out: pathlib.Path, tokenizer=None, mixture=None, **config) -> dict:
  config = Prepare(**{"docs_per_shard": 2, "workers": 2, **config})
  return prepare.prepare(mixture or make_mixture(inputs), out, tokenizer or ByteTokenizer(), config=config,
                         tokenizer_path="bytes")


def shard_files(out: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob(f"*/*{records.SHARD_SUFFIX}"))}


def read_documents(out: pathlib.Path, component: str) -> list[records.Document]:
  return [d for p in sorted((out / component).glob(f"shard-*{records.SHARD_SUFFIX}")) for d in records.read_shard(p)]


# Dedup on its own.
def dedup_texts(texts: list[str], config: Dedup = Dedup()) -> dict[int, str]:
  return dedup.duplicates([(k, dedup.content_hash(t), dedup.signature(t, config)) for k, t in enumerate(texts)],
                          config)


def test_near_duplicate_caught_and_unrelated_kept():
  assert dedup_texts([ORIGINAL, lightly_edited(ORIGINAL), code_file(2), ORIGINAL]) == {
      1: "near_duplicate", 3: "exact_duplicate"}
  # The smallest key is kept whatever the order candidates come in.
  config = Dedup()
  candidates = [(k, dedup.content_hash(t), dedup.signature(t, config))
                for k, t in [(5, ORIGINAL), (2, lightly_edited(ORIGINAL)), (9, ORIGINAL)]]
  assert dedup.duplicates(candidates, config) == {5: "near_duplicate", 9: "exact_duplicate"}


def chain(text: str, edits: int) -> list[str]:
  """`text`, then versions of it each one line further from it than the one before."""
  lines, out = text.splitlines(), []
  for i in range(edits + 1):
    out.append("\n".join(lines) + "\n")
    lines[(37 * i + 5) % len(lines)] = f"  # edit {i}"
  return out


CHAIN = chain(ORIGINAL, 10)[1::4]  # 4 lines apart: Jaccard ~0.88; a and c, 8 apart: ~0.80


def test_near_dedup_is_connected_components():
  """a~b~c with a and c not similar: greedy dedup in order would keep a and c; components keep a alone."""
  config = Dedup()
  a, b, c = CHAIN
  sa, sb, sc = (dedup.signature(t, config) for t in (a, b, c))
  assert dedup.similar(sa, sb, config.threshold) and dedup.similar(sb, sc, config.threshold)
  assert not dedup.similar(sa, sc, config.threshold)
  bands = [set(dedup.band_keys(s, config)) for s in (sa, sb, sc)]
  assert bands[0] & bands[1] and bands[1] & bands[2]  # LSH candidates, not only similar
  assert dedup_texts([a, b, c]) == {1: "near_duplicate", 2: "near_duplicate"}  # greedy kept c (not like a)
  assert dedup_texts([c, a, b]) == {1: "near_duplicate", 2: "near_duplicate"}  # the smallest key, c, kept
  assert dedup.band_split(0.85, 128) == (MinHashLSH(threshold=0.85, num_perm=128).b,
                                         MinHashLSH(threshold=0.85, num_perm=128).r)


def test_signature_estimates_jaccard():
  config = Dedup()
  a, b = dedup.signature(ORIGINAL, config), dedup.signature(lightly_edited(ORIGINAL), config)
  assert np.mean(a == b) > 0.85
  assert np.mean(a == dedup.signature(code_file(2), config)) < 0.2
  assert a.shape == (config.num_perm,)


# End to end.
def test_prepare_counts_and_shards(inputs, tmp_path):
  out = tmp_path / "out"
  manifest = run(inputs, out)
  assert json.loads((out / "manifest.json").read_text()) == manifest

  code = manifest["components"]["code"]
  assert code["documents_read"] == 7  # a.py, a_copy.py, a_edited.py, other.js, tiny.json, minified.js, empty.py
  assert code["skipped"] == {"unknown_type_files": 1, "binary_files": 1, "undecodable_files": 1,
                             "corrupt_records": 0, "corrupt_files": 0}
  dropped = {k: v for k, v in code["dropped"].items() if v}
  assert dropped == {"empty": 1, "json_yaml_size": 1, "avg_line_length": 1, "exact_duplicate": 1,
                     "near_duplicate": 1}
  assert code["documents_written"] == 2
  assert code["by_language"]["python"]["documents_read"] == 4
  assert code["by_language"]["javascript"]["dropped"]["avg_line_length"] == 1

  # The first in sorted path order is kept: src/a.py before src/pkg/*.
  docs = read_documents(out, "code")
  assert [pathlib.Path(d.source).name for d in docs] == ["a.py", "other.js"]
  assert [d.language for d in docs] == ["python", "javascript"]
  assert bytes(docs[0].tokens.astype(np.uint8)) == ORIGINAL.encode()
  assert code["tokens_written"] == sum(d.tokens.size for d in docs)

  text = manifest["components"]["text"]
  assert (text["documents_read"], text["documents_written"]) == (5, 5)
  docs = read_documents(out, "text")
  assert [bytes(d.tokens.astype(np.uint8)).decode() for d in docs] == TEXTS + GZ_TEXTS
  assert [d.source.rsplit("/", 1)[1] for d in docs] == ["text.jsonl:1", "text.jsonl:2", "text.jsonl:4",
                                                        "more.jsonl.gz:1", "more.jsonl.gz:2"]
  assert [d.language for d in docs] == ["unknown", "unknown", "french", "unknown", "unknown"]
  assert len(text["shards"]) == 3 and [s["documents"] for s in text["shards"]] == [2, 2, 1]

  docs = read_documents(out, "math")
  assert [bytes(d.tokens.astype(np.uint8)).decode() for d in docs] == MATH
  assert [d.source.rsplit("#", 1)[1] for d in docs] == ["0", "1", "2"]
  assert {d.domain for d in docs} == {"math"} and {d.language for d in docs} == {"english"}

  assert manifest["documents_written"] == 2 + 5 + 3
  assert manifest["by_domain"]["math"] == {"documents_read": 3, "documents_written": 3,
                                           "tokens_written": sum(len(m) for m in MATH)}
  assert manifest["tokenizer"]["kind"] == "bytes" and manifest["tokenizer"]["path"] == "bytes"
  assert manifest["mixture"] == "tiny"
  for component in manifest["components"].values():
    for shard in component["shards"]:
      assert (out / shard["path"]).exists()


def test_worker_count_does_not_change_the_output(inputs, tmp_path):
  one, two = run(inputs, tmp_path / "one", workers=1), run(inputs, tmp_path / "two", workers=2)
  assert {k: v for k, v in one.items() if k != "config"} == {k: v for k, v in two.items() if k != "config"}
  for name in ("code", "text", "math"):
    assert [d.tokens.tolist() for d in read_documents(tmp_path / "one", name)] == \
           [d.tokens.tolist() for d in read_documents(tmp_path / "two", name)]


# Resuming.
def test_rerun_skips_finished_shards(inputs, tmp_path):
  out = tmp_path / "out"
  first = run(inputs, out)
  before = shard_files(out)
  assert run(inputs, out) == first
  assert shard_files(out) == before  # nothing rewritten


def test_interrupted_run_is_completed(inputs, tmp_path):
  out = tmp_path / "out"
  first = run(inputs, out)
  before = shard_files(out)
  (out / "text" / "shard-00001-of-00003.array_record").unlink()  # never written
  (out / "math" / "shard-00000-of-00002.stats.json").unlink()  # written, stats not yet
  leftover = out / "text" / ".shard-00001-of-00003.array_record.tmp-12345"  # the temp file a crash leaves
  leftover.write_bytes(b"half a shard")
  assert run(inputs, out) == first
  after = shard_files(out)
  assert not leftover.exists()
  assert after.keys() == before.keys()
  rewritten = {name for name in before if after[name] != before[name]}
  assert rewritten == {"text/shard-00001-of-00003.array_record", "math/shard-00000-of-00002.array_record"}


class FailingTokenizer(ByteTokenizer):
  def __init__(self, fail_at: int):
    self.calls, self.fail_at = 0, fail_at

  def encode(self, text):
    self.calls += 1
    if self.calls == self.fail_at:
      raise KeyboardInterrupt
    return super().encode(text)


def test_crash_leaves_only_finished_shards_and_rerun_completes(inputs, tmp_path):
  out, clean = tmp_path / "out", tmp_path / "clean"
  expected = run(inputs, clean, workers=1)
  with pytest.raises(KeyboardInterrupt):
    run(inputs, out, tokenizer=FailingTokenizer(fail_at=4), workers=1)
  assert not (out / "manifest.json").exists()
  for shard in out.glob(f"*/shard-*{records.SHARD_SUFFIX}"):
    list(records.read_shard(shard))  # every file named like a shard is a whole one
  assert run(inputs, out, workers=1) == expected


def test_failed_shard_write_leaves_no_shard_name(inputs, tmp_path, monkeypatch):
  out = tmp_path / "out"
  encode, written = records.encode, []

  def failing_encode(doc):
    written.append(doc)
    if len(written) == 3:
      raise OSError("disk full")
    return encode(doc)

  monkeypatch.setattr(records, "encode", failing_encode)
  with pytest.raises(OSError, match="disk full"):
    run(inputs, out)
  assert sorted(p.name for p in (out / "code").iterdir()) == [
      "selection.npz", "shard-00000-of-00001.array_record", "shard-00000-of-00001.array_record.lengths.npy",
      "shard-00000-of-00001.stats.json"]
  assert sorted(p.name for p in (out / "text").iterdir()) == ["selection.npz"]  # no temp file, no shard
  monkeypatch.setattr(records, "encode", encode)
  assert run(inputs, out)["documents_written"] == 10


# Bad inputs.
def test_missing_path(inputs, tmp_path):
  with pytest.raises(ConfigError, match=r"components\[1\]\.inputs.*nope\.jsonl.*does not exist"):
    run(inputs, tmp_path / "out", mixture=make_mixture(inputs, text=["nope.jsonl"]))


def test_glob_matching_nothing(inputs, tmp_path):
  with pytest.raises(ConfigError, match=r"components\[2\]\.inputs.*\*\.parquet.*matches no file"):
    run(inputs, tmp_path / "out", mixture=make_mixture(inputs, math=["missing/*.parquet"]))


def corrupt_jsonl(inputs: pathlib.Path) -> None:
  with open(inputs / "text.jsonl", "a") as f:
    f.write('{"text": "cut off in the mid\n')  # line 5
    f.write('{"body": "no text field"}\n')  # line 6


def test_corrupt_jsonl_line_named(inputs, tmp_path):
  corrupt_jsonl(inputs)
  with pytest.raises(sources.CorruptInputError, match=r"text\.jsonl:5: corrupt JSONL line"):
    run(inputs, tmp_path / "out")  # raised in a worker process, named in the parent


def test_corrupt_jsonl_lines_skipped_and_counted(inputs, tmp_path):
  corrupt_jsonl(inputs)
  text = run(inputs, tmp_path / "out", skip_corrupt_records=True)["components"]["text"]
  assert text["skipped"]["corrupt_records"] == 2
  assert text["documents_written"] == 5


def test_corrupt_parquet_and_gzip_files(inputs, tmp_path):
  (inputs / "math.parquet").write_bytes(b"PAR1 not really parquet")
  with pytest.raises(sources.CorruptInputError, match=r"math\.parquet#0: unreadable Parquet"):
    run(inputs, tmp_path / "a")
  (inputs / "more.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:40])  # truncated
  with pytest.raises(ConfigError, match=r"component 'math' .* skipped 1 corrupt file; nothing was written"):
    run(inputs, tmp_path / "b", skip_corrupt_records=True)  # its only input skipped: nothing to prepare
  pq.write_table(pa.table({"text": MATH}), inputs / "more.parquet")
  manifest = run(inputs, tmp_path / "b", skip_corrupt_records=True,
                 mixture=make_mixture(inputs, math=["math.parquet", "more.parquet"]))
  assert manifest["components"]["math"]["skipped"]["corrupt_files"] == 1
  assert manifest["components"]["text"]["skipped"]["corrupt_files"] == 1


# Preparing nothing (issue 14.6): an error naming the component and why, with nothing written.
def one_component(root: pathlib.Path, *paths: str, domain: str = "code") -> Mixture:
  return schema.parse(Mixture, {"name": "m", "root": str(root), "components": [
      {"name": "only", "domain": domain, "weight": 1.0, "inputs": list(paths)}]})


def make_empty(root):
  (root / "src").mkdir()


def make_binaries(root):
  (root / "src").mkdir()
  (root / "src" / "a.c").write_bytes(random.Random(0).randbytes(4000) + b"\0")
  (root / "src" / "b.py").write_bytes(b"x = 1\0")


def make_random_file(root):
  (root / "src").mkdir()
  (root / "src" / "noise.py").write_bytes(bytes(b or 1 for b in random.Random(1).randbytes(4000)))  # no NUL byte


def make_latin1(root):
  (root / "src").mkdir()
  (root / "src" / "latin1.py").write_bytes(LATIN1)


def make_filtered(root):
  (root / "src").mkdir()
  (root / "src" / "empty.py").write_text("\n\n")
  (root / "src" / "tiny.json").write_text('{"name": "value"}')
  (root / "src" / "notes.txt.bak").write_text("not a source file")


LATIN1 = "# G\xe9rard's caf\xe9\ncaf\xe9 = 'cr\xe8me br\xfbl\xe9e'\n".encode("latin-1")


@pytest.mark.parametrize("make, why", [
    (make_empty, r"0 files found, 0 documents read; nothing was written"),
    (make_binaries, r"2 files found, 0 documents read; skipped 2 binary files; nothing was written"),
    (make_random_file, r"1 file found, 0 documents read; skipped 1 file not UTF-8; set "
                       r"config\.data\.prepare\.fallback_encoding .*; nothing was written"),
    (make_latin1, r"1 file found, 0 documents read; skipped 1 file not UTF-8; set "
                  r"config\.data\.prepare\.fallback_encoding \(or --fallback-encoding\), e\.g\. cp1252, .*"),
    (make_filtered, r"3 files found, 2 documents read; skipped 1 file of unknown type; dropped 1 empty, "
                    r"1 json_yaml_size; .*give \.jsonl and \.parquet files as inputs; nothing was written"),
], ids=["empty", "binaries", "random_bytes", "latin1", "filtered"])
def test_component_without_documents_is_an_error(tmp_path, make, why):
  root, out = tmp_path / "in", tmp_path / "out"
  root.mkdir()
  make(root)
  with pytest.raises(ConfigError, match=r"^mixture m\.components\[0\]: component 'only' \(inputs: src\) yields "
                     r"no document: " + why):
    run(root, out, mixture=one_component(root, "src"))
  assert not out.exists()  # no plan.json, no manifest, no component directory


def test_random_bytes_are_not_text_in_a_single_byte_fallback(tmp_path):
  root, out = tmp_path / "in", tmp_path / "out"
  root.mkdir()
  make_random_file(root)  # latin-1 maps every byte, but to control characters too
  with pytest.raises(ConfigError, match=r"skipped 1 file not UTF-8 nor latin-1 text; nothing was written"):
    run(root, out, mixture=one_component(root, "src"), fallback_encoding="latin-1")
  assert not out.exists()


def test_corrupt_records_only(tmp_path):
  root, out = tmp_path / "in", tmp_path / "out"
  root.mkdir()
  (root / "noise.jsonl").write_bytes(random.Random(2).randbytes(3000).replace(b"\0", b"\n"))
  with pytest.raises(sources.CorruptInputError, match=r"noise\.jsonl:1: .*--skip-corrupt-records"):
    run(root, out, mixture=one_component(root, "noise.jsonl", domain="text"))
  with pytest.raises(ConfigError, match=r"component 'only' \(inputs: noise\.jsonl\) yields no document: 1 file found, "
                     r"0 documents read; skipped \d+ corrupt records; nothing was written"):
    run(root, out, mixture=one_component(root, "noise.jsonl", domain="text"), skip_corrupt_records=True)
  assert not out.exists()


def test_one_empty_component_fails_the_mixture_before_any_write(inputs, tmp_path):
  make_binaries(tmp_path)
  out = tmp_path / "out"
  mixture = make_mixture(inputs, text=[str(tmp_path / "src")])
  with pytest.raises(ConfigError, match=r"components\[1\]: component 'text' .* skipped 2 binary files"):
    run(inputs, out, mixture=mixture)
  assert not out.exists()  # not even the good components' shards
  # A directory prepared before keeps what it holds, even when told to overwrite a mismatch.
  first = run(inputs, out)
  before = shard_files(out)
  with pytest.raises(ConfigError, match="component 'text'"):
    prepare.prepare(mixture, out, ByteTokenizer(), config=Prepare(workers=1), tokenizer_path="bytes",
                    overwrite_mismatch=True)
  assert shard_files(out) == before and json.loads((out / "manifest.json").read_text()) == first


def test_latin1_source_decoded_by_fallback(inputs, tmp_path):
  (inputs / "src" / "latin1.py").write_bytes(LATIN1)
  manifest = run(inputs, tmp_path / "out", fallback_encoding="latin-1")
  code = manifest["components"]["code"]
  assert code["skipped"]["undecodable_files"] == 0 and code["skipped"]["binary_files"] == 1
  assert code["fallback_decoded"] == {"encoding": "latin-1", "files": 1}
  assert code["documents_read"] == 8
  texts = [bytes(d.tokens.astype(np.uint8)).decode() for d in read_documents(tmp_path / "out", "code")]
  assert LATIN1.decode("latin-1") in texts
  assert prepare_steps.file_notes(code["skipped"], 1, "latin-1") == (
      "skipped 1 binary file, 1 file of unknown type; decoded as latin-1: 1 file")


def test_fallback_left_unset_keeps_the_plan_of_before(inputs, tmp_path):
  """Directories prepared before `fallback_encoding` existed stay valid: unset, it is not in the plan."""
  run(inputs, tmp_path / "out")
  plan = json.loads((tmp_path / "out" / "plan.json").read_text())
  assert "fallback_encoding" not in plan["config"]
  manifest = run(inputs, tmp_path / "other", fallback_encoding="cp1252")
  assert json.loads((tmp_path / "other" / "plan.json").read_text())["config"]["fallback_encoding"] == "cp1252"
  assert manifest["components"]["code"]["fallback_decoded"] == {"encoding": "cp1252", "files": 1}
  with pytest.raises(ConfigError, match=r"prepare\.fallback_encoding: 'rot13' is not a text encoding"):
    run(inputs, tmp_path / "bad", fallback_encoding="rot13")


# The command line: one line and exit 2 for nothing to prepare; the skip and fallback settings as flags.
@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  import tiny_tokenizers

  return str(tiny_tokenizers.build_byte_level_bpe(tmp_path_factory.mktemp("bpe")))


def prepare_cli(tokenizer_json, out, *args):
  from pretrain import cli

  return cli.main(["prepare", "--domain", "code", "--tokenizer", tokenizer_json, "--out", str(out), "--workers", "1",
                   *args])


def test_cli_empty_input_exits_2_with_one_line(tmp_path, tokenizer_json, capsys):
  make_binaries(tmp_path)
  out = tmp_path / "out"
  assert prepare_cli(tokenizer_json, out, "--input", str(tmp_path / "src")) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("pretrain prepare: error: mixture inputs.components[0]: component "
                                                  f"'code' (inputs: {tmp_path / 'src'}) yields no document: 2 files")
  assert not out.exists()


def test_cli_fallback_encoding(tmp_path, tokenizer_json, capsys):
  make_latin1(tmp_path)
  (tmp_path / "src" / "blob.c").write_bytes(b"int x;\0")
  assert prepare_cli(tokenizer_json, tmp_path / "a", "--input", str(tmp_path / "src")) == 2
  assert "skipped 1 binary file, 1 file not UTF-8; set config.data.prepare.fallback_encoding" in capsys.readouterr().err
  assert prepare_cli(tokenizer_json, tmp_path / "b", "--input", str(tmp_path / "src"), "--fallback-encoding",
                     "latin-1") == 0
  assert "code               1 documents" in (out := capsys.readouterr().out)
  assert "(skipped 1 binary file; decoded as latin-1: 1 file)" in out
  assert prepare_cli(tokenizer_json, tmp_path / "c", "--input", str(tmp_path / "src"), "--fallback-encoding",
                     "nope") == 2
  assert "--fallback-encoding: 'nope' is not a text encoding" in capsys.readouterr().err


def test_cli_skip_corrupt_records(inputs, tmp_path, tokenizer_json, capsys):
  corrupt_jsonl(inputs)
  jsonl = str(inputs / "text.jsonl")
  assert prepare_cli(tokenizer_json, tmp_path / "a", "--input", jsonl) == 2
  assert "pass --skip-corrupt-records to `pretrain prepare --input`" in capsys.readouterr().err
  for flag in ("--skip_corrupt_records", "--skip-corrupt-records"):
    assert prepare_cli(tokenizer_json, tmp_path / flag, "--input", jsonl, flag) == 0
    assert "3 documents" in (out := capsys.readouterr().out) and "(skipped 2 corrupt records)" in out
  from pretrain import cli

  assert cli.main(["prepare", "--config=configs/default.py", "--skip-corrupt-records"]) == 2  # a config key there
  assert "set --config.data.prepare.skip_corrupt_records=True" in capsys.readouterr().err


def test_rerun_with_other_inputs_or_config_refused(inputs, tmp_path):
  out = tmp_path / "out"
  run(inputs, out)
  with pytest.raises(FileExistsError, match="different config"):
    run(inputs, out, docs_per_shard=3)
  (inputs / "text.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
  with pytest.raises(FileExistsError, match="different inputs"):
    run(inputs, out)
  manifest = prepare.prepare(make_mixture(inputs), out, ByteTokenizer(), config=Prepare(docs_per_shard=3),
                             tokenizer_path="bytes", overwrite_mismatch=True)
  assert manifest["components"]["text"]["documents_written"] == 3
  assert sorted(p.name for p in (out / "text").glob("shard-*")) == [
      "shard-00000-of-00001.array_record", "shard-00000-of-00001.array_record.lengths.npy",
      "shard-00000-of-00001.stats.json"]


def test_lossy_tokenizer(tmp_path):
  root = tmp_path / "in"
  root.mkdir()

  def prepare_with(accented: int):
    rows = [f"document {i} in plain ASCII" for i in range(200)]
    rows[:accented] = [f"document {i} with an accent: café" for i in range(accented)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    mixture = schema.parse(Mixture, {"name": "m", "root": str(root), "components": [
        {"name": "text", "domain": "text", "weight": 1.0, "inputs": ["docs.jsonl"]}]})
    return prepare.prepare(mixture, tmp_path / f"out{accented}", AsciiTokenizer(),
                           config=Prepare(workers=1, dedup=Dedup(near=False)), tokenizer_path="ascii")

  manifest = prepare_with(2)  # 1%: counted
  assert manifest["components"]["text"]["dropped"]["tokenizer_not_byte_exact"] == 2
  assert manifest["components"]["text"]["documents_written"] == 198
  with pytest.raises(ConfigError, match=r"3 of 200 .*docs\.jsonl:1.*not lossless"):
    prepare_with(3)


def test_real_sentencepiece_tokenizer(inputs, tmp_path):
  tokenizer_train = pytest.importorskip("pretrain.data.tokenizer_train")
  from pretrain.data.config import SpecialTokens
  from pretrain.data.tokenizer import load_tokenizer

  texts = [ORIGINAL, code_file(2), *TEXTS, *GZ_TEXTS, *MATH] * 3
  path = tokenizer_train.train_sentencepiece(texts, tmp_path / "tok", vocab_size=400, special_tokens=SpecialTokens())
  tokenizer = load_tokenizer(path, SpecialTokens())
  manifest = prepare.prepare(make_mixture(inputs), tmp_path / "out", tokenizer, config=Prepare(workers=2),
                             tokenizer_path=str(path))
  assert manifest["documents_written"] == 10
  assert manifest["tokenizer"]["vocab_size"] == 400
  docs = read_documents(tmp_path / "out", "text")
  assert [tokenizer.decode(d.tokens) for d in docs] == TEXTS + GZ_TEXTS
  assert all(d.tokens.max() < 400 for d in docs)
