"""Hugging Face checkpoint directories: config.json plus safetensors, one file or sharded with an index.

  save_hf(model, out)    an in-memory model -> a directory transformers' from_pretrained loads

Loads (onto one device or a mesh) are `hf_import.py`'s; exports of a training run `export.py`'s. Both share this module's view of the directory: which file holds
which tensor, the name checks, the shard plan and the shard writer. Directories may be
local or on an object store (`storage.py`).

save_hf never overwrites and never leaves a partial directory (`output_dir.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath
from flax import nnx

from pretrain import models, storage
from pretrain.convert import deepseek_v2, qwen2
from pretrain.convert.errors import ConversionError
from pretrain.convert.hf_config import config_from_hf, config_to_hf
from pretrain.convert.output_dir import atomic_output_dir, refuse_non_empty
from pretrain.convert.safetensors_file import DTYPES, SafetensorsReader, SafetensorsWriter
from pretrain.convert.tensor_map import TensorMap

TENSOR_MAPS = {models.Qwen2Config: qwen2.tensor_maps, models.DeepseekV2Config: deepseek_v2.tensor_maps}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAVE_DTYPES = {"float32": DTYPES["F32"], "bfloat16": DTYPES["BF16"], "float16": DTYPES["F16"]}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def save_hf(model: models.CausalLM, out_dir, *, dtype: str = "float32",
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """config.json and safetensors that transformers loads; sharded with an index past `max_shard_bytes`.

  `max_shard_bytes` bounds the tensor bytes of a shard (a single larger tensor gets a shard of its own).
  """
  np_dtype = check_save_options(dtype, max_shard_bytes)
  refuse_non_empty(out_dir)  # before any work, not only when the rename comes
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def tensor(m: TensorMap) -> np.ndarray:  # only the slot (a layer's, an expert's) comes to the host
    return m.to_hf(np.asarray(get(params, m.path)[m.index]))

  shards = plan_shards(TENSOR_MAPS[type(model.config)](model.config), np_dtype.itemsize, max_shard_bytes)
  with atomic_output_dir(out_dir) as partial:
    for name, shard in shards.items():
      _write_shard(partial / name, shard, tensor, np_dtype)
    write_metadata(partial, model.config, shards, dtype)


def check_save_options(dtype: str, max_shard_bytes: int) -> np.dtype:
  if dtype not in SAVE_DTYPES:
    raise ConversionError(f"save_hf: dtype {dtype!r} is not supported; supported values: {', '.join(SAVE_DTYPES)}")
  if max_shard_bytes <= 0:
    raise ConversionError(f"save_hf: max_shard_bytes must be positive, got {max_shard_bytes}")
  return SAVE_DTYPES[dtype]


def plan_shards(maps: list[TensorMap], itemsize: int, max_shard_bytes: int) -> dict[str, list[TensorMap]]:
  """File name -> its tensors, in the name table's order, each file at most `max_shard_bytes`."""
  shards, current, size = [], [], 0
  for m in maps:
    nbytes = math.prod(m.hf_shape) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(m)
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    return {SINGLE_FILE: shards[0]}
  return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


def _write_shard(file, shard: list[TensorMap], tensor: Callable[[TensorMap], np.ndarray], np_dtype: np.dtype) -> None:
  """One safetensors file, written tensor by tensor (`tensor(m)` gives each HF array)."""
  writer = SafetensorsWriter(file, [(m.hf_name, np_dtype, m.hf_shape) for m in shard], metadata={"format": "pt"})
  try:
    for m in shard:
      writer.write(m.hf_name, tensor(m).astype(np_dtype, copy=False))
  finally:
    writer.close()


def write_metadata(directory, config, shards: dict[str, list[TensorMap]], dtype: str) -> None:
  """config.json, and the index when there is more than one shard."""
  directory = storage.as_path(directory)
  if len(shards) > 1:
    itemsize = SAVE_DTYPES[dtype].itemsize
    total_size = sum(math.prod(m.hf_shape) for shard in shards.values() for m in shard) * itemsize
    weight_map = {m.hf_name: name for name, shard in shards.items() for m in shard}
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total_size},
                                         "weight_map": dict(sorted(weight_map.items()))})
  _write_json(directory / "config.json", config_to_hf(config) | {"dtype": dtype, "torch_dtype": dtype})


def read_config(hf_dir) -> models.ModelConfig:
  return config_from_hf(read_json(storage.as_path(hf_dir) / "config.json"))


def tensor_files(hf_dir) -> dict[str, epath.Path]:
  """Tensor name -> the file holding it; a single model.safetensors first, as transformers looks."""
  hf_dir = storage.as_path(hf_dir)
  single, index = hf_dir / SINGLE_FILE, hf_dir / INDEX_FILE
  if single.exists():
    with SafetensorsReader(single) as reader:
      return {name: single for name in reader.tensors}
  if not index.exists():
    raise ConversionError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                          "(only safetensors checkpoints are supported)")
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{index}: no 'weight_map' mapping tensor names to files")
  files = {name: hf_dir / file for name, file in weight_map.items()}
  for name, file in files.items():
    if not file.exists():
      raise ConversionError(f"{index}: tensor {name!r} is in {file.name}, which does not exist")
  return files


def check_names(maps: list[TensorMap], files: dict[str, Any], config, hf_dir) -> None:
  expected = {m.hf_name for m in maps}
  missing = [m.hf_name for m in maps if m.hf_name not in files]
  if missing:
    more = f" ({len(missing)} missing: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
    raise ConversionError(f"tensor {missing[0]!r} is missing from the checkpoint in {hf_dir}"
                          f"{more if len(missing) > 1 else ''}")
  extra = sorted(n for n in files if n not in expected and not _allowed_extra(n, config))
  if extra:
    raise ConversionError(f"tensor {extra[0]!r} in {files[extra[0]]} is not a parameter of this "
                          f"{config.family} model ({len(extra)} unexpected tensor(s): {', '.join(extra[:5])})")


def _allowed_extra(name: str, config) -> bool:
  # Some checkpoints keep a copy of the tied head, or RoPE's non-persistent buffer.
  return name.endswith(".rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def read_json(file) -> dict[str, Any]:
  file = storage.as_path(file)
  try:
    value = json.loads(file.read_text())
  except FileNotFoundError as e:
    raise ConversionError(f"{file}: not found") from e
  except (OSError, ValueError) as e:
    raise ConversionError(f"{file}: cannot read as JSON ({e})") from e
  if not isinstance(value, dict):
    raise ConversionError(f"{file}: expected a JSON object, got {type(value).__name__}")
  return value


def _write_json(file, value: dict[str, Any]) -> None:
  storage.as_path(file).write_text(json.dumps(value, indent=2) + "\n")


def get(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree
