"""DeepSeek-Coder-V2-Lite's recipe (16B total, 2.4B active): continued pretraining, then 32K, then 128K.

  pretrain train --config=configs/recipes/deepseek_coder_v2_lite.py:init_from=/ckpt/dsv2-lite,\
code=/data/code,math=/data/math,text=/data/text,tokenizer=/ckpt/dsv2-lite
  pretrain train --config=configs/recipes/deepseek_coder_v2_lite.py:runlocal   # every stage, tiny, CPU
"""

from pretrain import recipes
from pretrain.config import parse_arg
from pretrain.train.config import MeshConfig


def get_config(arg=None):
  variant = parse_arg(arg, runlocal=False, init_from="", code="", math="", text="", tokenizer="",
                      workdir="runs/deepseek_coder_v2_lite", prepared_dir="prepared/deepseek_coder_v2")
  if variant.runlocal:
    return recipes.runlocal("runs/recipe_runlocal")
  mixture = f"data_mixtures/deepseek_coder_v2.py:code={variant.code},math={variant.math},text={variant.text}"
  return recipes.deepseek_coder_v2(
      "deepseek-coder-v2-lite", peak_learning_rate=4.2e-4, batch_sequences=4608, mixture=mixture,
      tokenizer=variant.tokenizer, prepared_dir=variant.prepared_dir, init_from=variant.init_from,
      workdir=variant.workdir, mesh=MeshConfig(data=-1, fsdp=8, expert=8))
