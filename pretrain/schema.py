"""Typed schemas for configs: a ConfigDict (or dict) in, a frozen dataclass out.

Every experiment setting ends up in a dataclass whose fields have types. `parse`
walks a nested mapping, refuses unknown keys and wrong types, and names the
offending key (`config.model.num_heads`) with the allowed keys or values, so a
typo is an error at start-up instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config value that is unknown, mistyped, or impossible in combination."""

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"{key}: {message}")


def parse(cls: type[T], values: Mapping[str, Any] | None, key: str = "config") -> T:
  """Builds dataclass `cls` from `values`, checking keys and types; then `cls.validate()`."""
  if values is None:
    values = {}
  if hasattr(values, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ConfigError(key, f"expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; allowed keys: {', '.join(sorted(fields))}")
  kwargs = {}
  for name, field in fields.items():
    if name in values:
      kwargs[name] = parse_value(hints[name], values[name], f"{key}.{name}")
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ConfigError(f"{key}.{name}", "required key is missing")
  obj = cls(**kwargs)
  validate = getattr(obj, "validate", None)
  if validate is not None:
    validate(key)
  return obj


def to_dict(obj: Any) -> Any:
  """The inverse of `parse`: plain nested dicts/lists, ready for a ConfigDict or JSON."""
  if dataclasses.is_dataclass(obj):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, (list, tuple)):
    return [to_dict(v) for v in obj]
  return obj


def _parse_tagged(variants: list[type], value: Any, key: str) -> Any:
  """A union of dataclasses is told apart by its `family` field, e.g. family='qwen2'."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  tags = {typing.get_args(typing.get_type_hints(v)["family"])[0]: v for v in variants}
  family = value.get("family") if isinstance(value, Mapping) else None
  if family not in tags:
    raise ConfigError(f"{key}.family", f"got {family!r}; allowed values: {', '.join(map(repr, tags))}")
  return parse(tags[family], value, key)


def _describe(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  return getattr(tp, "__name__", str(tp))


def parse_value(tp: Any, value: Any, key: str) -> Any:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) == 1:  # Optional[X]: X's own error is the clearest
      return parse_value(non_none[0], value, key)
    variants = [a for a in args if dataclasses.is_dataclass(a)]
    if len(variants) > 1 and len(variants) == len([a for a in args if a is not type(None)]):
      return _parse_tagged(variants, value, key)
    errors = []
    for arg in (a for a in args if a is not type(None)):
      try:
        return parse_value(arg, value, key)
      except ConfigError as e:
        errors.append(str(e))
    allowed = " or ".join(_describe(a) for a in args)
    raise ConfigError(key, f"expected {allowed}, got {value!r}")
  if origin is Literal:
    if value not in args:
      raise ConfigError(key, f"got {value!r}; allowed values: {', '.join(repr(a) for a in args)}")
    return value
  if origin is dict:
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if not isinstance(value, Mapping):
      raise ConfigError(key, f"expected a mapping, got {value!r}")
    key_type, value_type = args or (Any, Any)
    return {parse_value(key_type, k, f"{key}"): parse_value(value_type, v, f"{key}.{k}") for k, v in value.items()}
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(key, f"expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[A, B]: one type per position
      if len(value) != len(args):
        raise ConfigError(key, f"expected {len(args)} items, got {value!r}")
      return tuple(parse_value(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
    (item,) = args[:1] or (Any,)
    return tuple(parse_value(item, v, f"{key}[{i}]") for i, v in enumerate(value))
  if dataclasses.is_dataclass(tp):
    return parse(tp, value, key)
  if tp is Any:
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(key, f"expected a bool, got {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(key, f"expected an int, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(key, f"expected a float, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(key, f"expected a string, got {value!r}")
    return value
  raise TypeError(f"{key}: schema type {tp!r} is not supported")  # a bug in a schema, not in a config
