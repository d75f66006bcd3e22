"""The model families: Qwen2 dense and DeepSeek-V2 (MLA + DeepSeekMoE), in Flax NNX."""

from __future__ import annotations

from flax import nnx

from pretrain.models.block_sizes import BlockSizes
from pretrain.models.causal_lm import CausalLM
from pretrain.models.config import DeepseekV2Config, ModelConfig, Qwen2Config, RopeScaling, parse_model_config
from pretrain.models.deepseek_v2 import DeepseekV2Model
from pretrain.models.deepseek_v2_sizes import DeepseekV2Sizes
from pretrain.models.parallelism import ONE_DEVICE, Parallelism
from pretrain.models.qwen2 import Qwen2Model
from pretrain.models.qwen2_sizes import Qwen2Sizes

MODEL_CLASSES = {Qwen2Config: Qwen2Model, DeepseekV2Config: DeepseekV2Model}
# Each family's per-device activation sizes, for the capacity planner (pretrain/plan/).
SIZE_CLASSES = {Qwen2Config: Qwen2Sizes, DeepseekV2Config: DeepseekV2Sizes}


def build(config: ModelConfig, seed: int = 0, *, parallelism: Parallelism = ONE_DEVICE) -> CausalLM:
  """A randomly initialised model (float32 parameters), laid out on the devices as `parallelism` says."""
  return MODEL_CLASSES[type(config)](config, parallelism=parallelism, rngs=nnx.Rngs(seed))


def build_abstract(config: ModelConfig, *, parallelism: Parallelism = ONE_DEVICE) -> CausalLM:
  """The model with ShapeDtypeStruct leaves: shapes and axis names, no memory."""
  return nnx.eval_shape(lambda: build(config, parallelism=parallelism))


def block_sizes(config: ModelConfig) -> BlockSizes:
  """What this model's blocks hold per device (models/block_sizes.py), for the capacity planner."""
  return SIZE_CLASSES[type(config)](config)


__all__ = ["BlockSizes", "block_sizes", "CausalLM", "DeepseekV2Config", "DeepseekV2Model", "ModelConfig", "Qwen2Config", "Qwen2Model",
           "Parallelism", "RopeScaling", "build", "build_abstract", "parse_model_config"]
