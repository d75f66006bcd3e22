"""The layout of a training work directory, local or on a bucket, as every reader of a run sees it.

  <workdir>/checkpoints/<step>/   Orbax checkpoints (train/checkpoint.py); a step counts once complete
  <workdir>/experiment.json       the run's settings (trainer.py), the model among them
  <workdir>/hf/<step>/            Hugging Face exports (config.train.export_hf)
  <root>/stages/<i>-<name>/       a staged recipe's stages, each a work directory; STAGE_DONE when finished

`checkpoint_kind` says which of the three kinds of checkpoint a path names (a work directory, a
Hugging Face directory, an Orbax model checkpoint), for every reader that accepts any of them
(`init_from`, `pretrain eval --checkpoint`, `pretrain convert --from-orbax`).
"""

from __future__ import annotations

from typing import Literal

import orbax.checkpoint as ocp

from pretrain import orbax_s3, storage
from pretrain.convert import orbax_io
from pretrain.schema import ConfigError

CHECKPOINTS_DIR = "checkpoints"
EXPERIMENT_FILE = "experiment.json"
EXPORT_DIR = "hf"
STAGES_DIR = "stages"
DONE_FILE = "STAGE_DONE"
HF_CONFIG_FILE = "config.json"

Kind = Literal["huggingface", "orbax", "workdir"]


def checkpoint_kind(path, key: str) -> tuple[Kind, object]:
  """(kind, directory) of the checkpoint `path` names: a Hugging Face directory (config.json), an Orbax
  model checkpoint (model_config.json, `pretrain convert --to-orbax`) or a training work directory
  (checkpoints/). A staged recipe's root (stages/) names its latest finished stage's work directory.
  Errors name `key`, the setting `path` came from."""
  path = storage.as_path(path)
  if not path.exists():
    raise ConfigError(key, f"{path} does not exist")
  if not path.is_dir():
    raise ConfigError(key, f"{path} is not a directory")
  if (path / HF_CONFIG_FILE).exists():
    return "huggingface", path
  if (path / orbax_io.CONFIG_FILE).exists():
    return "orbax", path
  if not (path / CHECKPOINTS_DIR).is_dir() and (path / STAGES_DIR).is_dir():
    stage = latest_finished_stage(path)
    if stage is None:
      raise ConfigError(key, f"{path / STAGES_DIR} holds no finished stage; name a stage's directory "
                        f"({STAGES_DIR}/<i>-<name>) to read its latest checkpoint")
    path = stage
  if (path / CHECKPOINTS_DIR).is_dir():
    if not complete_steps(path):
      raise ConfigError(key, f"{path / CHECKPOINTS_DIR} holds no complete checkpoint")
    return "workdir", path
  raise ConfigError(key, f"{path} is neither a Hugging Face directory ({HF_CONFIG_FILE}), an Orbax model "
                    f"checkpoint ({orbax_io.CONFIG_FILE}), a training work directory ({CHECKPOINTS_DIR}/) nor a "
                    f"staged recipe's ({STAGES_DIR}/)")


def complete_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints, ascending. Orbax renames a local step directory to its number
  when done; on a bucket (no rename) it writes the step in place and a commit_success.txt file last."""
  directory = storage.as_path(workdir) / CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  atomicity = orbax_s3.atomicity_options(directory)
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and ocp.step.is_checkpoint_finalized(p, atomicity_options=atomicity))


def latest_finished_stage(root):
  """The work directory of a recipe's latest finished stage under `root`, or None when none has finished."""
  def index(stage_dir) -> int:
    number = stage_dir.name.partition("-")[0]
    return int(number) if number.isdigit() else -1

  stages = storage.as_path(root) / STAGES_DIR
  finished = [d for d in stages.iterdir() if index(d) >= 0 and (d / DONE_FILE).exists()] if stages.is_dir() else []
  return max(finished, key=index) if finished else None
