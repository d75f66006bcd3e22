"""The accelerator attention paths, checked on CPU as far as CPU allows.

Splash attention (the TPU kernel) runs here in Pallas interpret mode, so its outputs and
gradients are checked against the [S, S] reference in float32 to 1e-5 (GQA, MLA-style
K != V, packed documents, a sequence that is not whole blocks), alone and under a
4-device mesh inside a model being trained. cuDNN's kernel cannot run without an NVIDIA
GPU: here the packed layout we hand it (runs of segment ids as offsets and lengths) is
checked to describe exactly the reference's mask, our wrapper is run against a plain-JAX
emulation of the kernel's packed semantics (GQA and MLA operands must reach it with q's
shape), both models' cuDNN calls are traced through JAX's own checks with a GPU pretended,
and asking for cuDNN off a GPU is refused by name (in training, before anything is written). tests/test_gpu.py runs the kernel itself where a GPU exists.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packed_rows import packed_segment_ids
from training_runs import assert_same_training, two_step_experiment

from pretrain.models import attention, cudnn_attention
from pretrain.models.splash_attention import splash_attention


def _inputs(batch, seq, heads, kv_heads, qk_dim, v_dim, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(batch, seq, heads, qk_dim), (batch, seq, kv_heads, qk_dim), (batch, seq, kv_heads, v_dim),
            (batch, seq, heads, v_dim)]
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _value_and_grads(fn, q, k, v, cotangent, segment_ids):
  def loss(q, k, v):
    out = fn(q, k, v, scale=q.shape[-1] ** -0.5, segment_ids_BxS=segment_ids)
    return jnp.sum(out * cotangent), out
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim,seq,block,packed", [
    (4, 2, 24, 16, 200, 128, True),  # GQA (the multi-query kernel per kv head), K != V, S padded to 256
    (4, 4, 24, 16, 256, 128, True),  # MLA-like: as many kv heads as q heads (the multi-head kernel)
    (2, 1, 16, 16, 130, None, False),  # MQA, no segment ids, the default block
])
def test_splash_matches_reference_forward_and_gradients(heads, kv_heads, qk_dim, v_dim, seq, block, packed):
  q, k, v, cotangent = _inputs(2, seq, heads, kv_heads, qk_dim, v_dim)
  segment_ids = packed_segment_ids(2, seq, seed=seq) if packed else None
  want_out, want_grads = _value_and_grads(attention.dot_product_attention, q, k, v, cotangent, segment_ids)
  splash = functools.partial(splash_attention, block=block, interpret=True)
  got_out, got_grads = _value_and_grads(splash, q, k, v, cotangent, segment_ids)
  assert got_out.shape == want_out.shape and got_out.dtype == want_out.dtype
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for name, got, want in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


MESH_SCRIPT = """
import functools, os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from pretrain import config as config_lib
from pretrain.models import attention, context_parallel
from pretrain.train import sharding, trainer
from pretrain.train.config import MeshConfig

# Splash inside a shard_map: rows over data, heads over tensor, under jit with sharded operands.
mesh = sharding.make_mesh(MeshConfig(data=2, tensor=2))
parallel = context_parallel.ContextParallel(mesh, ("data",), (), ("tensor",))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 4, d)), jnp.float32) for d in (16, 16, 8))
seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 60 + [0] * 18], 2, axis=0), jnp.int32)
cotangent = jnp.asarray(rng.normal(size=(2, 128, 4, 8)), jnp.float32)

@functools.partial(jax.jit, static_argnums=3)
def value_and_grads(q, k, v, impl):
  run = lambda q, k, v: attention.attend(q, k, v, scale=0.25, segment_ids_BxS=seg, implementation=impl,
                                         context_parallel=parallel)
  out, pullback = jax.vjp(run, q, k, v)
  return out, pullback(cotangent)

want_out, want_grads = value_and_grads(q, k, v, "reference")
got_out, got_grads = value_and_grads(q, k, v, "splash")
np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
for g, w in zip(got_grads, want_grads):
  np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)

