"""A checkpoint's parameters against the ones a run's model needs: same names, same shapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

from pretrain import models
from pretrain.convert.errors import ConversionError


def check(config: models.ModelConfig, abstract_params: nnx.State, source, key: str) -> None:
  """The checkpoint's model (`config`) has exactly `abstract_params`' parameters and shapes.

  The run's model may change how it computes (rope scaling, dtype, kernels), not its parameters.
  """
  found = dict(flatten(nnx.to_pure_dict(nnx.state(models.build_abstract(config), nnx.Param))))
  wanted = dict(flatten(nnx.to_pure_dict(abstract_params)))
  for path, target in wanted.items():
    name = ".".join(map(str, path))
    if path not in found:
      raise ConversionError(f"{key}: {source} has no parameter {name} that the model needs")
    if tuple(found[path].shape) != tuple(target.shape):
      raise ConversionError(f"{key}: {source}: parameter {name} has shape {tuple(found[path].shape)}, the model "
                            f"needs {tuple(target.shape)}")
  extra = sorted(set(found) - set(wanted), key=str)
  if extra:
    raise ConversionError(f"{key}: {source} has parameter {'.'.join(map(str, extra[0]))} that the model lacks")


def placed(abstract_params, sharding):
  """The abstract parameters (or any tree of ShapeDtypeStructs) with a sharding each: one for all, or a tree
  of them like the params."""
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, sharding)


def flatten(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(path, leaf) of a nested dict, as `nnx.to_pure_dict` makes them."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from flatten(v, prefix + (k,))
  else:
    yield prefix, tree
