"""Hugging Face interoperability and our own Orbax checkpoints.

  model = convert.load_hf(hf_dir)           # config.json + safetensors -> our NNX model, float32
  convert.save_hf(model, out_dir)           # -> a directory transformers' from_pretrained loads
  convert.save_orbax(model, ckpt_dir); model = convert.load_orbax(ckpt_dir)

Per-model tensor name tables live in `qwen2.py` and `deepseek_v2.py`.
"""

from __future__ import annotations

from pretrain.convert.errors import ConversionError
from pretrain.convert.hf_config import config_from_hf, config_to_hf
from pretrain.convert.hf_import import load_hf
from pretrain.convert.hf_io import save_hf
from pretrain.convert.orbax_io import load_orbax, save_orbax

__all__ = ["ConversionError", "config_from_hf", "config_to_hf", "load_hf", "load_orbax", "save_hf", "save_orbax"]
