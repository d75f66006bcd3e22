"""Hugging Face checkpoints streamed onto a mesh: each process reads only what its devices hold.

Every parameter is built as a global array on its target sharding with
`jax.make_array_from_callback`: JAX asks each process only for its own devices' shards,
and each shard is read straight from the safetensors files (their headers give every
tensor's byte offsets): the rows and columns of the HF tensor that the shard covers, and,
of a stacked parameter (routed experts, scanned layers), only the slots it holds. Each
piece is converted to the parameter's dtype and layout as it is read. No process ever
holds a full copy of the model, and nothing is gathered across processes (a
`device_put` of a host array onto a multi-process sharding would all-gather it to check
that every process passed the same value).

Host memory: the process's own shards, plus one shard being assembled, plus reads of at
most `read_window_bytes` at a time.

The layout map: HF stores a linear weight as row-major [out, in]; ours is [in..., out...]
(`tensor_map.py`). A shard of ours is a box of index ranges; its in-dims and out-dims
become runs of HF columns and rows, read as blocks and written transposed into the shard.
Everything else is a reshape of the HF tensor: rows along its first dim, columns the rest.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.dlpack
import numpy as np
from flax import nnx

from pretrain import models

from pretrain.convert import hf_io, param_shapes
from pretrain.convert.errors import ConversionError
from pretrain.convert.safetensors_file import SafetensorsReader, TensorInfo
from pretrain.convert.tensor_map import TensorMap, transpose_into

DEFAULT_READ_WINDOW_BYTES = 256 * 2**20
# Reads and copies release the GIL: a few threads keep the disk and the cores busy at once.
READ_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class LoadStats:
  bytes_read: int  # tensor bytes this process read
  checkpoint_bytes: int  # tensor bytes in the checkpoint
  seconds: float


def load_hf(hf_dir) -> models.CausalLM:
  """Our model, float32 parameters on the default device, from a Hugging Face checkpoint directory."""
  graphdef, abstract_params, rest = nnx.split(models.build_abstract(hf_io.read_config(hf_dir)), nnx.Param, ...)
  placed = param_shapes.placed(abstract_params, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  params, _ = load_hf_params(hf_dir, placed)
  return nnx.merge(graphdef, params, rest)


def load_hf_params(hf_dir, abstract_params: nnx.State, *, read_window_bytes: int = DEFAULT_READ_WINDOW_BYTES,
                   key: str = "checkpoint") -> tuple[nnx.State, LoadStats]:
  """`abstract_params` (ShapeDtypeStruct leaves with shardings) filled from the checkpoint in `hf_dir`.

  The checkpoint's config.json must describe a model with exactly these parameter shapes; how it
  computes (rope scaling, dtype, kernels) may differ. `key` names the setting in errors.
  """
  started = time.perf_counter()
  config = hf_io.read_config(hf_dir)
  maps = hf_io.TENSOR_MAPS[type(config)](config)
  files = hf_io.tensor_files(hf_dir)
  hf_io.check_names(maps, files, config, hf_dir)
  param_shapes.check(config, abstract_params, hf_dir, key)

  readers = {}
  try:
    for file in sorted(set(files.values())):
      readers[file] = SafetensorsReader(file)
    slots: dict[tuple, dict[tuple[int, ...], tuple]] = {}  # parameter -> slot -> (reader, tensor, map)
    for m in maps:
      reader = readers[files[m.hf_name]]
      info = reader.tensors[m.hf_name]
      if info.shape != m.hf_shape:
        raise ConversionError(f"tensor {m.hf_name!r} in {reader.name} has shape {list(info.shape)}; "
                              f"config.json implies {list(m.hf_shape)}")
      slots.setdefault(m.path, {})[m.index] = (reader, info, m)

    def first_byte(path):  # parameters in the checkpoint's order: reads go forward through the files
      return min((reader.path, info.start) for reader, info, _ in slots[path].values())

    pure = nnx.to_pure_dict(abstract_params)
    for path, target in sorted(param_shapes.flatten(pure), key=lambda item: first_byte(item[0])):
      _set(pure, path, _build(target, slots[path], read_window_bytes))
  finally:
    for reader in readers.values():
      reader.close()
  params = jax.tree.map(lambda x: x, abstract_params)  # a new State, filled below
  nnx.replace_by_pure_dict(params, pure)
  stats = LoadStats(sum(r.bytes_read for r in readers.values()),
                    sum(info.nbytes for r in readers.values() for info in r.tensors.values()),
                    time.perf_counter() - started)
  return params, stats


def _build(target: jax.ShapeDtypeStruct, source: dict[tuple[int, ...], tuple], window: int) -> jax.Array:
  """One parameter as a global array on `target.sharding`, each addressable shard read from the files.

  The process's shards usually tile one box (its devices are neighbours on the mesh): that box is
  read once, slot by slot and in slabs of at most `window` bytes along its first axis, each slab
  copied into the shards it covers. So a process's reads span its whole share (in one process:
  whole rows, one sequential read), not each device's narrower columns; replicated shards are read
  once. Otherwise each shard is read on its own.
  """
  shape, dtype = tuple(target.shape), np.dtype(target.dtype)
  stacked = len(next(iter(source)))  # leading axes that hold one HF tensor per slot
  boxes = sorted({_normalize(index, shape)
                  for index in target.sharding.addressable_devices_indices_map(shape).values()})
  shards = {box: np.empty(tuple(b - a for a, b in box), dtype) for box in boxes}
  union = tuple((min(box[d][0] for box in boxes), max(box[d][1] for box in boxes)) for d in range(len(shape)))
  if sum(map(_volume, boxes)) != _volume(union):
    regions = boxes  # shards scattered over the parameter: each its own read
  else:
    regions = [union]
  # The window is shared by the slabs in flight (one per thread), each with the block being read into it.
  window //= 2 * READ_THREADS
  tasks = []
  for region in regions:
    for slot in itertools.product(*(range(a, b) for a, b in region[:stacked])):
      if slot not in source:
        raise ConversionError(f"parameter slot {slot} of a [{', '.join(map(str, shape))}] parameter has no tensor "
                              "in the name table")
      inner = region[stacked:]
      per_row = (_volume(inner) // max(1, inner[0][1] - inner[0][0]) if inner else 1) * dtype.itemsize
      step = max(1, window // max(1, per_row))
      for a in range(inner[0][0], inner[0][1], step) if inner else [None]:
        tasks.append((slot, ((a, min(a + step, inner[0][1])),) + inner[1:] if inner else ()))

  def read_slab(task):
    slot, slab = task
    reader, info, m = source[slot]
    values = np.empty(tuple(b - a for a, b in slab), dtype)
    _read_region(reader, info, m, shape[stacked:], slab, values, window)
    _scatter(tuple((s, s + 1) for s in slot) + slab, values, shards)  # slabs are disjoint: no two write alike

  list(_pool().map(read_slab, tasks))
  return _place(shape, target.sharding, shards)


def _place(shape, sharding, shards: dict[tuple, np.ndarray]) -> jax.Array:
  """The global array of these host shards. On CPU devices, whose memory is the host's, each shard
  becomes its device's buffer without a copy (dlpack); a copy of a replicated one for each further
  device, as XLA may write one device's buffer in place while another reads its own."""
  devices = sharding.addressable_devices_indices_map(shape)
  if not all(device.platform == "cpu" for device in devices):
    return jax.make_array_from_callback(shape, sharding, lambda index: shards[_normalize(index, shape)])
  taken, arrays = set(), []
  for device, index in devices.items():
    box = _normalize(index, shape)
    host = shards[box] if box not in taken else shards[box].copy()
    taken.add(box)
    arrays.append(jax.dlpack.from_dlpack(host, device=device))
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="hf-read")


