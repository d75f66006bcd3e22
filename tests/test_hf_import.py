"""Streaming, sharded Hugging Face import: each process reads only the parts its devices hold.

On 8 simulated devices the loaded global arrays equal the single-device load bit for bit,
on meshes that split every kind of parameter (fsdp, tensor, expert), float32 and bfloat16
checkpoints alike, and every tensor byte is read exactly once. With 2 processes
(`jax.distributed` on 127.0.0.1) each process reads about half of the bytes and its shards
equal the reference; no process holds the whole model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from pretrain.convert import hf_import
from pretrain.convert.errors import ConversionError
from pretrain.convert.safetensors_file import SafetensorsReader, SafetensorsWriter

pytest.importorskip("transformers")


def test_box_runs_are_the_contiguous_flat_ranges_of_a_box():
  grid = np.arange(4 * 3 * 5).reshape(4, 3, 5)
  for box in [((0, 4), (0, 3), (0, 5)), ((1, 3), (0, 3), (0, 5)), ((0, 4), (1, 2), (0, 5)), ((2, 4), (0, 3), (1, 4)),
              ((0, 1), (2, 3), (4, 5))]:
    runs = hf_import._box_runs((4, 3, 5), box)
    flat = np.concatenate([np.arange(a, b) for a, b in runs])
    np.testing.assert_array_equal(flat, grid[tuple(slice(a, b) for a, b in box)].reshape(-1))
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(runs, runs[1:], strict=False))  # merged where they touch
  assert hf_import._box_runs((4, 3, 5), ((1, 3), (0, 3), (0, 5))) == [(15, 45)]


@pytest.mark.parametrize("max_gap", [0, 1 << 20], ids=["exact_ranges", "merged_ranges"])
def test_reader_reads_exact_blocks_and_counts_bytes(tmp_path, max_gap):
  a = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
  b = (np.arange(6 * 4) / 7).astype(ml_dtypes.bfloat16).reshape(6, 4)
  safetensors.numpy.save_file({"a": a, "b": b}, str(tmp_path / "x.safetensors"))
  with SafetensorsReader(tmp_path / "x.safetensors", max_gap=max_gap) as reader:
    assert reader.bytes_read == 0  # the header is not counted
    np.testing.assert_array_equal(reader.read_block(reader.tensors["a"], 10, (2, 7), (3, 8)), a[2:7, 3:8])
    assert reader.bytes_read == (5 * 5 * 4 if max_gap == 0 else (4 * 10 + 5) * 4)
    np.testing.assert_array_equal(reader.read("b"), b)


def test_writer_streams_a_file_safetensors_reads(tmp_path):
  tensors = {"x": np.ones((3, 5), np.float32), "y": np.arange(7).astype(ml_dtypes.bfloat16)}
  writer = SafetensorsWriter(tmp_path / "w.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()],
                             metadata={"format": "pt"})
  for name, value in tensors.items():
    writer.write(name, value)
  writer.close()
  with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    for name, value in tensors.items():
      np.testing.assert_array_equal(f.get_tensor(name), value)


def test_reader_names_the_file_and_tensor_of_a_truncated_checkpoint(tmp_path):
  safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "t.safetensors"))
  data = (tmp_path / "t.safetensors").read_bytes()
  (tmp_path / "t.safetensors").write_bytes(data[:-100])
  with pytest.raises(ConversionError, match=r"t\.safetensors.*truncated.*tensor 'w'"):
    SafetensorsReader(tmp_path / "t.safetensors")
  (tmp_path / "t.safetensors").write_bytes(data[:5])
  with pytest.raises(ConversionError, match=r"t\.safetensors.*truncated"):
    SafetensorsReader(tmp_path / "t.safetensors")


# Loads a tiny checkpoint onto meshes of the simulated devices; compares with the one-device load.
SHARDED_LOAD = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from flax import nnx
from pretrain import convert, models
from pretrain.convert import hf_import, param_shapes
from pretrain.train import sharding
from pretrain.train.config import DEFAULT_AXIS_RULES, MeshConfig

hf_dir, mesh_sizes = sys.argv[1], json.loads(sys.argv[2])
reference = nnx.to_pure_dict(nnx.state(convert.load_hf(hf_dir), nnx.Param))
config = convert.hf_io.read_config(hf_dir)
mesh = sharding.make_mesh(MeshConfig(**mesh_sizes))
abstract = nnx.state(models.build_abstract(config), nnx.Param)
shardings = sharding.param_shardings(abstract, mesh, DEFAULT_AXIS_RULES)
params, stats = hf_import.load_hf_params(hf_dir, param_shapes.placed(abstract, shardings), read_window_bytes=4096)
split = 0
for path, array in param_shapes.flatten(nnx.to_pure_dict(params)):
  want = param_shapes.flatten(reference)
  want = dict(want)[path]
  assert array.sharding.is_equivalent_to(dict(param_shapes.flatten(nnx.to_pure_dict(shardings)))[path], array.ndim)
  np.testing.assert_array_equal(np.asarray(array), np.asarray(want), err_msg=str(path))
  split += not array.sharding.is_fully_replicated
print(json.dumps({"bytes_read": stats.bytes_read, "checkpoint_bytes": stats.checkpoint_bytes, "split": split}))
"""


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
  from pretrain.convert import parity

  out = tmp_path_factory.mktemp("hf") / "deepseek"
  parity.random_hf_model("deepseek_v2", q_lora_rank=16, n_routed_experts=8).save_pretrained(out, max_shard_size="60KB")
  return out


