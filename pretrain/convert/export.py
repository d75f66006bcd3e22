"""Any run back to Hugging Face format, streamed: one tensor (one layer's, one expert's) at a time.

  export_hf(source, out_dir, dtype="bfloat16")   # pretrain convert --from-orbax SOURCE --to-hf OUT --dtype ...

`source` is a training work directory (its latest checkpoint, or `step`), a staged recipe's
root (its latest finished stage), or a `save_orbax` checkpoint. Each HF tensor is read from
the checkpoint's arrays with tensorstore, only the slot it fills of a stacked parameter
(`TensorMap.index`), laid out, cast and appended to its safetensors file; so host memory is a
few times the largest tensor, whatever the model's size, and nothing is ever restored whole.

On a pod every process runs it at once (`config.train.export_hf`): the shard files are dealt
out over the processes, each writes its own from the shared checkpoint, and process 0 writes
config.json and the index and moves the directory into place once all are done. A partial
export is never left under the final name.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from pretrain import models, storage
from pretrain.convert import hf_io, orbax_io
from pretrain.convert.errors import ConversionError
from pretrain.convert.output_dir import refuse_non_empty
from pretrain.convert.tensor_map import TensorMap
from pretrain.schema import ConfigError
from pretrain.train import workdir

STATE_ITEM = "state"  # the train state's item in a checkpoint step (train/checkpoint.py)
CHECKPOINTS_DIR, EXPERIMENT_FILE = workdir.CHECKPOINTS_DIR, workdir.EXPERIMENT_FILE


@dataclasses.dataclass(frozen=True)
class ExportStats:
  files: tuple[str, ...]  # the shard files this process wrote
  bytes_written: int
  largest_tensor_bytes: int
  seconds: float


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a run's parameters are: the Orbax item holding them, and the model they belong to."""

  config: models.ModelConfig
  item_dir: epath.Path  # an Orbax PyTree checkpoint directory
  params_key: tuple[str, ...]  # the parameters' subtree in it
  step: int | None


def resolve(path, step: int | None = None, *, key: str = "--from-orbax") -> Source:
  """The checkpoint `path` names: a save_orbax directory, a training work directory or a recipe's root.
  Errors name `key`, the setting `path` came from."""
  kind, path = workdir.checkpoint_kind(storage.local_absolute(path), key)
  if kind == "huggingface":
    raise ConfigError(key, f"{path} is already a Hugging Face directory")
  if kind == "orbax":
    if step is not None:
      raise ConfigError("--step", f"{path} is a model checkpoint without steps; drop --step")
    return Source(orbax_io.read_config(path), path / orbax_io.PARAMS_DIR, (), None)
  steps = workdir.complete_steps(path)
  if step is not None and step not in steps:
    raise ConfigError("--step", f"{path / CHECKPOINTS_DIR} has no checkpoint of step {step}; it has {steps}")
  experiment = hf_io.read_json(path / EXPERIMENT_FILE)
  config = models.parse_model_config(experiment.get("model"), key=f"{path / EXPERIMENT_FILE} model")
  step = steps[-1] if step is None else step
  return Source(config, path / CHECKPOINTS_DIR / str(step) / STATE_ITEM, ("params",), step)


def export_hf(source_path, out_dir, *, dtype: str = "float32", step: int | None = None,
              max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES, key: str = "--from-orbax") -> ExportStats:
  """Writes `out_dir` (refused if it exists and is not empty) from the checkpoint `source_path` names.

  Every process of a multi-process run calls this together; each writes its share of the files.
  """
  started = time.perf_counter()
  np_dtype = hf_io.check_save_options(dtype, max_shard_bytes)
  source = resolve(source_path, step, key=key)
  out_dir = storage.local_absolute(out_dir)
  refuse_non_empty(out_dir)
  arrays = _ArrayReader(source)
  shards = hf_io.plan_shards(hf_io.TENSOR_MAPS[type(source.config)](source.config), np_dtype.itemsize,
                             max_shard_bytes)
  # One partial directory for all processes: its name must not depend on a process's random state. A
  # bucket has no rename: there the files go in place, config.json last, and a failure removes them.
  in_place = storage.is_url(out_dir)
  partial = out_dir if in_place else out_dir.parent / f".{out_dir.name}.partial"
  index, count = jax.process_index(), jax.process_count()
  mine = [name for i, name in enumerate(shards) if i % count == index]
  written, largest = 0, 0

  def tensor(m: TensorMap) -> np.ndarray:
    nonlocal written, largest
    value = arrays.slot(m)
    written += value.size * np_dtype.itemsize
    largest = max(largest, value.nbytes)
    return m.to_hf(value)

  try:
    if index == 0 and not in_place:
      partial.rmtree(missing_ok=True)  # an earlier export that died
      partial.mkdir(parents=True)
    _barrier("export: directory made")
    for name in mine:
      hf_io._write_shard(partial / name, shards[name], tensor, np_dtype)
    _barrier("export: shards written")
    if index == 0:
      hf_io.write_metadata(partial, source.config, shards, dtype)
      if not in_place:
        if out_dir.exists():
          out_dir.rmdir()  # empty, checked above
        partial.rename(out_dir)
    _barrier("export: done")
  except BaseException:
    if index == 0:
      partial.rmtree(missing_ok=True)
    raise
  return ExportStats(tuple(mine), written, largest, time.perf_counter() - started)


class _ArrayReader:
  """The checkpoint's parameter arrays, opened once each, read one slot at a time."""

  def __init__(self, source: Source):
    self.source = source
    try:
      tree = ocp.StandardCheckpointHandler().metadata(source.item_dir).tree
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ConversionError(f"{source.item_dir}: cannot read the checkpoint's metadata ({_short(e)})") from e
    for key in source.params_key:
      tree = tree[key]
    self.tree = tree
    self.open: dict[tuple, ts.TensorStore] = {}
    directory = source.item_dir
    self.kvstore = {"driver": "ocdbt", "base": storage.kvstore(str(directory).rstrip("/") + "/")}
    self.driver = "zarr3" if hf_io.read_json(storage.as_path(directory) / "_METADATA").get("use_zarr3") else "zarr"

  def slot(self, m: TensorMap) -> np.ndarray:
    if m.path not in self.open:  # handles only: the data is read slot by slot
      self.open[m.path] = self._open(m.path)
    array = self.open[m.path]
    try:
      return array[m.index].read().result() if m.index else array.read().result()
    except Exception as e:  # tensorstore raises ValueError/RuntimeError with the store's message
      raise ConversionError(f"{self.source.item_dir}: parameter {'.'.join(map(str, m.path))} cannot be read "
                            f"({_short(e)})") from e

  def _open(self, path: tuple) -> ts.TensorStore:
    node = self.tree
    for key in path:
      node = node.get(str(key)) if isinstance(node, dict) else None
      if node is None:
        raise ConversionError(f"{self.source.item_dir} has no parameter {'.'.join(map(str, path))}")
    if isinstance(node, dict):  # an nnx.Variable in a train state: its value
      node = node.get("value")
    return ts.open({"driver": self.driver, "kvstore": self.kvstore, "path": node.name}, open=True).result()


def _short(error: Exception) -> str:
  """tensorstore's message without the full JSON spec it appends."""
  return str(error).split(" [tensorstore_spec=")[0]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
