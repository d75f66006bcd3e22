"""Float32 matmul rates of XLA:CPU and of PyTorch on the shapes of bench/train_step.py's models.

  .venv/bin/python bench/matmul.py

A training step is mostly matmuls, so the rate each framework's matmul library reaches on
the step's own shapes bounds the tokens/s ratio of bench/train_step.py. Prints GFLOP/s
per shape (best of 10 runs after warm-up) for XLA (jax.jit, whatever matmul library this
jaxlib's XLA:CPU picks) and PyTorch (its BLAS), and their ratio.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# (tokens, in, out) of the 4 x 512-token step: attention projections, SwiGLU up/down, the vocabulary layer.
SHAPES = [(2048, 512, 512), (2048, 512, 1408), (2048, 1408, 512), (1024, 512, 32000), (1024, 32000, 512)]


def _best(fn, repeats: int = 10) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  import torch

  rng = np.random.default_rng(0)
  product = jax.jit(jnp.matmul)
  print(f"{'tokens x in x out':>20} {'XLA GFLOP/s':>12} {'torch GFLOP/s':>14} {'XLA/torch':>10}")
  for m, k, n in SHAPES:
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    xla = 2 * m * k * n / _best(lambda: jax.block_until_ready(product(ja, jb))) / 1e9
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    pytorch = 2 * m * k * n / _best(lambda: ta @ tb) / 1e9
    print(f"{f'{m} x {k} x {n}':>20} {xla:12.0f} {pytorch:14.0f} {xla / pytorch:10.2f}")


if __name__ == "__main__":
  main()
