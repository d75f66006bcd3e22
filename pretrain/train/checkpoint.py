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

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from pretrain import convert
from pretrain.schema import ConfigError
from pretrain.train.config import TrainConfig

CHECKPOINTS_DIR = "checkpoints"


class Checkpoints:
  def __init__(self, workdir, config: TrainConfig):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_last, keep_period=config.keep_every or None, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_iter: grain.DatasetIterator) -> None:
    """Starts an asynchronous save of `state`; the next save (or `wait`) waits for it. The data
    iterator's position is taken now, one file per process (Grain's handler), so each process of
    a pod resumes its own input streams."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
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
  """Whether `workdir` holds a complete checkpoint (Orbax renames a step directory to its number when done)."""
  directory = pathlib.Path(workdir) / CHECKPOINTS_DIR
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def load_init_params(path: str, abstract_params: nnx.State) -> nnx.State:
  """Parameters to start from, checked against the run's model; placed on the abstract params' shardings."""
  source = pathlib.Path(path).expanduser()
  if not source.exists():
    raise ConfigError("config.train.init_from", f"{source} does not exist")
  if (source / "config.json").exists():
    params = nnx.state(convert.load_hf(source), nnx.Param)
  elif (source / convert.orbax_io.CONFIG_FILE).exists():
    params = nnx.state(convert.load_orbax(source), nnx.Param)
  elif (source / CHECKPOINTS_DIR).is_dir():
    manager = ocp.CheckpointManager(source.absolute() / CHECKPOINTS_DIR, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
      raise ConfigError("config.train.init_from", f"{source / CHECKPOINTS_DIR} holds no complete checkpoint")
    target = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
        partial_restore=True)))
    manager.close()
    return restored["state"]["params"]
  else:
    raise ConfigError("config.train.init_from", f"{source} is neither a Hugging Face directory (config.json), an "
                      "Orbax model checkpoint (model_config.json) nor a training work directory (checkpoints/)")
  _check_shapes(params, abstract_params, source)
  return jax.tree.map(lambda value, target: jax.device_put(value, target.sharding), params, abstract_params)


def load_init_state(path: str, abstract_state: dict[str, Any]) -> dict[str, Any]:
  """The whole train state of a run's latest checkpoint (parameters and Adam moments), for a next stage.

  The model and optimizer must be the same; batch, sequence and schedule may differ. Placed
  on the abstract state's shardings.
  """
  directory = pathlib.Path(path).expanduser().absolute() / CHECKPOINTS_DIR
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


def _check_shapes(params: nnx.State, abstract_params: nnx.State, source: pathlib.Path) -> None:
  """The run's model may change how it computes (rope scaling, dtype), not its parameters."""
  found = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, target in jax.tree_util.tree_leaves_with_path(abstract_params):
    name = jax.tree_util.keystr(path)
    if path not in found:
      raise ConfigError("config.train.init_from", f"{source} has no parameter {name} that config.model needs")
    if tuple(found[path].shape) != tuple(target.shape):
      raise ConfigError("config.train.init_from", f"{source}: parameter {name} has shape {tuple(found[path].shape)}, "
                        f"config.model needs {tuple(target.shape)}")
  extra = set(found) - {p for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params)}
  if extra:
    raise ConfigError("config.train.init_from", f"{source} has parameter {jax.tree_util.keystr(min(extra))} "
                      "that config.model lacks")
