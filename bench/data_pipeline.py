"""Throughput of the full input pipeline (read, mix, FIM, pack, batch) on pre-tokenized shards,
against what one training step of the same config consumes.

  .venv/bin/python bench/data_pipeline.py                      # the built-in default config
  .venv/bin/python bench/data_pipeline.py --config=configs/default.py --config.data.seq_len=2048

Prepares the config's data first if needed (not timed). The pipeline runs in this one
process, so tokens/s per core = tokens / CPU seconds of this process. The training step is
forward + backward of the config's model with the next-token loss (no optimizer update:
a lower bound on step time, so the ratio below is conservative).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain import config as config_lib
from pretrain import models
from pretrain.data import pipeline, workspace
from pretrain.train import loss as loss_lib


def pipeline_throughput(data, mixture, tokenizer, min_tokens: int) -> tuple[float, float]:
  """(tokens per wall second, tokens per CPU second of this process)."""
  it = iter(pipeline.build(data, mixture, tokenizer))
  for _ in range(3):  # shard indexes, first reads
    next(it)
  tokens, wall, cpu = 0, time.perf_counter(), time.process_time()
  while tokens < min_tokens:
    tokens += next(it)["inputs"].size
  return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def step_consumption(model_config, batch: dict[str, np.ndarray], num_components: int, repeats: int = 5) -> float:
  """Tokens per second that forward + backward of the model takes in."""
  model = models.build(model_config)
  graphdef, params = nnx.split(model)

  def loss(params, batch):  # the trainer's own loss (chunked cross-entropy + balance loss)
    return loss_lib.loss_and_metrics(nnx.merge(graphdef, params), batch, chunk=batch["inputs"].shape[1],
                                     num_components=num_components)[0]

  step = jax.jit(jax.value_and_grad(loss))
  jax.block_until_ready(step(params, batch))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(step(params, batch))
  return batch["inputs"].size * repeats / (time.perf_counter() - start)


def main(argv) -> None:
  _, experiment = config_lib.load([a for a in argv if a.startswith("--config")])
  data = experiment.data
  mixture, tokenizer, _ = workspace.ensure_prepared(data, log=lambda message: None)
  wall, per_core = pipeline_throughput(data, mixture, tokenizer, min_tokens=4_000_000)
  batch = next(iter(pipeline.build(data, mixture, tokenizer)))
  consumed = step_consumption(experiment.model, {k: jnp.asarray(v) for k, v in batch.items()},
                              len(mixture.components))
  print(f"config: seq_len {data.seq_len}, global batch {data.global_batch_size}, "
        f"components {', '.join(f'{c.name} {c.weight:g} (fim {c.fim_rate:g})' for c in mixture.components)}")
  print(f"pipeline          {per_core:14,.0f} tokens/s per core   ({wall:,.0f} tokens/s wall)")
  print(f"training step     {consumed:14,.0f} tokens/s consumed (forward + backward, {jax.devices()[0].platform})")
  print(f"pipeline / step   {per_core / consumed:14,.1f}x")


if __name__ == "__main__":
  main(sys.argv[1:])
