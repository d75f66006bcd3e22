"""Hugging Face checkpoints: config.json plus safetensors, one file or sharded with an index.

load_hf streams tensor by tensor: each is checked (name, shape, dtype), upcast to
float32, laid out as ours and placed into the abstract model, so the only full copy
is the model itself (routed experts are stacked into one buffer per parameter).

save_hf never overwrites and never leaves a partial directory (`output_dir.py`).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from pretrain import models
from pretrain.convert import deepseek_v2, qwen2
from pretrain.convert.errors import ConversionError
from pretrain.convert.hf_config import config_from_hf, config_to_hf
from pretrain.convert.output_dir import atomic_output_dir, refuse_non_empty
from pretrain.convert.tensor_map import TensorMap

TENSOR_MAPS = {models.Qwen2Config: qwen2.tensor_maps, models.DeepseekV2Config: deepseek_v2.tensor_maps}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}
LOAD_DTYPES = ("F32", "BF16", "F16")


def load_hf(hf_dir) -> models.CausalLM:
  """Our model, float32 parameters, from a Hugging Face checkpoint directory."""
  hf_dir = pathlib.Path(hf_dir)
  config = config_from_hf(_read_json(hf_dir / "config.json"))
  maps = TENSOR_MAPS[type(config)](config)
  files = _tensor_files(hf_dir)
  _check_names(maps, files, config, hf_dir)

  graphdef, param_state, rest = nnx.split(models.build_abstract(config), nnx.Param, ...)
  params = nnx.to_pure_dict(param_state)  # ShapeDtypeStruct leaves, replaced one by one below
  stacked: dict[tuple, np.ndarray] = {}  # [E, ...] expert parameters being filled slot by slot
  by_file: dict[pathlib.Path, list[TensorMap]] = collections.defaultdict(list)
  for m in maps:
    by_file[files[m.hf_name]].append(m)
  for file, file_maps in by_file.items():
    with _open(file) as f:
      for m in file_maps:
        hf_array = _read(f, m, file)
        if m.expert is None:
          _set(params, m.path, jnp.asarray(m.to_ours(hf_array, _get(params, m.path).shape)))
        else:
          if m.path not in stacked:
            stacked[m.path] = np.empty(_get(params, m.path).shape, np.float32)
          stacked[m.path][m.expert] = m.to_ours(hf_array, stacked[m.path].shape[1:])
        del hf_array
  for path in list(stacked):
    _set(params, path, jnp.asarray(stacked.pop(path)))
  unfilled = [p for p, leaf in jax.tree_util.tree_leaves_with_path(params) if isinstance(leaf, jax.ShapeDtypeStruct)]
  if unfilled:  # a parameter the name table forgot: a bug here, not in the checkpoint
    raise ConversionError(f"parameter {jax.tree_util.keystr(unfilled[0])} has no tensor in the {config.family} "
                          "name table")

  nnx.replace_by_pure_dict(param_state, params)
  return nnx.merge(graphdef, param_state, rest)


def save_hf(model: models.CausalLM, out_dir, *, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30) -> None:
  """config.json and safetensors that transformers loads; sharded with an index past `max_shard_bytes`.

  `max_shard_bytes` bounds the tensor bytes of a shard (a single larger tensor gets a shard of its own).
  """
  if dtype not in SAVE_DTYPES:
    raise ConversionError(f"save_hf: dtype {dtype!r} is not supported; supported values: {', '.join(SAVE_DTYPES)}")
  if max_shard_bytes <= 0:
    raise ConversionError(f"save_hf: max_shard_bytes must be positive, got {max_shard_bytes}")
  out_dir = pathlib.Path(out_dir)
  refuse_non_empty(out_dir)  # before any work, not only when the rename comes
  config = model.config
  np_dtype = SAVE_DTYPES[dtype]
  shards = _plan_shards(TENSOR_MAPS[type(config)](config), np_dtype.itemsize, max_shard_bytes)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with atomic_output_dir(out_dir) as partial:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _write_shard(partial / name, shard, params, np_dtype)
      weight_map.update({m.hf_name: name for m in shard})
    if len(shards) > 1:
      total_size = sum(math.prod(m.hf_shape) for shard in shards for m in shard) * np_dtype.itemsize
      _write_json(partial / INDEX_FILE, {"metadata": {"total_size": total_size},
                                         "weight_map": dict(sorted(weight_map.items()))})
    _write_json(partial / "config.json", config_to_hf(config) | {"dtype": dtype, "torch_dtype": dtype})


def _plan_shards(maps: list[TensorMap], itemsize: int, max_shard_bytes: int) -> list[list[TensorMap]]:
  shards, current, size = [], [], 0
  for m in maps:
    nbytes = math.prod(m.hf_shape) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(m)
    size += nbytes
  return shards + [current]


def _write_shard(file: pathlib.Path, shard: list[TensorMap], params: dict, np_dtype: np.dtype) -> None:
  ours_by_path: dict[tuple, np.ndarray] = {}  # one host copy per parameter, sliced per expert
  tensors = {}
  for m in shard:
    if m.path not in ours_by_path:
      ours_by_path[m.path] = np.asarray(_get(params, m.path))
    ours = ours_by_path[m.path]
    tensors[m.hf_name] = m.to_hf(ours if m.expert is None else ours[m.expert]).astype(np_dtype, copy=False)
  safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def _tensor_files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the file holding it; a single model.safetensors first, as transformers looks."""
  single, index = hf_dir / SINGLE_FILE, hf_dir / INDEX_FILE
  if single.exists():
    with _open(single) as f:
      return {name: single for name in f.keys()}
  if not index.exists():
    raise ConversionError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                          "(only safetensors checkpoints are supported)")
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{index}: no 'weight_map' mapping tensor names to files")
  files = {name: hf_dir / file for name, file in weight_map.items()}
  for name, file in files.items():
    if not file.is_file():
      raise ConversionError(f"{index}: tensor {name!r} is in {file.name}, which does not exist")
  return files