# A model trained with splash on data x tensor = 2 x 2 devices.
trainer.train(config_lib.parse_experiment(json.loads(sys.argv[1])), log=lambda m: None)
print("ok")
"""


@pytest.mark.slow
def test_splash_under_a_mesh_and_in_training_equals_one_device_blockwise(data_dir, tmp_path):
  from pretrain import config as config_lib
  from pretrain.models import presets
  from pretrain.train import trainer

  def experiment(workdir, implementation, **mesh):
    # Two layers: the kernel runs inside the scan over the stacked blocks.
    model = presets.get("tiny-qwen2", num_hidden_layers=2, vocab_size=512, attention_implementation=implementation)
    return two_step_experiment(data_dir, workdir, model, seq_len=128, global_batch_size=2, **mesh)

  trainer.train(config_lib.parse_experiment(experiment(tmp_path / "one", "blockwise")), log=lambda m: None)
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT,
                        json.dumps(experiment(tmp_path / "splash", "splash", data=2, tensor=2))],
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
  assert_same_training(tmp_path / "splash", tmp_path / "one")


def test_cudnn_packed_layout_lists_each_rows_runs():
  segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  seqlen, offsets = cudnn_attention.packed_layout(segment_ids)
  np.testing.assert_array_equal(seqlen, [[3, 2, 1, 2, -1, -1, -1, -1], [8] + [-1] * 7, [1] * 8])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, 6] + [-1] * 5, [0] + [-1] * 8, list(range(8)) + [-1]])


def test_cudnn_packed_layout_describes_the_reference_mask():
  """Causal within each (offset, length) run: exactly causal-and-same-document for packer rows."""
  segment_ids = packed_segment_ids(4, 96, seed=3)
  seqlen, offsets = (np.asarray(x) for x in cudnn_attention.packed_layout(segment_ids))
  seq = segment_ids.shape[1]
  i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
  for b in range(segment_ids.shape[0]):
    mask = np.zeros((seq, seq), bool)
    for start, length in zip(offsets[b], seqlen[b]):
      if length > 0:
        mask |= (start <= j) & (j <= i) & (i < start + length)
    want = np.asarray(attention.attention_mask(segment_ids[b:b + 1], seq, 1))[0, 0]
    np.testing.assert_array_equal(mask, want)
    assert np.sum(seqlen[b][seqlen[b] > 0]) == seq  # every position in exactly one run


def test_auto_is_blockwise_on_cpu_and_cudnn_off_a_gpu_is_refused_by_name():
  q, k, v, _ = _inputs(1, 16, 2, 2, 8, 8)
  assert attention.resolve("auto", q, v) == "blockwise"
  assert attention.resolve("splash", q, v) == "splash"
  with pytest.raises(ValueError, match=r"attention_implementation='cudnn'.*NVIDIA GPU \(the default backend is cpu\)"):
    attention.attend(q, k, v, scale=0.5, implementation="cudnn")


def _emulated_cudnn_packed(query, key, value, q_seqlen=None, kv_seqlen=None, q_offsets=None, kv_offsets=None, *,
                           scale, mask_type, qkv_layout):
  """cuDNN's packed-layout semantics in plain JAX: causal attention within each (offset, length) run.

  It insists on what our wrapper relies on: k, v (and so the output) with q's per-token stride.
  """
  assert key.shape == query.shape and value.shape == query.shape, (query.shape, key.shape, value.shape)
  assert qkv_layout == "BTNH" and q_offsets is kv_offsets and q_seqlen is kv_seqlen
  seq = query.shape[1]
  pos = jnp.arange(seq)
  starts, lengths = q_offsets[:, :-1, None], q_seqlen[:, :, None]  # [B, R, 1]
  run_of = ((starts <= pos) & (pos < starts + lengths) & (lengths > 0))  # [B, R, S]
  same_run = jnp.einsum("brs,brt->bst", run_of.astype(jnp.float32), run_of.astype(jnp.float32)) > 0
  mask = same_run & (pos[None, :, None] >= pos[None, None, :])
  scores = jnp.einsum("bsnk,btnk->bnst", query, key) * scale
  probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
  return jnp.einsum("bnst,btnk->bsnk", probs, value)


@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim", [(4, 2, 24, 24), (4, 4, 24, 16), (4, 1, 16, 8)])
def test_cudnn_wrapper_gives_the_kernel_uniform_strides_and_matches_reference(monkeypatch, heads, kv_heads, qk_dim,
                                                                               v_dim):
  """GQA and MLA operands reach the (emulated) kernel repeated and padded to q's shape; the result,
  sliced back, and its gradients equal the reference."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", _emulated_cudnn_packed)
  monkeypatch.setattr(cudnn_attention, "unsupported_reason", lambda q, v: None)
  q, k, v, cotangent = _inputs(2, 48, heads, kv_heads, qk_dim, v_dim)
  segment_ids = packed_segment_ids(2, 48, seed=5)
  want_out, want_grads = _value_and_grads(attention.dot_product_attention, q, k, v, cotangent, segment_ids)
  got_out, got_grads = _value_and_grads(cudnn_attention.cudnn_attention, q, k, v, cotangent, segment_ids)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for name, got, want in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_training_with_cudnn_off_a_gpu_fails_before_anything_is_written(data_dir, tmp_path):
  from pretrain import config as config_lib
  from pretrain.models import presets
  from pretrain.schema import ConfigError
  from pretrain.train import trainer

  model = presets.get("tiny-deepseek-v2", num_hidden_layers=1, vocab_size=512, attention_implementation="cudnn")
  experiment = two_step_experiment(data_dir, tmp_path / "run", model, seq_len=64, global_batch_size=2)
  with pytest.raises(ConfigError, match=r"config\.model\.attention_implementation: 'cudnn' cannot run here: "
                                        r"it needs an NVIDIA GPU"):
    trainer.train(config_lib.parse_experiment(experiment), log=lambda m: None)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-deepseek-v2"])
def test_cudnn_path_traces_through_jax_checks_in_a_model_forward_and_backward(monkeypatch, preset):
  """With a GPU pretended (cuDNN 9.10, Hopper), JAX's own argument checks of the cuDNN call accept what
  the models (GQA; MLA's 192/128 dims) pass, forward and backward, packed or not. Tracing only: the
  kernel cannot be lowered for CPU."""
  from jax._src.cudnn import fused_attention_stablehlo
  from flax import nnx

  from pretrain import models
  from pretrain.models import presets
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused_attention_stablehlo, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn_attention, "unsupported_reason", lambda q, v: None)
  config = presets.get(preset, num_hidden_layers=1, vocab_size=128, attention_implementation="cudnn", dtype="bfloat16")
  graphdef, params = nnx.split(models.build(config))
  ids = jnp.zeros((2, 64), jnp.int32)
  for segment_ids in (jnp.asarray(np.repeat([[1] * 40 + [2] * 20 + [0] * 4], 2, axis=0), jnp.int32), None):
    def loss(params):
      hidden, _ = nnx.merge(graphdef, params).features(ids, segment_ids_BxS=segment_ids)
      return jnp.sum(hidden.astype(jnp.float32))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    # cuDNN's own forward and backward primitives, not a fallback
    assert "dot_product_attention_fwd" in jaxpr and "dot_product_attention_bwd" in jaxpr
