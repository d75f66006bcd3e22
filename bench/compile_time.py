"""XLA compile time of the default tiny DeepSeek-V2 training step against depth, and the step's run time.

  .venv/bin/python bench/compile_time.py                  # 2, 3, 8, 16 and 32 layers
  .venv/bin/python bench/compile_time.py --layers 2,32 --steps 5 --rounds 3

The model, batch (8 x 256 tokens), remat and loss chunk are configs/default.py's; only
`num_hidden_layers` changes. Blocks of one kind run as one `jax.lax.scan`
(models/block_stack.py), so the compiled program, and its compile time, should barely
grow with depth. At 2 layers each stack (1 dense, 1 MoE) holds one layer, and XLA removes a scan of
one step: no loop, so no per-layer stacking of parameters, residuals and gradients (about 130 small
kernels fewer on XLA:CPU, which compiles each on its own). From 3 layers on the compiled program is the
same whatever the depth: the `kernels` column (the compiled step's fusions) says so. Compile time is
trace + lower + XLA compile of the whole step; the run
time is the median of `--steps` steps after one warm-up step. With `--rounds` the depths are
measured that many times over, in turn, and each depth's best round counts, so a shared
machine's drifting load does not favour one depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
from step_setup import train_step_inputs

from pretrain import config as config_lib
from pretrain import host_allocator


def measure(experiment, layers: int, steps: int) -> tuple[float, float, int]:
  """(seconds to trace and compile the step, median milliseconds of one step, the compiled step's kernels)
  at this depth."""
  model_config = dataclasses.replace(experiment.model, num_hidden_layers=layers)
  train, data = experiment.train, experiment.data
  train_step, state, batch = train_step_inputs(model_config, data.seq_len, data.global_batch_size,
                                               remat=train.remat, loss_chunk=train.loss_chunk)
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  kernels = compiled.as_text().count(" fusion(")
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i:  # the first step touches every buffer once
      times.append(time.perf_counter() - start)
  return compile_s, 1000 * statistics.median(times), kernels


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="2,3,8,16,32")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=1)
  args = parser.parse_args()
  experiment = config_lib.parse_experiment(config_lib.load_file(str(config_lib.DEFAULT_CONFIG)))
  depths = [int(n) for n in args.layers.split(",")]
  measure(experiment, depths[0], 1)  # warm-up: the process's first compile also pays JAX's own start-up
  best = {}
  for _ in range(args.rounds):
    for layers in depths:
      compile_s, step_ms, kernels = measure(experiment, layers, args.steps)
      print(f"{layers:>3} layers  compile {compile_s:6.1f} s  step {step_ms:8.1f} ms  kernels {kernels}", flush=True)
      old = best.get(layers, (compile_s, step_ms, kernels))
      best[layers] = (min(old[0], compile_s), min(old[1], step_ms), kernels)
  base = {depth: best[depth][0] for depth in depths[:2]}
  print(f"best of {args.rounds} round(s):")
  for layers, (compile_s, step_ms, kernels) in best.items():
    ratios = "  ".join(f"x{compile_s / seconds:.2f} of {depth}" for depth, seconds in base.items())
    print(f"{layers:>3} layers  compile {compile_s:6.1f} s ({ratios} layers)  step {step_ms:8.1f} ms  "
          f"kernels {kernels}")


if __name__ == "__main__":
  host_allocator.reexec_tuned()  # as `pretrain train` runs
  main()
