"""One compiled training step on synthetic tokens, shared by the benchmarks that time a step.

The trainer's own step (`trainer.plan_step`, `trainer.jit_step`) on one device, without data
files, checkpoints or the loop.
"""

from __future__ import annotations

import jax

from pretrain import schema
from pretrain.config import ExperimentConfig
from pretrain.data import batch as batch_lib
from pretrain.data.config import DataConfig
from pretrain.train import sharding, trainer
from pretrain.train.config import MeshConfig, OptimizerConfig, TrainConfig


def compiled_train_step(config, seq: int, batch_size: int, *, remat: str = "block", loss_chunk: int = 4096):
  """(compiled step, its initial state, a batch): AdamW, one document per row, random tokens."""
  train_step, state, batch = train_step_inputs(config, seq, batch_size, remat=remat, loss_chunk=loss_chunk)
  return train_step.lower(state, batch).compile(), state, batch


def train_step_inputs(config, seq: int, batch_size: int, *, remat: str = "block", loss_chunk: int = 4096):
  """(the jitted step, its initial state, a batch), before compilation: for timing the compile itself."""
  train = schema.parse(TrainConfig, {"steps": 100, "remat": remat, "loss_chunk": loss_chunk,
                                     "optimizer": schema.to_dict(OptimizerConfig(warmup_steps=1))}, "bench")
  experiment = ExperimentConfig(model=config, train=train,
                                data=DataConfig(mixture="", prepared_dir="", tokenizer="", seq_len=seq,
                                                global_batch_size=batch_size))  # no data files: a synthetic batch
  plan = trainer.plan_step(experiment, sharding.make_mesh(MeshConfig(), jax.devices()[:1]))
  state = trainer.fresh_state(plan, experiment)
  batch = {name: jax.device_put(value, plan.batch_sharding[name])
           for name, value in batch_lib.synthetic(batch_size, seq, config.vocab_size).items()}
  return trainer.jit_step(plan, train, 1), state, batch
