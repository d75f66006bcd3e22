"""Host batches -> global `jax.Array`s laid out over the mesh's batch axes.

Each process holds its own rows (the pipeline gives it a disjoint share); together
they form the global batch, sharded along the leading dimension over `batch_axes`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, batch_axes: tuple[str, ...]) -> dict[str, jax.Array]:
  out = {}
  for name, local in batch.items():
    spec = PartitionSpec(batch_axes, *([None] * (local.ndim - 1)))
    out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)
  return out
