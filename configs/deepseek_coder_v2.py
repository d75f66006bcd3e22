"""DeepSeek-Coder-V2 (236B total, 21B active).

  pretrain describe --config=configs/deepseek_coder_v2.py
"""

import ml_collections

from pretrain.config import model_config_dict, parse_arg


def get_config(arg=None):
  parse_arg(arg)  # this config has no variants: refuse any
  config = ml_collections.ConfigDict()
  config.model = model_config_dict("deepseek-coder-v2")
  config.seed = 0
  return config
