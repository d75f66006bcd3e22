"""Our own checkpoint format: an Orbax checkpoint of the parameters, the model config beside it.

Layout of `ckpt_dir`: `params/` (Orbax StandardCheckpointer, a pure dict of float32
arrays) and `model_config.json` (our config, `schema.to_dict`). Written all-or-nothing
(`output_dir.py`).
"""

from __future__ import annotations

import json
import pathlib

import orbax.checkpoint as ocp
from flax import nnx

from pretrain import models, schema
from pretrain.convert.errors import ConversionError
from pretrain.convert.output_dir import atomic_output_dir

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"


def save_orbax(model: models.CausalLM, ckpt_dir) -> None:
  """Refuses an existing non-empty `ckpt_dir`; leaves nothing behind if it fails."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with atomic_output_dir(ckpt_dir) as partial:  # absolute, as Orbax wants
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(partial / PARAMS_DIR, params)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    (partial / CONFIG_FILE).write_text(json.dumps(schema.to_dict(model.config), indent=2) + "\n")


def load_orbax(ckpt_dir) -> models.CausalLM:
  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  config_file = ckpt_dir / CONFIG_FILE
  if not config_file.is_file():
    raise ConversionError(f"{config_file}: not found (not a save_orbax checkpoint, or an incomplete one)")
  try:
    config = models.parse_model_config(json.loads(config_file.read_text()), key=CONFIG_FILE)
  except (ValueError, TypeError) as e:  # JSONDecodeError and ConfigError are ValueErrors
    raise ConversionError(f"{config_file}: {e}") from e
  graphdef, param_state, rest = nnx.split(models.build_abstract(config), nnx.Param, ...)
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(ckpt_dir / PARAMS_DIR, nnx.to_pure_dict(param_state))
  finally:
    checkpointer.close()
  nnx.replace_by_pure_dict(param_state, params)
  return nnx.merge(graphdef, param_state, rest)
