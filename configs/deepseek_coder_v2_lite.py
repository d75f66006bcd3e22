"""DeepSeek-Coder-V2-Lite (16B total, 2.4B active), the 16B recipe's model.

  pretrain describe --config=configs/deepseek_coder_v2_lite.py
"""

import ml_collections

from pretrain.config import model_config_dict, parse_arg


def get_config(arg=None):
  parse_arg(arg)  # this config has no variants: refuse any
  config = ml_collections.ConfigDict()
  config.model = model_config_dict("deepseek-coder-v2-lite")
  config.seed = 0
  return config
