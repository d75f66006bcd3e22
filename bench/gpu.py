"""The GPU checks, one script for a lent NVIDIA GPU: cuDNN attention, ~1B-model MFU at 8K, long-context table.

  PYTHONPATH=. python3 bench/gpu.py                     # all three parts (about 10 minutes on an H100)
  PYTHONPATH=. python3 bench/gpu.py --parts attention,mfu
  .venv/bin/python bench/gpu.py --tiny                  # the same code on CPU at toy sizes (blockwise only)

Needs only jax (with CUDA), flax, optax and numpy, as a GPU image has them; no data pipeline.

- attention: cuDNN's fused attention (models/cudnn_attention.py) against the float32
  reference, in bfloat16, on packed documents, for a GQA (Qwen2-like) and an MLA (q/k 192,
  v 128) shape: max |error| of the output and gradients, cuDNN's and the float32
  blockwise kernel's, and cuDNN's with the operands as they are ("cudnn-as-is": if its
  errors are as small, JAX handles their strides and the repeat/pad can go); then
  forward+backward time of cuDNN and blockwise (bfloat16) at 8K and 32K tokens.
- mfu: one training step (AdamW, bfloat16 compute, float32 parameters, remat per block,
  fused cross-entropy, attention `auto` = cuDNN) of a dense Qwen2-style ~1B model on
  4 x 8192 tokens: tokens/s and MFU against the datasheet bf16 peak (target 55%).
- long: the same model, one row of S tokens, S = 8K .. 128K: step time, XLA's temporary
  buffers for the step, and the device's peak memory in use so far (the issue-5 table).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from step_setup import compiled_train_step

from pretrain.models import attention, cudnn_attention, presets
from pretrain.train import flops

# Qwen2-style, ~1.0B parameters: 16 layers of hidden 2048 (GQA 16/4 heads of 128), SwiGLU 5632, vocab 32000.
DENSE_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
                max_position_embeddings=131072)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=4096)


def _timed(fn, *args, repeats: int = 3) -> float:
  """Seconds of the fastest of `repeats` runs after a warm-up (compilation) run."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _packed_segment_ids(seq: int, seed: int) -> jnp.ndarray:
  rng = np.random.default_rng(seed)
  ids = np.repeat(np.arange(1, seq + 1), rng.integers(seq // 16, seq // 3, size=seq))[:seq - seq // 16]
  return jnp.asarray(np.pad(ids, (0, seq - len(ids)))[None], jnp.int32)


def attention_part(tiny: bool) -> None:
  shapes = {"gqa": (16, 4, 128, 128), "mla": (16, 16, 192, 128)}
  seq = 256 if tiny else 2048
  impls = ["blockwise"] if tiny else ["cudnn", "blockwise"]
  for name, (heads, kv_heads, qk_dim, v_dim) in shapes.items():
    if tiny:
      heads, kv_heads, qk_dim, v_dim = heads // 4, kv_heads // 4 or 1, qk_dim // 4, v_dim // 4
    rng = np.random.default_rng(0)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [
        (2, seq, heads, qk_dim), (2, seq, kv_heads, qk_dim), (2, seq, kv_heads, v_dim), (2, seq, heads, v_dim)])
    segment_ids = jnp.concatenate([_packed_segment_ids(seq, 1), _packed_segment_ids(seq, 2)])

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def value_and_grads(impl, dtype, q, k, v, cotangent, segment_ids):
      if impl == "cudnn-as-is":  # GQA/MLA operands not repeated/padded to q's stride (cudnn_attention.py)
        run = functools.partial(cudnn_attention.cudnn_attention, scale=qk_dim ** -0.5, segment_ids_BxS=segment_ids,
                                uniform_strides=False)
      else:
        run = functools.partial(attention.attend, scale=qk_dim ** -0.5, segment_ids_BxS=segment_ids,
                                implementation=impl)
      out, pullback = jax.vjp(run, *(x.astype(dtype) for x in (q, k, v)))
      return (out, *pullback(cotangent.astype(out.dtype)))

    want = value_and_grads("reference", jnp.float32, q, k, v, cotangent, segment_ids)
    for impl in impls + ([] if tiny else ["cudnn-as-is"]):
      dtype = jnp.bfloat16 if impl.startswith("cudnn") else jnp.float32
      try:
        got = value_and_grads(impl, dtype, q, k, v, cotangent, segment_ids)
      except Exception as error:  # noqa: BLE001 - a kernel cuDNN refuses is a result
        print(f"attention {name} {impl:<11} failed: {str(error).splitlines()[0][:200]}", flush=True)
        continue
      errors = ", ".join(f"{label} {float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))):.2e}"
                         for label, g, w in zip(("out", "dq", "dk", "dv"), got, want))
      print(f"attention {name} {impl:<11} {jnp.dtype(dtype).name:<8} vs float32 reference: max |error| {errors}",
            flush=True)
  for seq in ([512, 1024] if tiny else [8192, 32768]):
    heads, kv_heads, qk_dim, v_dim = (4, 4, 48, 32) if tiny else shapes["mla"]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, seq, h, d)), jnp.bfloat16)
               for h, d in ((heads, qk_dim), (kv_heads, qk_dim), (kv_heads, v_dim)))
    segment_ids = _packed_segment_ids(seq, 3)
    for impl in impls:
      fn = jax.jit(jax.grad(lambda q, k, v, segment_ids, impl=impl: jnp.sum(attention.attend(
          q, k, v, scale=qk_dim ** -0.5, segment_ids_BxS=segment_ids, implementation=impl).astype(jnp.float32)),
          argnums=(0, 1, 2)))
      milliseconds = _timed(fn, q, k, v, segment_ids) * 1e3
      print(f"attention mla {seq:>6} tokens {impl:<9} forward+backward {milliseconds:9.2f} ms",
            flush=True)


