"""Experiments: ml-collections config files, command-line overrides, and their typed schema.

A config file is a small Python file in `configs/` with `get_config(arg=None)` that
returns an `ml_collections.ConfigDict`; `arg` picks a variant
(`--config=configs/x.py:runlocal`) and `--config.a.b=value` overrides any field
(`ml_collections.config_flags`: each override parsed as the type its field has).
`load` turns the result into an `ExperimentConfig`, refusing unknown keys, wrong
types and impossible combinations before any compute.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path

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


@dataclasses.dataclass(frozen=True)
class OneOf:
  """A config variant that takes one of a few names; the first is the default (see `one_of`)."""

  values: tuple[str, ...]


def one_of(*values: str) -> OneOf:
  """`parse_arg(arg, family=one_of("deepseek_v2", "qwen2"))`: any other name is refused, naming these."""
  return OneOf(tuple(values))


_TRUE, _FALSE = ("", "1", "true", "yes"), ("0", "false", "no")  # a bare `runlocal` is true


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config variant string `a=1,b=x,flag` (big_vision style) against typed defaults; a default made
  by `one_of(...)` allows only its names."""
  result = ml_collections.ConfigDict({name: d.values[0] if isinstance(d, OneOf) else d for name, d in defaults.items()})
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      allowed = ", ".join(sorted(defaults)) if defaults else "none (this config has no variants)"
      raise ConfigError(f"config variant {name!r}", f"unknown; allowed: {allowed}")
    default = defaults[name]
    if isinstance(default, OneOf):
      if value not in default.values:
        raise ConfigError(f"config variant {name!r}", f"unknown {name} {value!r}; known: {', '.join(default.values)}")
      result[name] = value
    elif isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ConfigError(f"config variant {name!r}", f"expected true or false, got {value!r}")
      result[name] = value.lower() in _TRUE
    elif value == "" and not isinstance(default, str):
      raise ConfigError(f"config variant {name!r}", f"needs a value, e.g. {name}={default}")
    elif default is None or isinstance(default, str):
      result[name] = value
    else:
      try:
        result[name] = type(default)(value)
      except ValueError:
        raise ConfigError(f"config variant {name!r}", f"expected {type(default).__name__}, got {value!r}") from None
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
  """Parses `--config=FILE[:ARG]` and `--config.x.y=V` flags with ml_collections -> (the ConfigDict, its typed form)."""
  argv = ["pretrain", *flag_args]
  flag_values = flags.FlagValues()  # a fresh one: every call defines its own override flags
  # ml_collections defines a flag for each `--config.a.b` it finds in sys_argv (sys.argv if not given) when it
  # loads the config file: at set_default below, or when `--config=` is parsed.
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
  loaded = []  # what the file parser loaded: an unknown key's error lists the keys there are
  flag_values["config"].parser = _FileParser(loaded=loaded)
  try:
    if default is not None:
      flag_values.set_default("config", str(default))
    rest = flag_values(argv)[1:]
  except (flags.Error, KeyError, AttributeError, IndexError, ValueError) as e:
    raise _config_error(e, loaded[-1] if loaded else None, flag_args) from None
  if rest:
    raise ConfigError(rest[0], "not a config flag; expected --config=FILE[:ARG] or --config.KEY=VALUE")
  cfg = flag_values["config"].value
  if cfg is None:
    raise ConfigError("--config", "no config file given")
  return cfg, parse_experiment(cfg)


class _FileParser(flags.ArgumentParser):
  """`--config=FILE[:ARG]` through `load_file` (ml_collections' loader would turn a ConfigError raised by
  get_config into a traceback in a string, and a missing file into an error only on first use)."""

  def __init__(self, *, loaded: list[ml_collections.ConfigDict]):  # by keyword: absl caches parsers made without
    self._loaded = loaded

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    self._loaded.append(load_file(argument))
    return self._loaded[-1]

  def flag_type(self) -> str:
    return "config file"


class _FieldParser(flags.ArgumentParser):
  """absl's parser for one field type, plus `None` (clears any field) and an error that names the type."""

  def __init__(self, parse: Callable[[Any], Any], type_name: str):
    self._parse, self._type_name = parse, type_name

  def parse(self, argument: Any) -> Any:
    if argument == "None":
      return None
    try:
      return self._parse(argument)
    except (TypeError, ValueError, SyntaxError) as e:
      raise ValueError(f"cannot set {argument!r}: expected {self._type_name}") from e

  def flag_type(self) -> str:
    return self._type_name


def _parse_list(argument: Any) -> list:
  value = ast.literal_eval(argument) if isinstance(argument, str) else argument
  if not isinstance(value, list):
    raise ValueError(argument)
  return value