def _scatter(box, values: np.ndarray, shards: dict[tuple, np.ndarray]) -> None:
  """Copies `values` (the parameter's `box`, its stacked axes one slot each) into every shard it overlaps."""
  values = values.reshape(tuple(b - a for a, b in box))
  for shard_box, shard in shards.items():
    overlap = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(box, shard_box, strict=True))
    if all(a < b for a, b in overlap):
      shard[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(overlap, shard_box, strict=True))] = values[
          tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(overlap, box, strict=True))]


def _volume(box) -> int:
  return math.prod(b - a for a, b in box)


def _read_region(reader: SafetensorsReader, info: TensorInfo, m: TensorMap, our_shape: Sequence[int],
                 box: Sequence[tuple[int, int]], out: np.ndarray, window: int) -> None:
  """Fills `out` (the box's shape) with ours[box], ours being the HF tensor in our layout."""
  if m.linear:  # ours is hf.T reshaped: our leading dims cover HF's columns (in), the rest its rows (out)
    split = next(j for j in range(len(our_shape) + 1) if math.prod(our_shape[:j]) == m.hf_shape[1])
    col_dims, row_dims = our_shape[:split], our_shape[split:]
    col_box, row_box = box[:split], box[split:]
  else:  # ours is hf reshaped: rows along the first dim, columns the rest
    row_dims, col_dims = our_shape[:1], our_shape[1:]
    row_box, col_box = box[:1], box[1:]
  row_width = math.prod(col_dims)
  row_runs, col_runs = _box_runs(row_dims, row_box), _box_runs(col_dims, col_box)
  cols = sum(b - a for a, b in col_runs)
  # The shard as a 2-D array: [cols, rows] when transposed (linear), [rows, cols] otherwise.
  out_2d = out.reshape((cols, -1) if m.linear else (-1, cols))
  rows_per_read = max(1, window // max(1, cols * info.dtype.itemsize))
  row_at = 0
  for r0, r1 in row_runs:
    for a in range(r0, r1, rows_per_read):
      b = min(r1, a + rows_per_read)
      col_at = 0
      for c0, c1 in col_runs:
        block = reader.read_block(info, row_width, (a, b), (c0, c1))
        if m.linear:
          transpose_into(out_2d[col_at:col_at + c1 - c0, row_at:row_at + b - a], block)
        else:
          out_2d[row_at:row_at + b - a, col_at:col_at + c1 - c0] = block
        col_at += c1 - c0
      row_at += b - a


def _box_runs(dims: Sequence[int], box: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """The contiguous ranges of row-major flat indices that a box of `dims` covers, in order."""
  if not dims:
    return [(0, 1)]
  last = len(dims)
  while last > 0 and box[last - 1] == (0, dims[last - 1]):
    last -= 1  # trailing dims taken whole merge into longer runs
  if last == 0:
    return [(0, math.prod(dims))]
  inner = math.prod(dims[last:])
  a, b = box[last - 1]
  runs = []
  for outer in itertools.product(*(range(lo, hi) for lo, hi in box[:last - 1])):
    offset = 0
    for d, i in enumerate(outer):
      offset = offset * dims[d] + i
    offset *= dims[last - 1]
    start, stop = (offset + a) * inner, (offset + b) * inner
    if runs and runs[-1][1] == start:
      runs[-1] = (runs[-1][0], stop)
    else:
      runs.append((start, stop))
  return runs


def _normalize(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value