def _run_steps(compiled, state, batch, steps: int) -> tuple[float, float]:
  """(seconds of the last step, its loss); the first step also pays for touching every buffer."""
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])  # waits for the step
    seconds = time.perf_counter() - start
  return seconds, loss


def _model_config(tiny: bool):
  dtype = "float32" if tiny else "bfloat16"
  return presets.get("tiny-qwen2", **(TINY if tiny else DENSE_1B), dtype=dtype)


def mfu_part(tiny: bool) -> None:
  config = _model_config(tiny)
  seq, batch_size = (512, 2) if tiny else (8192, 4)
  compiled, state, batch = compiled_train_step(config, seq, batch_size)
  seconds, loss = _run_steps(compiled, state, batch, 4)
  peak, how = flops.peak_flops_per_device()
  tokens_per_second = batch_size * seq / seconds
  params = sum(x.size for x in jax.tree.leaves(state["params"]))
  utilisation = flops.mfu(tokens_per_second, flops.flops_per_token(config, seq), peak, 1)
  head = jnp.zeros((1, 1, 1, config.head_dim), config.dtype)
  print(f"mfu: dense {params / 1e9:.2f}B params, {batch_size} x {seq} tokens, {config.dtype}: step {seconds:.3f} s, "
        f"{tokens_per_second:,.0f} tokens/s, MFU {utilisation:.1%} of {peak / 1e12:.1f} TFLOP/s ({how}); "
        f"attention {attention.resolve('auto', head, head)}; loss {loss:.3f}", flush=True)


def long_part(tiny: bool, lengths: list[int]) -> None:
  config = _model_config(tiny)
  for seq in lengths:
    try:
      compiled, state, batch = compiled_train_step(config, seq, 1)
      temp = compiled.memory_analysis().temp_size_in_bytes
      seconds, loss = _run_steps(compiled, state, batch, 2)
    except Exception as error:  # noqa: BLE001 - an out-of-memory length is a result, not a crash
      print(f"long: {seq:>7} tokens  failed: {str(error).splitlines()[0][:200]}", flush=True)
      continue
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0)
    print(f"long: {seq:>7} tokens  step {seconds:8.3f} s  XLA temp {temp / 2**30:7.2f} GiB  "
          f"peak in use so far {peak / 2**30:7.2f} GiB  loss {loss:.3f}", flush=True)
    del compiled, state, batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="attention,mfu,long")
  parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
  parser.add_argument("--tiny", action="store_true", help="toy sizes, blockwise attention: checks the script on CPU")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  if not args.tiny:
    mla_q, mla_v = jnp.zeros((1, 1, 1, 192), jnp.bfloat16), jnp.zeros((1, 1, 1, 128), jnp.bfloat16)
    print(f"cuDNN attention (MLA dims): {cudnn_attention.unsupported_reason(mla_q, mla_v) or 'available'}", flush=True)
  parts = args.parts.split(",")
  if "attention" in parts:
    attention_part(args.tiny)
  if "mfu" in parts:
    mfu_part(args.tiny)
  if "long" in parts:
    lengths = [int(s) for s in args.lengths.split(",")]
    long_part(args.tiny, [s // 64 for s in lengths] if args.tiny else lengths)


if __name__ == "__main__":
  main()
