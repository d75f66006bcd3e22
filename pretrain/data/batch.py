"""The training batch: the arrays the packer makes, the trainer shards and the step reads.

Per row of `seq_len` tokens (data/packing.py): `inputs`, `targets`, `positions`,
`segment_ids` (1, 2, ... per document piece, 0 for padding) and `loss_mask` are [B, S];
`component` (the mixture component the row came from) is [B]. Logical axes: `batch` for
rows, `sequence` for a row's tokens (the axis rules map them to the mesh).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  dtype: np.dtype
  per_token: bool  # [B, S]; else [B]

  @property
  def logical_axes(self) -> tuple[str, ...]:
    return ("batch", "sequence") if self.per_token else ("batch",)

  def shape(self, rows: int, seq: int) -> tuple[int, ...]:
    return (rows, seq) if self.per_token else (rows,)


FIELDS = (
    Field("inputs", np.dtype(np.int32), True),
    Field("targets", np.dtype(np.int32), True),
    Field("positions", np.dtype(np.int32), True),
    Field("segment_ids", np.dtype(np.int32), True),
    Field("loss_mask", np.dtype(np.float32), True),
    Field("component", np.dtype(np.int32), False),
)
NAMES = tuple(field.name for field in FIELDS)


def empty_row(seq: int, pad_id: int, component: int) -> dict[str, np.ndarray]:
  """One row before packing fills it: padding, segment 0, no loss."""
  row = {f.name: np.zeros(seq, f.dtype) for f in FIELDS if f.per_token}
  row["inputs"][:] = pad_id
  row["targets"][:] = pad_id
  row["component"] = np.int32(component)
  return row


def abstract(rows: int, seq: int, shardings: dict | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch's shapes and dtypes (with each field's sharding, if given), for compiling the step."""
  return {f.name: jax.ShapeDtypeStruct(f.shape(rows, seq), f.dtype, sharding=(shardings or {}).get(f.name))
          for f in FIELDS}


def bytes_per_row(seq: int) -> int:
  return sum(f.dtype.itemsize * (seq if f.per_token else 1) for f in FIELDS)


def synthetic(rows: int, seq: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens, one whole document per row, every target counted: the benchmarks' batch."""
  tokens = np.random.default_rng(seed).integers(3, vocab_size, (rows, seq + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
          "segment_ids": np.ones((rows, seq), np.int32), "loss_mask": np.ones((rows, seq), np.float32),
          "component": np.zeros(rows, np.int32)}
