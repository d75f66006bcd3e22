"""Evaluations during training (`config.train.evals`, train/evals.py): each kind's figures land in
metrics.jsonl under eval/<kind>/ at its steps and its report in <workdir>/eval/<step>/; a run with
evaluations ends with the same parameters and losses as one without; an evaluation cut short by a
crash or a SIGTERM is redone on resume, and the run still ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from test_train import experiment, final_params, metrics

from pretrain.schema import ConfigError
from pretrain.train import evals, trainer

STEPS = 4


def evaluations(data_dir) -> list[dict]:
  return [
      {"kind": "humaneval", "every": 2, "limit": 2, "max_new_tokens": 6, "batch_size": 1},
      {"kind": "fim", "every": 2, "limit": 3, "max_new_tokens": 4, "batch_size": 1},
      {"kind": "ppl", "mixture": str(data_dir / "mixture.py"), "limit": 2},
      {"kind": "niah", "lengths": [512], "depths": [0.0, 1.0], "trials": 1},
  ]


def run(data_dir, workdir, **train):
  return trainer.train(experiment(data_dir, workdir, **{"steps": STEPS, "checkpoint_every": STEPS} | train),
                       log=lambda m: None)


@pytest.fixture(scope="module")
def plain_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("plain") / "run"
  run(data_dir, workdir)
  return workdir


def assert_same_run(workdir, reference, data_dir):
  exp = experiment(data_dir, workdir, steps=STEPS)
  a, b = final_params(workdir, exp), final_params(reference, exp)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  losses = lambda w: {r["step"]: r["loss"] for r in metrics(w) if "loss" in r}
  assert losses(workdir) == losses(reference)


@pytest.mark.slow
def test_each_kind_reports_at_its_steps_and_the_run_is_unchanged(data_dir, tmp_path, plain_run):
  workdir = tmp_path / "run"
  run(data_dir, workdir, evals=evaluations(data_dir))
  rows = metrics(workdir)
  steps_of = lambda key: [r["step"] for r in rows if key in r]
  assert steps_of("eval/humaneval/pass@1") == [2, 4] and steps_of("eval/fim/exact_match") == [2, 4]
  assert steps_of("eval/ppl/code/perplexity") == [4] and steps_of("eval/niah/accuracy") == [4]
  for step, kinds in ((2, ["fim", "humaneval"]), (4, ["fim", "humaneval", "niah", "ppl"])):
    assert sorted(p.stem for p in (workdir / "eval" / str(step)).glob("*.json")) == kinds
  report = json.loads((workdir / "eval" / "4" / "humaneval.json").read_text())
  assert report["step"] == 4 and report["problems"] == 2 and report["isolation"]
  assert len((workdir / "eval" / "4" / "fim.jsonl").read_text().splitlines()) == 3
  assert_same_run(workdir, plain_run, data_dir)


@pytest.mark.slow
def test_an_evaluation_cut_short_by_a_crash_is_redone_on_resume(data_dir, tmp_path, plain_run, monkeypatch):
  workdir = tmp_path / "run"
  evaluate, calls = evals._evaluate, []

  def crashing(e, *args):
    calls.append(e.kind)
    if e.kind == "fim" and calls.count("fim") == 1:
      raise RuntimeError("the host went away")
    return evaluate(e, *args)

  monkeypatch.setattr(evals, "_evaluate", crashing)
  with pytest.raises(RuntimeError, match="went away"):
    run(data_dir, workdir, evals=evaluations(data_dir)[:2], checkpoint_every=2)
  assert (workdir / "eval" / "2" / "humaneval.json").exists() and not (workdir / "eval" / "2" / "fim.json").exists()
  run(data_dir, workdir, evals=evaluations(data_dir)[:2], checkpoint_every=2)
  assert calls == ["humaneval", "fim", "fim", "humaneval", "fim"]  # step 2's fim redone, its humaneval kept
  assert sorted(p.name for p in (workdir / "eval" / "2").glob("*.json")) == ["fim.json", "humaneval.json"]
  assert_same_run(workdir, plain_run, data_dir)


@pytest.mark.slow
def test_a_sigterm_during_an_evaluation_stops_it_and_the_resumed_run_redoes_it(data_dir, tmp_path, plain_run,
                                                                              monkeypatch):
  workdir = tmp_path / "run"
  evaluate, calls = evals._evaluate, []

  def preempted(e, *args):
    calls.append(e.kind)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first batch of prompts decodes
    return evaluate(e, *args)

  monkeypatch.setattr(evals, "_evaluate", preempted)
  result = run(data_dir, workdir, evals=evaluations(data_dir)[:1], checkpoint_every=2)
  assert result.get("stopped_early") and not (workdir / "eval" / "2").exists()
  run(data_dir, workdir, evals=evaluations(data_dir)[:1], checkpoint_every=2)
  assert calls == ["humaneval", "humaneval", "humaneval"]  # step 2's again, then step 4's
  assert (workdir / "eval" / "2" / "humaneval.json").exists() and (workdir / "eval" / "4" / "humaneval.json").exists()
  assert_same_run(workdir, plain_run, data_dir)


@pytest.mark.parametrize("evaluation, words", [
    ({"kind": "ppl"}, "config.train.evals[0].mixture: a ppl evaluation needs a held-out mixture file"),
    ({"kind": "niah"}, "config.train.evals[0].lengths: a niah evaluation needs context lengths"),
    ({"kind": "humaneval", "samples": 0}, "config.train.evals[0].samples: must be >= 1"),
    ({"kind": "bleu"}, "config.train.evals[0].kind"),
])
def test_bad_evaluations_are_refused_when_the_config_is_read(data_dir, tmp_path, evaluation, words):
  with pytest.raises(ConfigError, match=__import__("re").escape(words)):
    experiment(data_dir, tmp_path / "run", evals=[evaluation])


def test_two_evaluations_of_one_kind_are_refused(data_dir, tmp_path):
  with pytest.raises(ConfigError, match=r"config.train.evals\[1\].kind: a second 'fim' evaluation"):
    experiment(data_dir, tmp_path / "run", evals=[{"kind": "fim"}, {"kind": "fim", "mode": "spm"}])


@pytest.mark.parametrize("lengths, words", [([4096], "4096 tokens is longer than the model's 1024 positions"),
                                            ([64], "64 tokens is shorter than the prompt without any haystack")])
def test_a_niah_length_that_cannot_be_evaluated_is_refused_before_training(data_dir, tmp_path, lengths, words):
  with pytest.raises(ConfigError, match=r"config.train.evals\[0\].lengths: " + words):
    run(data_dir, tmp_path / "run", evals=[{"kind": "niah", "lengths": lengths}])
  assert not (tmp_path / "run" / "checkpoints").exists()
