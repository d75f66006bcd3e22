"""Training checkpoints (Orbax CheckpointManager) and `init_from` for continued pretraining.

A checkpoint holds two items: `state` (parameters, optimizer state, step, the bad-update
guard; sharded arrays, saved asynchronously) and `data` (the input pipeline's iterator
state, JSON, one file per process). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed at any moment, mid-save included, resumes from the last whole
checkpoint. Restoring takes the target's shardings, so a checkpoint restores onto any
mesh or device count.

`init_from` reads parameters only: a Hugging Face directory (config.json), an Orbax
model checkpoint (`pretrain convert --to-orbax`), or a training work directory (its
latest checkpoint).
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from pretrain import storage
from pretrain.convert import hf_import, orbax_io
from pretrain.convert.errors import ConversionError
from pretrain.schema import ConfigError
from pretrain.train import workdir as workdir_layout
from pretrain.train.config import TrainConfig

CHECKPOINTS_DIR = workdir_layout.CHECKPOINTS_DIR


class Checkpoints:
  # Orbax (0.12) writes arrays to a bucket through tensorstore's gcs driver, and builds no other
  # kvstore from a URL: an s3:// directory would be taken for a relative local path.
  URL_SCHEMES = ("gs://",)

  def __init__(self, workdir, config: TrainConfig):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_last, keep_period=config.keep_every or None, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
    self.directory = storage.local_absolute(workdir) / CHECKPOINTS_DIR
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_iter: grain.DatasetIterator) -> None:
    """Starts an asynchronous save of `state`; the next save (or `wait`) waits for it. The data
    iterator's position is taken now, one file per process (Grain's handler), so each process of
    a pod resumes its own input streams. Arrays are stored in chunks of one layer's or expert's slot
    (`orbax_io.save_args`), so an export or a restore onto another mesh reads only what it needs."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state, save_args=orbax_io.save_args(state)),
                                                    data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore(self, step: int, abstract_state: dict[str, Any],
              data_iter: grain.DatasetIterator | None = None) -> dict[str, Any]:
    """The state of checkpoint `step`, on the abstract state's shardings; `data_iter` (if given) is
    moved to where that step left it."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def has_checkpoints(workdir) -> bool:
  """Whether `workdir` holds a complete checkpoint (workdir.complete_steps)."""
  return bool(workdir_layout.complete_steps(workdir))


def load_init_params(path: str, abstract_params: nnx.State, *, read_window_bytes: int,
                     key: str = "config.train.init_from", log=print) -> nnx.State:
  """Parameters to start from, checked against the run's model, built directly on the abstract params'
  shardings: each process reads only the shards its devices hold (nothing is gathered). `key` names
  the setting in errors."""
  storage.check_bucket(path, key)
  kind, source = workdir_layout.checkpoint_kind(storage.local_absolute(path), key)
  try:
    if kind == "huggingface":
      params, stats = hf_import.load_hf_params(source, abstract_params, read_window_bytes=read_window_bytes,
                                               key=key)
      log(f"read {stats.bytes_read / 1e9:.3g} of the checkpoint's {stats.checkpoint_bytes / 1e9:.3g} GB on this "
          f"process in {stats.seconds:.1f} s")
      return params
    if kind == "orbax":
      return orbax_io.load_params(source, abstract_params, key=key)
  except ConversionError as e:
    raise ConfigError(key, str(e).removeprefix(f"{key}: ")) from e
  manager = ocp.CheckpointManager(source / CHECKPOINTS_DIR, item_names=("state", "data"))
  try:
    step = manager.latest_step()
    target = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
        partial_restore=True)))
  finally:
    manager.close()
  return restored["state"]["params"]


def load_init_state(path: str, abstract_state: dict[str, Any]) -> dict[str, Any]:
  """The whole train state of a run's latest checkpoint (parameters and Adam moments), for a next stage.

  The model and optimizer must be the same; batch, sequence and schedule may differ. Placed
  on the abstract state's shardings.
  """
  directory = storage.local_absolute(path) / CHECKPOINTS_DIR
  if not directory.is_dir():
    raise ConfigError("config.train.init_optimizer_state", f"needs init_from to be a training work directory; "
                      f"{path} has no {CHECKPOINTS_DIR}/")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  try:
    step = manager.latest_step()
    if step is None:
      raise ConfigError("config.train.init_from", f"{directory} holds no complete checkpoint")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError) as e:
      raise ConfigError("config.train.init_from", f"{directory}/{step} does not fit this run's model and "
                        f"optimizer: {str(e).splitlines()[0]}") from e
  finally:
    manager.close()
  return restored["state"]
