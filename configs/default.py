"""The built-in default: a tiny DeepSeek-V2-style MoE (MLA, shared + routed experts, YaRN) on the
built-in corpus (60/10/30 code/math/text from files every Python install has), for CPU runs.

  pretrain train                  # this config; prepares its data on first use
  pretrain describe
  pretrain prepare                # trains the tokenizer, then prepares the corpus
  pretrain describe --config=configs/default.py:family=qwen2
  pretrain describe --config=configs/default.py --config.model.num_hidden_layers=2
"""

import ml_collections

from pretrain.config import as_config_dict, model_config_dict, one_of, parse_arg
from pretrain.data.config import builtin_data
from pretrain.train.config import OptimizerConfig, TrainConfig

TINY_PRESETS = {"deepseek_v2": "tiny-deepseek-v2", "qwen2": "tiny-qwen2"}


def get_config(arg=None):
  variant = parse_arg(arg, family=one_of(*TINY_PRESETS))  # the first, deepseek_v2, by default
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(TINY_PRESETS[variant.family])
  # Prepared data and the trained tokenizer are shared by every run of this config (data/config.py).
  config.data = as_config_dict(builtin_data(config.model.vocab_size, seq_len=256, global_batch_size=8))
  config.train = as_config_dict(TrainConfig(
      workdir="runs/default",
      steps=300,
      optimizer=OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=50),  # tiny model: short warmup
      log_every=10,
      checkpoint_every=100,
  ))
  config.seed = 0
  return config
