"""The floor under a decode step on CPU: the matmuls alone of bench/generate.py's ~100M Qwen2 model.

  taskset -c 0 .venv/bin/python bench/decode_floor.py     # one thread each, as the fair comparison

One decode step multiplies each row's hidden state by every weight of the model once (12 layers of
q/k/v/o and SwiGLU projections, then the tied [V, D] unembedding). Here those products run alone,
with nothing else of the step (no attention, norms, RoPE, cache or sampling), once in XLA (jitted,
as our engine runs them) and once in PyTorch (as transformers runs them), at batch 1 and 16. XLA's
figure bounds how fast our decode step can be; comparing it with transformers' measured step (from
bench/generate.py) tells whether a target such as "2x transformers' decode tok/s" is reachable.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

# bench/generate.py's "qwen2" config.
D, F, V, LAYERS, KV = 768, 2048, 32000, 12, 256  # KV: the 4 kv heads x 64


def shapes() -> list[tuple[int, int]]:
  per_layer = [(D, D), (D, KV), (D, KV), (D, D), (D, F), (D, F), (F, D)]  # q, k, v, o, gate, up, down
  return per_layer * LAYERS


def best_ms(fn, rounds: int) -> float:
  fn()
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best * 1000


def xla_ms(batch: int, rounds: int) -> float:
  rng = np.random.default_rng(0)
  weights = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes()]
  table = jnp.asarray(rng.standard_normal((V, D), np.float32))

  @jax.jit
  def products(x, weights, table):
    h = x
    for i in range(0, len(weights), 7):
      q, k, v, o, gate, up, down = weights[i:i + 7]
      h = h + (h @ q) @ o + ((h @ k).sum() + (h @ v).sum()) * 1e-9
      h = h + (jax.nn.silu(h @ gate) * (h @ up)) @ down
    return jnp.einsum("BD,VD->BV", h, table)

  x = jnp.ones((batch, D), jnp.float32)
  return best_ms(lambda: products(x, weights, table).block_until_ready(), rounds)


def torch_ms(batch: int, rounds: int) -> float:
  gen = torch.Generator().manual_seed(0)
  weights = [torch.randn(s, generator=gen) for s in shapes()]
  table = torch.randn((V, D), generator=gen)

  @torch.no_grad()
  def products():
    h = torch.ones((batch, D))
    for i in range(0, len(weights), 7):
      q, k, v, o, gate, up, down = weights[i:i + 7]
      h = h + (h @ q) @ o + ((h @ k).sum() + (h @ v).sum()) * 1e-9
      h = h + (torch.nn.functional.silu(h @ gate) * (h @ up)) @ down
    return h @ table.T

  return best_ms(products, rounds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--rounds", type=int, default=20)
  args = parser.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # as XLA: every core the process may run on
  flops = 2 * (sum(a * b for a, b in shapes()) + V * D)
  print(f"the matmuls of one decode step of the ~100M Qwen2 (bench/generate.py): {flops / 1e9:.2f} GFLOP a row; "
        f"{torch.get_num_threads()} threads")
  print(f"{'batch':>5}  {'XLA ms':>8}  {'PyTorch ms':>10}  {'XLA tok/s ceiling':>17}")
  for batch in (int(b) for b in args.batches.split(",")):
    ours, theirs = xla_ms(batch, args.rounds), torch_ms(batch, args.rounds)
    print(f"{batch:>5}  {ours:>8.1f}  {theirs:>10.1f}  {batch * 1000 / ours:>17.0f}")


if __name__ == "__main__":
  main()
