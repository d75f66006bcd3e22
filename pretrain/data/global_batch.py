"""Host batches -> global `jax.Array`s laid out over the mesh's batch axes.

Each process holds its own rows (the pipeline gives it a disjoint share); together
they form the global batch, sharded along the leading dimension over `batch_axes`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding | dict[str, NamedSharding]) -> dict[str, jax.Array]:
  """`sharding` (one for all arrays, or one per array name) splits the leading (batch) dimension, e.g.
  NamedSharding(mesh, PartitionSpec(batch_axes)), and may split the sequence dimension too."""
  by_name = sharding if isinstance(sharding, dict) else dict.fromkeys(batch, sharding)
  return {name: jax.make_array_from_process_local_data(by_name[name], local) for name, local in batch.items()}
