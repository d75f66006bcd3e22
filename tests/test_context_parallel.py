"""Context parallelism on simulated devices: ring attention over a sequence split 4 ways (and 2
ways with rows and heads split too) equals the unsplit attention, output and gradients, in
float32 to 1e-5 (packed documents with padding, MLA-style K != V, GQA, no segment ids); nothing
[S, S] exists in its forward or backward pass; training an MLA + MoE model with the sequence
split 4 ways (rows and experts split too) logs one device's losses and gradient norms; and a
seq_len the split cannot take is refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from training_runs import assert_same_training, two_step_experiment

from pretrain import config as config_lib
from pretrain.models import context_parallel, presets
from pretrain.train import trainer

ATTENTION_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from pretrain.models import attention, context_parallel
from pretrain.train import sharding
from pretrain.train.config import MeshConfig

def mesh_of(**sizes):
  config = MeshConfig(**{"data": 1, **sizes})
  return sharding.make_mesh(config, jax.devices()[:int(np.prod(list(sizes.values())))])

def packed_segment_ids(batch, seq, seed):
  # Documents of random lengths from 1, then padding (segment 0) to the end of the row.
  rng, rows = np.random.default_rng(seed), []
  for _ in range(batch):
    lengths = rng.integers(1, seq // 2, size=seq)
    ids = np.repeat(np.arange(1, seq + 1), lengths)[:seq - rng.integers(1, seq // 4)]
    rows.append(np.pad(ids, (0, seq - len(ids))))
  return jnp.asarray(np.stack(rows), jnp.int32)

CASES = [
    # (mesh, batch, seq, heads, kv_heads, qk_dim, v_dim, packed, block)
    ({"context": 4}, 2, 64, 4, 4, 24, 16, True, 4),  # MLA-like: K != V; 2 blocks per chunk
    ({"context": 4}, 2, 64, 4, 2, 16, 16, False, None),  # GQA, no segment ids, the default block
    # Rows and heads split too (8 devices), V != K, a 5-token block
    ({"data": 2, "context": 2, "tensor": 2}, 2, 40, 4, 2, 16, 8, True, 5),
]
for mesh_sizes, batch, seq, heads, kv_heads, qk_dim, v_dim, packed, block in CASES:
  mesh = mesh_of(**mesh_sizes)
  ways = mesh.shape["context"]
  rng = np.random.default_rng(seq + heads)
  q, k, v, cotangent = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [
      (batch, seq, heads, qk_dim), (batch, seq, kv_heads, qk_dim), (batch, seq, kv_heads, v_dim),
      (batch, seq, heads, v_dim)])
  segment_ids = packed_segment_ids(batch, seq, seed=seq) if packed else None
  zig = lambda x: None if x is None else jnp.asarray(context_parallel.to_zigzag({"x": np.asarray(x)}, ways)["x"])
  parallel = context_parallel.ContextParallel(
      mesh, ("data",), ("context",), ("tensor",) if "tensor" in mesh_sizes else (), block=block)

  def value_and_grads(fn, cotangent, segment_ids):
    def loss(q, k, v):
      out = fn(q, k, v, scale=qk_dim ** -0.5, segment_ids_BxS=segment_ids)
      return jnp.sum(out * cotangent), out
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)

  want = value_and_grads(attention.dot_product_attention, cotangent, segment_ids)
  q, k, v = zig(q), zig(k), zig(v)
  got = value_and_grads(lambda *a, **kw: context_parallel.attention(parallel, *a, **kw), zig(cotangent),
                        zig(segment_ids))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(context_parallel.from_zigzag(np.asarray(g), ways), w, atol=1e-5, rtol=1e-5,
                               err_msg=f"{name} {mesh_sizes}")

# Memory: no [S, S] array in the jaxpr of the gradient (shard_map and loop bodies included).
def sizes(jaxpr):
  for eqn in jaxpr.eqns:
    yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from sizes(sub)

seq, block = 4096, 128
parallel = context_parallel.ContextParallel(mesh_of(context=4), (), ("context",), block=block)
x = jnp.zeros((1, seq, 1, 16))
grad_fn = jax.grad(lambda q, k, v: context_parallel.attention(parallel, q, k, v, scale=0.25).sum(), argnums=(0, 1, 2))
largest = max(sizes(jax.make_jaxpr(grad_fn)(x, x, x).jaxpr))
assert largest <= seq * 16, largest  # nothing bigger than q itself (S * S = 16.8M)
print("ok", largest)
"""


def _run(script: str, *args: str) -> str:
  result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_zigzag_layout_and_its_inverse():
  order = context_parallel.zigzag_order(16, 2)  # chunks of 4: device 0 holds chunks 0, 3; device 1 chunks 1, 2
  np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
  batch = {"inputs": np.arange(32).reshape(2, 16), "component": np.array([3, 4])}
  zig = context_parallel.to_zigzag(batch, 2)
  np.testing.assert_array_equal(zig["inputs"][1], 16 + order)
  np.testing.assert_array_equal(zig["component"], [3, 4])
  np.testing.assert_array_equal(context_parallel.from_zigzag(zig["inputs"], 2), batch["inputs"])
  with pytest.raises(ValueError, match="2 x 4"):
    context_parallel.zigzag_order(12, 4)


@pytest.mark.slow
def test_ring_attention_equals_unsplit_attention_and_holds_no_sequence_squared_buffer():
  assert _run(ATTENTION_SCRIPT).startswith("ok")


TRAIN_SCRIPT = """
import os, sys, json, dataclasses
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from pretrain import config as config_lib
from pretrain.schema import ConfigError
from pretrain.train import trainer
exp = config_lib.parse_experiment(json.loads(sys.argv[1]))
bad = dataclasses.replace(exp, data=dataclasses.replace(exp.data, seq_len=60))  # not a multiple of 2 x 4
try:
  trainer.train(bad, log=lambda m: None)
  raise AssertionError("seq_len 60 was accepted")
except ConfigError as error:
  assert "config.data.seq_len" in str(error) and not os.path.exists(exp.train.workdir), error
trainer.train(exp, log=lambda m: None)
"""


@pytest.mark.slow
def test_training_with_the_sequence_split_4_ways_matches_one_device_and_refuses_an_unsplittable_seq_len(
    data_dir, tmp_path):
  """Two DeepSeek-V2-style blocks (MLA, MoE), scanned: the same loss and gradient norm at each of 2 steps."""
  model = presets.get("tiny-deepseek-v2", num_hidden_layers=2, first_k_dense_replace=0, vocab_size=512)

  def experiment(workdir, **mesh):
    return two_step_experiment(data_dir, workdir, model, seq_len=64, global_batch_size=4, **mesh)

  trainer.train(config_lib.parse_experiment(experiment(tmp_path / "one")), log=lambda m: None)
  # 8 devices: tokens 4 ways over context; rows 2 ways over expert (in the batch rule), where the
  # routed experts gather their group's tokens.
  _run(TRAIN_SCRIPT, json.dumps(experiment(tmp_path / "split", data=1, context=4, expert=2)))
  assert_same_training(tmp_path / "split", tmp_path / "one")

