"""Experiments: ml-collections config files, command-line overrides, and their typed schema.

A config file is a small Python file in `configs/` with `get_config(arg=None)` that
returns an `ml_collections.ConfigDict`; `arg` picks a variant
(`--config=configs/x.py:runlocal`) and `--config.a.b=value` overrides any field.
`load` turns the result into an `ExperimentConfig`, refusing unknown keys, wrong
types and impossible combinations before any compute.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from pretrain import schema
from pretrain.data.config import DataConfig
from pretrain.models import presets
from pretrain.models.config import ModelConfig
from pretrain.train.config import StageConfig, TrainConfig
from pretrain.schema import ConfigError

# The built-in default experiment: a tiny DeepSeek-V2-style model.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  model: ModelConfig
  data: DataConfig | None = None  # what `pretrain prepare` builds and training reads
  train: TrainConfig | None = None  # what `pretrain train` runs
  stages: tuple[StageConfig, ...] = ()  # a staged recipe (train/stages.py); empty: one run of `train`
  seed: int = 0

  def validate(self, key: str) -> None:
    names = [stage.name for stage in self.stages]
    for i, name in enumerate(names):
      if name in names[:i]:
        raise ConfigError(f"{key}.stages[{i}].name", f"{name!r} names two stages")
    if self.stages and self.train is None:
      raise ConfigError(f"{key}.train", "a staged recipe needs the train section its stages change")


def parse_experiment(cfg: Any) -> ExperimentConfig:
  return schema.parse(ExperimentConfig, cfg, "config")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config variant string `a=1,b=x,flag` (big_vision style) against typed defaults."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      allowed = ", ".join(sorted(defaults)) if defaults else "none (this config has no variants)"
      raise ConfigError(f"config variant {name!r}", f"unknown; allowed: {allowed}")
    default = defaults[name]
    if isinstance(default, bool):
      result[name] = value.lower() in ("", "1", "true", "yes")
    elif value == "" and not isinstance(default, str):
      raise ConfigError(f"config variant {name!r}", f"needs a value, e.g. {name}={default}")
    else:
      result[name] = type(default)(value) if default is not None else value
  return result


def model_config_dict(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A preset as a ConfigDict whose every field, optional ones included, can be overridden by flag."""
  model = presets.get(preset, **overrides)
  return as_config_dict(model)


def as_config_dict(obj: Any) -> Any:
  """A dataclass as a ConfigDict; None fields become typed placeholders so flags can set them."""
  if not dataclasses.is_dataclass(obj):
    return obj
  hints = typing.get_type_hints(type(obj))
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    if value is None:  # a typed placeholder keeps `--config.model.q_lora_rank=1536` working
      inner = [a for a in typing.get_args(hints[field.name]) if a is not type(None)]
      value = config_dict.placeholder(inner[0] if inner else object)
    out[field.name] = as_config_dict(value)
  return out


def load(flag_args: Sequence[str], default: Path | None = DEFAULT_CONFIG) -> tuple[ml_collections.ConfigDict,
                                                                                 ExperimentConfig]:
  """Reads `--config=FILE[:ARG]` and `--config.x.y=V` flags -> (the ConfigDict, its typed form)."""
  spec, overrides = (str(default) if default else None), []
  for arg in flag_args:
    name, eq, value = arg.partition("=")
    if not eq:
      raise ConfigError(name, "expected --config=FILE[:ARG] or --config.KEY=VALUE")
    if name == "--config":
      spec = value
    elif name.startswith("--config."):
      overrides.append((name[len("--config."):].split("."), value))
    else:
      raise ConfigError(name, "not a config flag")
  if spec is None:
    raise ConfigError("--config", "no config file given")
  cfg = load_file(spec)
  for path, value in overrides:
    override(cfg, path, value)
  return cfg, parse_experiment(cfg)


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of the Python file in `FILE[:ARG]`."""
  cfg = call_file_function(spec, "get_config", "--config")
  return cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(cfg)


def call_file_function(spec: str, function: str, key: str) -> Any:
  """`function(arg)` of the Python file in `FILE[:ARG]` (config and mixture files work this way)."""
  path, _, arg = str(spec).partition(":")
  if not Path(path).is_file():
    raise ConfigError(key, f"file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"pretrain_{function}_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise ConfigError(key, f"{path} defines no {function}(arg=None)")
  return getattr(module, function)(arg or None)


def override(cfg: ml_collections.ConfigDict, path: Sequence[str], text: str) -> None:
  """Sets cfg.<path> from command-line text, parsed as the type the field already has."""
  node = cfg
  for i, name in enumerate(path):
    key = ".".join(["config", *path[:i + 1]])
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      allowed = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none (not a group)"
      raise ConfigError(key, f"unknown key; allowed keys: {allowed}")
    if i < len(path) - 1:
      node = node[name]
  name = path[-1]
  field_type = node.get_type(name)
  try:
    node[name] = _parse_value(text, field_type)
  except (TypeError, ValueError, SyntaxError) as e:
    raise ConfigError(key, f"cannot set {text!r}: expected {getattr(field_type, '__name__', field_type)}") from e


def _parse_value(text: str, field_type: Any) -> Any:
  if text == "None":
    return None
  if field_type is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(text)
    return text.lower() in ("true", "1")
  if field_type in (int, float):
    value = ast.literal_eval(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (field_type is int and isinstance(value, float)):
      raise ValueError(text)
    return field_type(value)
  if field_type in (tuple, list):
    return field_type(ast.literal_eval(text))
  if field_type is str:
    return text
  return ast.literal_eval(text)