def _check_names(maps: list[TensorMap], files: dict[str, pathlib.Path], config, hf_dir: pathlib.Path) -> None:
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


def _open(file: pathlib.Path):
  try:
    return safetensors.safe_open(str(file), framework="numpy")
  except Exception as e:  # SafetensorError, OSError: truncated, corrupt or unreadable
    raise ConversionError(f"{file}: cannot read as safetensors ({e})") from e


def _read(f, m: TensorMap, file: pathlib.Path) -> np.ndarray:
  try:
    info = f.get_slice(m.hf_name)
    shape, dtype = tuple(info.get_shape()), info.get_dtype()
  except Exception as e:
    raise ConversionError(f"tensor {m.hf_name!r} cannot be read from {file} ({e})") from e
  if shape != m.hf_shape:
    raise ConversionError(f"tensor {m.hf_name!r} in {file} has shape {list(shape)}; config.json implies "
                          f"{list(m.hf_shape)}")
  if dtype not in LOAD_DTYPES:
    raise ConversionError(f"tensor {m.hf_name!r} in {file} has dtype {dtype}; supported: {', '.join(LOAD_DTYPES)}")
  try:
    return f.get_tensor(m.hf_name).astype(np.float32, copy=False)
  except Exception as e:
    raise ConversionError(f"tensor {m.hf_name!r} cannot be read from {file} ({e})") from e


def _read_json(file: pathlib.Path) -> dict[str, Any]:
  try:
    with open(file) as f:
      value = json.load(f)
  except FileNotFoundError as e:
    raise ConversionError(f"{file}: not found") from e
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{file}: cannot read as JSON ({e})") from e
  if not isinstance(value, dict):
    raise ConversionError(f"{file}: expected a JSON object, got {type(value).__name__}")
  return value


def _write_json(file: pathlib.Path, value: dict[str, Any]) -> None:
  file.write_text(json.dumps(value, indent=2) + "\n")


def _get(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value
