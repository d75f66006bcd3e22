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

from pretrain import schema
from pretrain.data import dedup, prepare, records, sources
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
def test_near_duplicate_caught_and_unrelated_kept():
  config = Dedup()
  deduplicator = dedup.Deduplicator(config)

  def offer(text):
    return deduplicator.offer(dedup.content_hash(text), dedup.signature(text, config))

  assert offer(ORIGINAL) is None
  assert offer(lightly_edited(ORIGINAL)) == "near_duplicate"
  assert offer(code_file(2)) is None
  assert offer(ORIGINAL) == "exact_duplicate"


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
  manifest = run(inputs, tmp_path / "b", skip_corrupt_records=True)
  assert manifest["components"]["math"]["skipped"]["corrupt_files"] == 1
  assert manifest["components"]["text"]["skipped"]["corrupt_files"] == 1


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
