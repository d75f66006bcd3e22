"""Staged recipes: continued pretraining, then longer contexts, as one resumable command.

`config.stages` lists the stages in order. Stage i trains in `<workdir>/stages/<i>-<name>`
with the experiment's settings changed as the stage says (train/config.py StageConfig),
starting from the previous stage's final parameters (the first stage from
`train.init_from`, if any). A stage is finished when its work directory holds the
`STAGE_DONE` marker, written only after its last checkpoint is complete; running the
command again skips finished stages and resumes the unfinished one from its latest
checkpoint (the trainer's own resume).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

from pretrain import storage
from pretrain.atomic_file import atomic_file
from pretrain.config import ExperimentConfig
from pretrain.schema import ConfigError
from pretrain.train import distributed, run_lock, trainer
from pretrain.train import workdir as workdir_layout

DONE_FILE = workdir_layout.DONE_FILE


def stage_experiments(experiment: ExperimentConfig) -> list[tuple[epath.Path, ExperimentConfig]]:
  """(work directory, experiment) of each stage, in order; checked before anything runs."""
  train, data, model = experiment.train, experiment.data, experiment.model
  if data is None:
    raise ConfigError("config.data", "a staged recipe needs a data section")
  root = storage.as_path(train.workdir)
  out, previous = [], None
  for i, stage in enumerate(experiment.stages):
    workdir = root / workdir_layout.STAGES_DIR / f"{i}-{stage.name}"
    stage_model = model if stage.rope_scaling is None else with_rope_scaling(model, stage.rope_scaling)
    seq_len = stage.seq_len or data.seq_len
    if seq_len > stage_model.max_position_embeddings:
      raise ConfigError(f"config.stages[{i}].seq_len", f"{seq_len} is longer than the model's "
                        f"{stage_model.max_position_embeddings} positions (max_position_embeddings); give the stage a "
                        "rope_scaling (YaRN) that extends them, or a shorter seq_len")
    stage_data = dataclasses.replace(
        data, seq_len=stage.seq_len or data.seq_len, global_batch_size=stage.global_batch_size or data.global_batch_size,
        weights={**data.weights, **stage.weights}, min_length=stage.min_length or data.min_length)
    stage_train = dataclasses.replace(
        train, workdir=str(workdir), steps=stage.steps, optimizer=stage.optimizer or train.optimizer,
        microbatches=stage.microbatches or train.microbatches,
        init_from=str(previous) if previous else train.init_from,
        init_optimizer_state=bool(previous) and stage.carry_optimizer_state)
    if stage.carry_optimizer_state and previous is None:
      raise ConfigError(f"config.stages[{i}].carry_optimizer_state", "the first stage has no previous stage")
    out.append((workdir, dataclasses.replace(experiment, model=stage_model, data=stage_data, train=stage_train,
                                             stages=())))
    previous = workdir
  return out


def with_rope_scaling(model, rope_scaling):
  """The model with a stage's RoPE scaling; YaRN's positions (original x factor) become its
  max_position_embeddings where they reach further, as DeepSeek-V2's config says 163840 = 4096 x 40."""
  positions = model.max_position_embeddings
  if rope_scaling.type == "yarn":
    positions = max(positions, int(rope_scaling.original_max_position_embeddings * rope_scaling.factor))
  return dataclasses.replace(model, rope_scaling=rope_scaling, max_position_embeddings=positions)


def run(experiment: ExperimentConfig, *, log=print) -> dict[str, Any]:
  """Runs the unfinished stages in order; returns the last stage's last metrics. The recipe's root is held
  (run_lock.py) for the whole run, each stage's work directory by its own `trainer.train`."""
  with run_lock.hold(storage.as_path(experiment.train.workdir), "config.train.workdir", log=log):
    return _run_stages(experiment, log)


def _run_stages(experiment: ExperimentConfig, log) -> dict[str, Any]:
  last: dict[str, Any] = {}
  plan = stage_experiments(experiment)
  for i, (workdir, stage_experiment) in enumerate(plan):
    done = workdir / DONE_FILE
    name = experiment.stages[i].name
    if done.exists():
      log(f"stage {i + 1}/{len(plan)} {name}: finished earlier, skipped")
      continue
    log(f"stage {i + 1}/{len(plan)} {name}: {stage_experiment.train.steps} steps of "
        f"{stage_experiment.data.global_batch_size} x {stage_experiment.data.seq_len} tokens in {workdir}")
    last = trainer.train(stage_experiment, log=log)
    if last.get("stopped_early"):
      return last  # SIGTERM: the stage saved its step; the same command continues it
    if distributed.is_main_process():  # the work directory is shared by all processes of a pod
      with atomic_file(done) as tmp:
        tmp.write_text(json.dumps({"stage": name, "steps": stage_experiment.train.steps}) + "\n")
    distributed.barrier(f"stage {name} done")
  return last
