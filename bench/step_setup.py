"""One compiled training step on synthetic tokens, shared by the benchmarks that time a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain import models, schema
from pretrain.train import optimizer, step
from pretrain.train.config import OptimizerConfig, TrainConfig


def compiled_train_step(config, seq: int, batch_size: int, *, remat: str = "block", loss_chunk: int = 4096):
  """(compiled step, its initial state, a batch): AdamW, one document per row, random tokens."""
  train = schema.parse(TrainConfig, {"steps": 100, "remat": remat, "loss_chunk": loss_chunk,
                                     "optimizer": schema.to_dict(OptimizerConfig(warmup_steps=1))}, "bench")
  model = models.build(config)
  model.remat = train.remat
  graphdef, params = nnx.split(model)
  tx = optimizer.make_optimizer(train.optimizer, train.steps, params)
  state = step.init_state(params, tx)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (batch_size, seq + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.tile(np.arange(seq, dtype=np.int32), (batch_size, 1)),
           "segment_ids": np.ones((batch_size, seq), np.int32), "loss_mask": np.ones((batch_size, seq), np.float32),
           "component": np.zeros(batch_size, np.int32)}
  batch = {key: jnp.asarray(value) for key, value in batch.items()}
  compiled = jax.jit(step.make_train_step(graphdef, tx, train, 1), donate_argnums=(0,)).lower(state, batch).compile()
  return compiled, state, batch
