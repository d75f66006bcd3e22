"""The DeepSeek-Coder-V2 recipe as a staged config: continued pretraining, then 32K, then 128K.

Stage 1 continues an intermediate DeepSeek-V2 checkpoint on the 60/10/30 code/math/text
mixture with FIM (PSM, half the documents), at DeepSeek-V2's pretraining sequence
length (4K). Batch sizes and learning rates are DeepSeek-V2's ("adjusted according to
DeepSeek-V2 specifications", paper section 3.1): 236B peak 2.4e-4 with a 9216-sequence
batch, Lite 4.2e-4 with 4608. The schedule is the paper's: 2000 warmup steps, cosine to
10%. Stages 2 and 3 are the paper's long-context extension with YaRN (s 40, alpha 1,
beta 32): 32K x 1152 for 1000 steps, then 128K x 288 for 1000 steps, long documents
upsampled (a minimum document length), parameters and Adam moments carried over.

`runlocal` keeps every stage, shrunk to a tiny model on the built-in corpus, for a CPU.
"""

from __future__ import annotations

import ml_collections

from pretrain.config import as_config_dict, model_config_dict
from pretrain.data.config import DataConfig, builtin_data
from pretrain.models.config import RopeScaling
from pretrain.schema import to_dict
from pretrain.train.config import MeshConfig, OptimizerConfig, StageConfig, TrainConfig

YARN = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                   mscale=0.707, mscale_all_dim=0.707)
TOKENS_CONTINUED = 6e12  # the paper's 6T further tokens


def deepseek_coder_v2(preset: str, *, peak_learning_rate: float, batch_sequences: int, mixture: str,
                      tokenizer: str, prepared_dir: str, init_from: str, workdir: str, mesh: MeshConfig,
                      remat: str = "block") -> ml_collections.ConfigDict:
  seq = 4096
  steps = round(TOKENS_CONTINUED / (batch_sequences * seq))
  optimizer = OptimizerConfig(peak_learning_rate=peak_learning_rate, warmup_steps=2000)
  long_context = OptimizerConfig(peak_learning_rate=peak_learning_rate * 0.1, warmup_steps=0)
  stages = (
      StageConfig(name="continued", steps=steps, seq_len=seq, global_batch_size=batch_sequences),
      StageConfig(name="32k", steps=1000, seq_len=32768, global_batch_size=1152, min_length=16384,
                  optimizer=long_context, rope_scaling=YARN, carry_optimizer_state=True),
      StageConfig(name="128k", steps=1000, seq_len=131072, global_batch_size=288, min_length=65536,
                  optimizer=long_context, rope_scaling=YARN, carry_optimizer_state=True),
  )
  return _config(model_config_dict(preset), DataConfig(mixture=mixture, prepared_dir=prepared_dir, tokenizer=tokenizer,
                                                       seq_len=seq, global_batch_size=batch_sequences),
                 TrainConfig(workdir=workdir, steps=steps, optimizer=optimizer, mesh=mesh, remat=remat,
                             init_from=init_from, checkpoint_every=500, keep_every=5000), stages)


def runlocal(workdir: str) -> ml_collections.ConfigDict:
  """Every stage of the recipe in minutes on a CPU: a tiny DeepSeek-V2-style model, the built-in corpus."""
  model = model_config_dict("tiny-deepseek-v2")
  vocab = model.vocab_size
  model.rope_scaling = as_config_dict(RopeScaling())  # stage 1 at the original context, no YaRN yet
  model.max_position_embeddings = 128
  yarn = RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32.0, beta_slow=1.0,
                     mscale=0.707, mscale_all_dim=0.707)
  stages = (
      StageConfig(name="continued", steps=60, seq_len=128, global_batch_size=8),
      StageConfig(name="long", steps=20, seq_len=256, global_batch_size=4, min_length=128, rope_scaling=yarn,
                  optimizer=OptimizerConfig(peak_learning_rate=1e-4, warmup_steps=0), carry_optimizer_state=True),
      StageConfig(name="longer", steps=20, seq_len=512, global_batch_size=2, min_length=256, rope_scaling=yarn,
                  optimizer=OptimizerConfig(peak_learning_rate=1e-4, warmup_steps=0), carry_optimizer_state=True),
  )
  data = builtin_data(vocab, seq_len=128, global_batch_size=8)
  train = TrainConfig(workdir=workdir, steps=60, optimizer=OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=10),
                      log_every=10, checkpoint_every=20)
  return _config(model, data, train, stages)


def _config(model, data: DataConfig, train: TrainConfig, stages) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model
  config.data = as_config_dict(data)
  config.train = as_config_dict(train)
  config.stages = [to_dict(stage) for stage in stages]
  config.seed = 0
  return config
