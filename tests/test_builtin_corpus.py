"""The built-in corpus: deterministic, all three domains, a useful size, math answers that are right."""

from __future__ import annotations

import json
import math
import pathlib
import re
from fractions import Fraction

import numpy as np
import pytest

from pretrain.data import builtin_corpus, mixture, prepare, records
from pretrain.data.config import Prepare

ROOT = pathlib.Path(__file__).resolve().parent.parent


class ByteTokenizer:
  def encode(self, text):
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)

  def normalize(self, text):
    return text

  def is_byte_exact(self, text, ids):
    return bytes(np.asarray(ids, np.uint8)) == text.encode()

  def describe(self):
    return {"kind": "bytes"}


def tree(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("builtin")
  return out, builtin_corpus.write_builtin_corpus(out)


@pytest.mark.slow
def test_all_domains_and_size(corpus):
  out, inputs = corpus
  assert set(inputs) == {"code", "math", "text"}
  sizes = {name: sum(len(b) for b in tree(out / name).values()) for name in inputs}
  assert sizes["code"] > 3_000_000 and sizes["text"] > 1_000_000 and sizes["math"] > 1_000_000
  assert sum(sizes.values()) < 20_000_000
  assert any(name.endswith(".py") for name in tree(out / "code" / "stdlib"))
  written = json.loads((out / builtin_corpus.MANIFEST).read_text())
  assert written["relative_inputs"]["math"] == ["math/*.jsonl"]
  text_rows = [json.loads(line) for p in sorted((out / "text").glob("*.jsonl")) for line in p.open()]
  assert any(row["source"] == "stdlib docstrings of json" for row in text_rows)
  assert any(row["source"].startswith("pydoc_data.topics") for row in text_rows)


@pytest.mark.slow
def test_deterministic(tmp_path):
  first = builtin_corpus.write_builtin_corpus(tmp_path / "a", max_code_files=40, seed=3)
  second = builtin_corpus.write_builtin_corpus(tmp_path / "b", max_code_files=40, seed=3)
  assert tree(tmp_path / "a") == {k: v.replace(str(tmp_path / "b").encode(), str(tmp_path / "a").encode())
                                  for k, v in tree(tmp_path / "b").items()}
  assert first == {k: [p.replace(str(tmp_path / "b"), str(tmp_path / "a")) for p in v] for k, v in second.items()}
  assert len(list((tmp_path / "a" / "code").rglob("*.*"))) == 40
  other_seed = builtin_corpus.math_documents(4, 10_000)
  assert other_seed != builtin_corpus.math_documents(3, 10_000)


ANSWER_CHECKS = {
    r"Compute (\d+) ([-+*]) (\d+)\.": lambda m: str(eval(f"{m[1]} {m[2]} {m[3]}")),
    r"Evaluate ([\d +*()]+)\.": lambda m: str(eval(m[1])),
    r"Compute (\d+)/(\d+) ([-+]) (\d+)/(\d+) and simplify\.":
        lambda m: str(Fraction(int(m[1]), int(m[2])) + (1 if m[3] == "+" else -1) * Fraction(int(m[4]), int(m[5]))),
    r"Divide (\d+) by (\d+)\.": lambda m: "{} remainder {}".format(*divmod(int(m[1]), int(m[2]))),
    r"Solve for x: (\d+)x ([-+]) (\d+) = (-?\d+)\.":
        lambda m: f"x = {Fraction(int(m[4]) - (1 if m[2] == '+' else -1) * int(m[3]), int(m[1]))}",
    r"What is (\d+)% of (\d+)\?": lambda m: Fraction(int(m[1]) * int(m[2]), 100),
    r"from (\d+) dollars to (\d+) dollars": lambda m: f"{Fraction(abs(int(m[2]) - int(m[1])) * 100, int(m[1]))}%",
    r"Find the mean of ([\d, ]+)\.": lambda m: Fraction(sum(map(int, m[1].split(", "))), len(m[1].split(", "))),
    r"(\d+) m wide and (\d+) m long":
        lambda m: f"area {int(m[1]) * int(m[2])} square meters, perimeter {2 * (int(m[1]) + int(m[2]))} meters",
    r"multiple of (\d+) and (\d+)\.":
        lambda m: f"gcd {math.gcd(int(m[1]), int(m[2]))}, lcm {math.lcm(int(m[1]), int(m[2]))}",
}


def test_math_answers_are_correct(corpus):
  out, _ = corpus
  problems = [p for f in sorted((out / "math").glob("*.jsonl")) for line in f.open()
              for p in json.loads(line)["text"].split("Problem: ")[1:]]
  assert len(problems) > 3000
  checked = {pattern: 0 for pattern in ANSWER_CHECKS}
  for problem in problems[:3000]:
    answer = re.search(r"\nAnswer: (.*)\n", problem)[1]
    for pattern, expected in ANSWER_CHECKS.items():
      match = re.search(pattern, problem.split("\n")[0])
      if match:
        want = expected(match)
        if isinstance(want, Fraction):
          assert Fraction(answer) == want, problem
        else:
          assert answer == want, problem
        checked[pattern] += 1
        break
  assert all(n >= 20 for n in checked.values()), checked


@pytest.mark.slow
def test_builtin_mixture_prepares(tmp_path):
  spec = f"{ROOT}/data_mixtures/builtin.py:dir={tmp_path / 'corpus'},max_code_files=30"
  loaded = mixture.load(spec)
  assert not (tmp_path / "corpus").exists()  # reading the mixture file writes nothing
  assert loaded.probabilities() == pytest.approx({"code": 0.6, "math": 0.1, "text": 0.3})
  assert all(c.fim_rate == 0.5 for c in loaded.components)
  manifest = prepare.prepare(loaded, tmp_path / "out", ByteTokenizer(), config=Prepare(workers=2),
                             tokenizer_path="bytes")
  assert set(manifest["by_domain"]) == {"code", "math", "text"}
  assert all(manifest["by_domain"][d]["documents_written"] > 20 for d in ("code", "math", "text"))
  shard = tmp_path / "out" / manifest["components"]["math"]["shards"][0]["path"]
  assert next(records.read_shard(shard)).domain == "math"
  assert (tmp_path / "corpus" / builtin_corpus.MANIFEST).exists()  # written when its inputs were first read
  written = (tmp_path / "corpus" / builtin_corpus.MANIFEST).stat().st_mtime_ns
  prepare.prepare(mixture.load(spec), tmp_path / "out", ByteTokenizer(), config=Prepare(workers=2),
                  tokenizer_path="bytes")
  assert (tmp_path / "corpus" / builtin_corpus.MANIFEST).stat().st_mtime_ns == written  # found, not written again


def test_deepseek_mixture_needs_user_paths(tmp_path):
  from pretrain.schema import ConfigError

  with pytest.raises(ConfigError, match="math, text"):
    mixture.load(f"{ROOT}/data_mixtures/deepseek_coder_v2.py:code={tmp_path}")
  loaded = mixture.load(f"{ROOT}/data_mixtures/deepseek_coder_v2.py:code={tmp_path},math=m/*.parquet,text=t.jsonl")
  assert loaded.probabilities() == pytest.approx({"code": 0.6, "math": 0.1, "text": 0.3})
  assert loaded.component("math").inputs[0].endswith("/m/*.parquet")
  assert all((c.fim_rate, c.fim_spm_rate) == (0.5, 0.0) for c in loaded.components)
