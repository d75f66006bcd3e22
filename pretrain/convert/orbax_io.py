"""Our own checkpoint format: an Orbax checkpoint of the parameters, the model config beside it.

Layout of `ckpt_dir`: `params/` (Orbax StandardCheckpointer, a pure dict of float32
arrays) and `model_config.json` (our config, `schema.to_dict`). Written all-or-nothing
(`output_dir.py`). Read onto any sharding: each process restores only its own shards.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pretrain import models, orbax_s3, schema, storage
from pretrain.convert import param_shapes
from pretrain.convert.errors import ConversionError
from pretrain.convert.output_dir import atomic_output_dir

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
# Stored chunks: one slot of a stacked parameter (a layer's, an expert's) at a time, at most this many
# bytes, so a reader of one slot (the export, a restore onto another layout) decodes only that slot.
STACKED_AXES = ("layers", "expert")
CHUNK_BYTES = 64 * 2**20


def save_orbax(model: models.CausalLM, ckpt_dir) -> None:
  """Refuses an existing non-empty `ckpt_dir`; leaves nothing behind if it fails."""
  save_params(nnx.state(model, nnx.Param), model.config, ckpt_dir)


def save_params(params: nnx.State, config: models.ModelConfig, ckpt_dir) -> None:
  """The parameters (sharded arrays: each process writes its own shards) and their model config."""
  with atomic_output_dir(ckpt_dir) as partial:  # absolute, as Orbax wants
    checkpointer = ocp.StandardCheckpointer(atomicity_options=orbax_s3.atomicity_options(partial))
    try:
      checkpointer.save(partial / PARAMS_DIR, nnx.to_pure_dict(params), save_args=nnx.to_pure_dict(save_args(params)))
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    if jax.process_index() == 0:
      (partial / CONFIG_FILE).write_text(json.dumps(schema.to_dict(config), indent=2) + "\n")


def save_args(tree):
  """`ocp.SaveArgs` for every array of a tree of parameters (or a train state holding them and their
  Adam moments, which keep the parameters' axis names): chunks split along the leading stacked axes first."""
  def args(axes) -> ocp.SaveArgs:
    lead = 0
    while lead < len(axes) and axes[lead] in STACKED_AXES:
      lead += 1
    return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=tuple(range(lead)))

  def leaf(x):
    if isinstance(x, nnx.Variable):
      return x.replace(args(x.get_metadata().get("out_sharding") or ()))
    return args(())

  return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def read_config(ckpt_dir) -> models.ModelConfig:
  config_file = storage.as_path(ckpt_dir) / CONFIG_FILE
  if not config_file.is_file():
    raise ConversionError(f"{config_file}: not found (not a save_orbax checkpoint, or an incomplete one)")
  try:
    return models.parse_model_config(json.loads(config_file.read_text()), key=CONFIG_FILE)
  except (ValueError, TypeError) as e:  # JSONDecodeError and ConfigError are ValueErrors
    raise ConversionError(f"{config_file}: {e}") from e


def load_params(ckpt_dir, abstract_params: nnx.State, key: str = "checkpoint") -> nnx.State:
  """`abstract_params` (ShapeDtypeStruct leaves with shardings) restored from `ckpt_dir`, shard by shard."""
  param_shapes.check(read_config(ckpt_dir), abstract_params, ckpt_dir, key)
  checkpointer = ocp.StandardCheckpointer(atomicity_options=orbax_s3.atomicity_options(ckpt_dir))
  try:
    pure = checkpointer.restore(storage.local_absolute(ckpt_dir) / PARAMS_DIR, nnx.to_pure_dict(abstract_params))
  finally:
    checkpointer.close()
  params = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(params, pure)
  return params


def load_orbax(ckpt_dir) -> models.CausalLM:
  """The model, parameters on the default device."""
  graphdef, abstract_params, rest = nnx.split(models.build_abstract(read_config(ckpt_dir)), nnx.Param, ...)
  placed = param_shapes.placed(abstract_params, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return nnx.merge(graphdef, load_params(ckpt_dir, placed), rest)


