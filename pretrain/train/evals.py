"""Evaluations during training (`config.train.evals`): perplexity on a held-out mixture, passkey
retrieval, HumanEval and single-line infilling, run on the run's own parameters and mesh.

An evaluation is due at every step that is a multiple of its `every` and at the run's last step; the
trainer saves a checkpoint at each such step first. Its figures go to metrics.jsonl and TensorBoard
as `eval/<kind>/<name>` at that step, then its full report (and, for the code evaluations, every
record) to `<workdir>/eval/<step>/<kind>.json[l]`, written whole or not at all: that file says it
was done. A run killed or preempted during an evaluation resumes from the step's checkpoint and
redoes the evaluations whose report is missing before training on; the evaluations read neither
the data iterator nor any training state but the parameters, so the run goes on exactly as without
them. A SIGTERM during a code evaluation stops it at the next batch of prompts (the run then exits
as it does on a SIGTERM, and redoes it on resume).

The code evaluations run on a pod too: every process decodes its rows of each batch on the run's
mesh, the completions are gathered, and every process scores them (process 0 writes). ppl and niah
run in one process for now; a multi-process run asking for them is refused before it starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from pretrain import storage
from pretrain.atomic_file import atomic_file
from pretrain.data.tokenizer import Tokenizer
from pretrain.eval import code_eval, humaneval, load, niah, ppl
from pretrain.eval.completion import Decoding
from pretrain.schema import ConfigError
from pretrain.train.config import EvalConfig, TrainConfig

EVAL_DIR = "eval"
DEFAULT_MAX_NEW_TOKENS = {"humaneval": 512, "fim": 64}
PPL_DOCUMENTS = 100  # per component, when `limit` is 0


class Interrupted(Exception):
  """A stop was asked for during an evaluation: it is redone on resume."""


def check(cfg: TrainConfig, tokenizer: Tokenizer, model_config) -> None:
  """Every evaluation can run in this run: checked before the first step, not at the first eval."""
  for i, evaluation in enumerate(cfg.evals):
    key = f"config.train.evals[{i}]"
    if evaluation.kind in ("ppl", "niah") and jax.process_count() > 1:
      raise ConfigError(f"{key}.kind", f"{evaluation.kind} runs in one process for now, and this run has "
                        f"{jax.process_count()}: evaluate its checkpoints with `pretrain eval {evaluation.kind}`")
    if evaluation.kind == "fim" and tokenizer.with_known_fim_sentinels().fim_ids is None:
      tokenizer.require_fim()  # its error names the missing sentinel
    if evaluation.kind in ("ppl", "niah") and evaluation.mixture:
      load.load_mixture(evaluation.mixture, f"{key}.mixture")
    if evaluation.kind == "niah":
      too_long = [n for n in evaluation.lengths if n > model_config.max_position_embeddings]
      if too_long:
        raise ConfigError(f"{key}.lengths", f"{too_long[0]} tokens is longer than the model's "
                          f"{model_config.max_position_embeddings} positions")
      _niah_grid(evaluation, tokenizer, key)  # every prompt fits its length


def due(cfg: TrainConfig, step: int) -> list[EvalConfig]:
  return [e for e in cfg.evals if step > 0 and (step == cfg.steps or (e.every and step % e.every == 0))]


def report_path(workdir, step: int, kind: str):
  return storage.as_path(workdir) / EVAL_DIR / str(step) / f"{kind}.json"


def run_due(cfg: TrainConfig, step: int, model_of: Callable[[], Any], tokenizer: Tokenizer, mesh, writer,
            should_stop: Callable[[], bool], log) -> None:
  """The evaluations due at `step` whose report is not there yet (all, unless a killed run left some done)."""
  todo = [e for e in due(cfg, step) if not report_path(cfg.workdir, step, e.kind).exists()]
  if not todo:
    return
  model, tokenizer = model_of(), tokenizer.with_known_fim_sentinels()
  for evaluation in todo:
    scalars, report, records = _evaluate(evaluation, model, tokenizer, mesh, should_stop, log)
    writer.write(step, {f"eval/{evaluation.kind}/{name}": value for name, value in scalars.items()})
    if jax.process_index() == 0:
      _write(cfg.workdir, step, evaluation.kind, report | {"step": step}, records)
    log(f"step {step}: eval {evaluation.kind} " + "  ".join(f"{k} {v:.4g}" for k, v in scalars.items()))


def model_from(graphdef, params) -> Callable[[], nnx.Module]:
  return lambda: nnx.merge(graphdef, params)


def _evaluate(e: EvalConfig, model, tokenizer: Tokenizer, mesh, should_stop, log) -> tuple[dict, dict, list]:
  """(scalars for the metrics, the report, per-sample records or None)."""
  if e.kind == "ppl":
    mix = load.load_mixture(e.mixture, "config.train.evals.mixture")
    max_length = model.config.max_position_embeddings
    documents = ppl.read_documents(mix, tokenizer, max_documents=e.limit or PPL_DOCUMENTS, max_length=max_length,
                                   seed=e.seed)
    report = ppl.evaluate(model, tokenizer, mix, documents, max_length=max_length, buckets=(1024, 4096, 16384, 65536),
                          batch_tokens=16384)
    scalars = {}
    for view in ("components", "domains"):
      for name, part in report.get(view, {}).items():
        scalars[f"{name}/perplexity"] = part["perplexity"]
        scalars[f"{name}/bits_per_byte"] = part["bits_per_byte"]
    return scalars, report | {"mixture": e.mixture}, None
  if e.kind == "niah":
    report = niah.evaluate(model, tokenizer, _niah_grid(e, tokenizer, "config.train.evals"), batch_tokens=16384,
                           log=lambda _: None)
    accuracy_DxL = np.asarray(report["accuracy"])
    scalars = {"accuracy": float(accuracy_DxL.mean())}
    scalars |= {f"accuracy/{n}": float(a) for n, a in zip(e.lengths, accuracy_DxL.mean(axis=0))}
    return scalars, report | {"lengths": list(e.lengths), "depths": list(e.depths), "trials": e.trials}, None
  decoding = Decoding(max_new_tokens=e.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[e.kind], temperature=e.temperature,
                      top_p=e.top_p, seed=e.seed, batch_size=e.batch_size)

  def progress(line: str) -> None:  # between batches of prompts
    if should_stop():
      raise Interrupted(e.kind)

  if e.kind == "humaneval":
    records, summary = code_eval.humaneval_results(model, tokenizer, decoding, samples=e.samples,
                                                   limit=e.limit or None, timeout_s=e.timeout_s, mesh=mesh,
                                                   log=progress)
  else:
    records, summary = code_eval.fim_results(model, tokenizer, decoding, spm=e.mode == "spm", limit=e.limit or None,
                                             timeout_s=e.timeout_s, mesh=mesh, log=progress)
  scalars = {k: v for k, v in summary.items() if k.startswith(("pass@", "exact_match"))}
  return scalars, summary, records


def _niah_grid(e: EvalConfig, tokenizer: Tokenizer, key: str):
  mixture = load.load_mixture(e.mixture or niah.BUILTIN_HAYSTACK, f"{key}.mixture")
  try:
    return niah.build_grid(tokenizer, niah.Haystack.from_mixture(mixture, tokenizer), lengths=e.lengths,
                           depths=e.depths, trials=e.trials, seed=e.seed)
  except ConfigError as error:  # named by `pretrain eval niah`'s flags
    raise ConfigError(f"{key}.lengths", str(error).partition(": ")[2]) from None


def _write(workdir, step: int, kind: str, report: dict, records: list | None) -> None:
  """The records first, the report last: the report is the mark that the evaluation was done."""
  path = report_path(workdir, step, kind)
  if records is not None:
    humaneval.write_results(records, report, path.with_suffix(".jsonl"), path)
    return
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps(report, indent=2) + "\n")
