"""DeepCoder-14B / DeepSeek-R1-Distill-Qwen-14B (Qwen2 dense, 14.77B).

  pretrain describe --config=configs/deepcoder_14b.py
"""

import ml_collections

from pretrain.config import model_config_dict, parse_arg


def get_config(arg=None):
  parse_arg(arg)  # this config has no variants: refuse any
  config = ml_collections.ConfigDict()
  config.model = model_config_dict("qwen2-14b")
  config.seed = 0
  return config
