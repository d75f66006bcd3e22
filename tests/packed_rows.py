"""Segment ids shaped like the packer's rows (data/packing.py), for attention tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def packed_segment_ids(batch: int, seq: int, seed: int, *, min_length: int = 1,
                       padding_divisor: int = 4) -> jnp.ndarray:
  """[B, S] int32: documents 1, 2, ... of random lengths in [min_length, S/3), then 1..S/padding_divisor
  positions of padding (segment 0)."""
  rng, rows = np.random.default_rng(seed), []
  for _ in range(batch):
    ids = np.repeat(np.arange(1, seq + 1), rng.integers(min_length, seq // 3, size=seq))
    ids = ids[:seq - rng.integers(1, seq // padding_divisor)]
    rows.append(np.pad(ids, (0, seq - len(ids))))
  return jnp.asarray(np.stack(rows), jnp.int32)
