"""The layout of a training work directory, local or on a bucket, as every reader of a run sees it.

  <workdir>/checkpoints/<step>/   Orbax checkpoints (train/checkpoint.py); a step counts once complete
  <workdir>/experiment.json       the run's settings (trainer.py), the model among them
  <workdir>/hf/<step>/            Hugging Face exports (config.train.export_hf)
  <root>/stages/<i>-<name>/       a staged recipe's stages, each a work directory; STAGE_DONE when finished
"""

from __future__ import annotations

import orbax.checkpoint as ocp

from pretrain import storage

CHECKPOINTS_DIR = "checkpoints"
EXPERIMENT_FILE = "experiment.json"
EXPORT_DIR = "hf"
STAGES_DIR = "stages"
DONE_FILE = "STAGE_DONE"


def complete_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints, ascending. Orbax renames a local step directory to its number
  when done; on a bucket (no rename) it writes the step in place and a commit_success.txt file last."""
  directory = storage.as_path(workdir) / CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and ocp.step.is_checkpoint_finalized(p))


def latest_finished_stage(root):
  """The work directory of a recipe's latest finished stage under `root`, or None when none has finished."""
  def index(stage_dir) -> int:
    number = stage_dir.name.partition("-")[0]
    return int(number) if number.isdigit() else -1

  stages = storage.as_path(root) / STAGES_DIR
  finished = [d for d in stages.iterdir() if index(d) >= 0 and (d / DONE_FILE).exists()] if stages.is_dir() else []
  return max(finished, key=index) if finished else None