# ml_collections picks an override's parser by the type of the field (tuples keep its TupleParser). These are
# registered for the whole process; pretrain is config_flags' only user in it.
for _type, _parse in ((int, flags.IntegerParser().parse), (float, flags.FloatParser().parse),
                      (bool, flags.BooleanParser().parse), (str, flags.ArgumentParser().parse), (list, _parse_list)):
  config_flags.register_flag_parser_for_type(_type, _FieldParser(_parse, _type.__name__))
del _type, _parse


def _config_error(e: Exception, cfg: ml_collections.ConfigDict | None, flag_args: Sequence[str]) -> Exception:
  """An absl or ml_collections error as a ConfigError that names the key; a config file's own error as it is."""
  if isinstance(e, flags.IllegalFlagValueError) and str(e).startswith("flag --"):  # absl: "flag --NAME=VALUE: why"
    name, _, rest = str(e)[len("flag --"):].partition("=")
    if name == "config":  # load_file's ConfigError (a missing file, a bad variant), else a bug in the file
      return e.__context__ or ConfigError("--config", rest)
    return ConfigError(name, str(e.__context__) if e.__context__ else rest)
  if isinstance(e, flags.UnrecognizedFlagError):
    if cfg is None and e.flagname.startswith("config."):
      return ConfigError("--config", "no config file given")
    return ConfigError(f"--{e.flagname}", "not a config flag; expected --config=FILE[:ARG] or --config.KEY=VALUE")
  if isinstance(e, flags.Error):  # an override before --config, a flag without a value, an unsupported type, ...
    return ConfigError("--config", str(e).splitlines()[0])
  if cfg is None:  # raised by the config file itself
    return e
  # Looking up an override's field failed (KeyError and friends carry no path): find which.
  return _unknown_key(cfg, flag_args) or ConfigError("--config", str(e).splitlines()[0])


def _unknown_key(cfg: ml_collections.ConfigDict, flag_args: Sequence[str]) -> ConfigError | None:
  """The first `--config.a.b=V` that names no field of cfg, as an error listing the keys there are."""
  for arg in flag_args:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    try:
      parts = config_path.split(match.group(1))
    except ValueError:
      return ConfigError(f"config.{match.group(1)}", "not a key path like a.b or a[0].b")
    node, key = cfg, "config"
    for part in parts:
      key += f"[{part}]" if isinstance(part, int) else f".{part}"
      if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
        node = node[part]
      elif isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
        node = node[part]
      elif isinstance(node, (list, tuple)):
        return ConfigError(key, f"no such item; the list has {len(node)}")
      else:
        groups = (ml_collections.ConfigDict, dict)
        allowed = (", ".join(sorted(node.keys())) or "none") if isinstance(node, groups) else "none (not a group)"
        return ConfigError(key, f"unknown key; allowed keys: {allowed}")
  return None


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of the Python file in `FILE[:ARG]`."""
  cfg = call_file_function(spec, "get_config", "--config")
  return cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(cfg)


def call_file_function(spec: str, function: str, key: str) -> Any:
  """`function(arg)` of the Python file in `FILE[:ARG]` (config and mixture files work this way). An error in the
  file (a syntax error, an exception in `function`) is a ConfigError naming its file and line; a ConfigError the
  file raises itself (a bad variant) is passed on as it is."""
  path, _, arg = str(spec).partition(":")
  if not Path(path).is_file():
    raise ConfigError(key, f"file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"pretrain_{function}_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
      raise ConfigError(key, f"{path} defines no {function}(arg=None)")
    return getattr(module, function)(arg or None)
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(key, _where_in_file(e, path)) from e


def _where_in_file(e: Exception, path: str) -> str:
  """'FILE:LINE: Type: message' for an error raised by a config file: for a syntax error, where Python found it;
  else the innermost frame in the file (the line that called what failed), else the innermost frame of all."""
  def shown(filename: str | None) -> str | None:  # the file as the user named it
    return path if filename and Path(filename).resolve() == Path(path).resolve() else filename

  if isinstance(e, SyntaxError):
    where, message = f"{shown(e.filename)}:{e.lineno}", e.msg
  else:
    frames = traceback.extract_tb(e.__traceback__)
    in_file = [f for f in frames if shown(f.filename) == path] or frames[-1:]
    where = f"{shown(in_file[-1].filename)}:{in_file[-1].lineno}" if in_file else path
    message = (str(e).splitlines() or [""])[0]
  return f"{where}: {type(e).__name__}" + (f": {message}" if message else "")
