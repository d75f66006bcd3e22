"""The built-in default: a tiny DeepSeek-V2-style MoE (MLA, shared + routed experts, YaRN) for CPU runs.

  pretrain describe
  pretrain describe --config=configs/default.py:family=qwen2
  pretrain describe --config=configs/default.py --config.model.num_hidden_layers=2
"""

import ml_collections

from pretrain.config import model_config_dict, parse_arg

TINY_PRESETS = {"deepseek_v2": "tiny-deepseek-v2", "qwen2": "tiny-qwen2"}


def get_config(arg=None):
  variant = parse_arg(arg, family="deepseek_v2")
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(TINY_PRESETS[variant.family])
  config.seed = 0
  return config