def _run(script: str, *args, env=None) -> dict:
  out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", [
    {"fsdp": 8},
    pytest.param({"fsdp": 2, "tensor": 2, "expert": 2}, marks=pytest.mark.slow),
    pytest.param({"data": 2, "expert": 4}, marks=pytest.mark.slow),
], ids=["fsdp8", "fsdp2_tensor2_expert2", "data2_expert4"])
def test_sharded_load_equals_the_one_device_load_and_reads_each_byte_once(deepseek_dir, mesh):
  result = _run(SHARDED_LOAD, deepseek_dir, json.dumps(mesh))
  assert result["split"] >= 3  # at least the routed experts' three stacked weights are split
  assert result["bytes_read"] == result["checkpoint_bytes"]  # every shard of one process read once, no repeats


def test_bfloat16_checkpoint_loads_into_float32_parameters_sharded(tmp_path):
  import torch

  from pretrain.convert import parity

  parity.random_hf_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  result = _run(SHARDED_LOAD, tmp_path / "bf16", json.dumps({"fsdp": 4, "tensor": 2}))
  assert result["bytes_read"] == result["checkpoint_bytes"]


# One of two processes on 127.0.0.1 (2 CPU devices each) loading onto fsdp=2 x expert=2.
TWO_PROCESS_LOAD = """
import os, sys, json
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[2], 2, int(sys.argv[3]))
import numpy as np
from flax import nnx
from pretrain import convert, models
from pretrain.convert import hf_import, param_shapes
from pretrain.train import sharding
from pretrain.train.config import DEFAULT_AXIS_RULES, MeshConfig

hf_dir = sys.argv[1]
config = convert.hf_io.read_config(hf_dir)
mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=2))
abstract = nnx.state(models.build_abstract(config), nnx.Param)
shardings = sharding.param_shardings(abstract, mesh, DEFAULT_AXIS_RULES)
params, stats = hf_import.load_hf_params(hf_dir, param_shapes.placed(abstract, shardings))
reference = dict(param_shapes.flatten(nnx.to_pure_dict(nnx.state(convert.load_hf(hf_dir), nnx.Param))))
held = total = 0
for path, array in param_shapes.flatten(nnx.to_pure_dict(params)):
  assert len(array.addressable_shards) == 2 and not array.is_fully_addressable
  total += array.nbytes
  held += sum(s.data.nbytes for s in {str(s.index): s for s in array.addressable_shards}.values())
  for shard in array.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(reference[path])[shard.index], err_msg=str(path))
print(json.dumps({"bytes_read": stats.bytes_read, "checkpoint_bytes": stats.checkpoint_bytes, "held": held / total}))
"""


@pytest.mark.slow
def test_two_processes_each_read_their_half_and_hold_only_their_shards(deepseek_dir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_LOAD, str(deepseek_dir), f"127.0.0.1:{port}", str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  for r in results:
    assert r["held"] < 0.6  # of the model's bytes: this process's shards only
    # The embed-split half of each tensor, plus the small replicated ones (norms).
    assert 0.45 * r["checkpoint_bytes"] < r["bytes_read"] < 0.6 * r["checkpoint_bytes"], r
