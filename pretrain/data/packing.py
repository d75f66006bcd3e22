"""Packing documents into fixed-length rows for next-token prediction, as a Grain IterDataset.

Documents (each already `BOS body EOS`) are concatenated into one stream and cut into
rows of `seq_len` inputs. Row r holds stream tokens [r*L, r*L + L) as inputs and
[r*L + 1, r*L + L + 1) as targets, so every token is an input exactly once and every
next-token pair inside a document is a target exactly once: nothing lost, nothing
duplicated. A document that does not fit is split and continues in the next row; it
is never dropped.

Per row, the fields of `batch.FIELDS`: `inputs`, `targets`, `segment_ids` (1, 2, ... per
document piece in the row, 0 for padding), `positions` (restarting at 0 for each piece, the
document's own positions in the row), `loss_mask` (1.0 where the target follows its input
inside one document; the EOS -> next BOS pair and padding are 0), and `component` (which
mixture component the row came from; each row comes from one, so per-domain loss is per row).

The iterator's state is the parent's state just before the oldest document still in
the buffer, plus how many of its tokens were already emitted: restoring re-reads those
documents and skips the emitted part, so the stream continues exactly.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

from pretrain.data import batch


class PackIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, component: int):
    super().__init__(parent)
    self.seq_len, self.pad_id, self.component = seq_len, pad_id, component

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self.seq_len, self.pad_id, self.component)


class _PackIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, component: int):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._component = seq_len, pad_id, component
    # Buffered documents, oldest first: (parent state before reading it, token ids).
    self._docs: collections.deque[tuple[dict[str, Any], np.ndarray]] = collections.deque()
    self._head_offset = 0  # tokens of the oldest buffered document already emitted as inputs
    self._buffered = 0  # tokens buffered past _head_offset
    self._exhausted = False

  def _read(self) -> bool:
    state = self._parent.get_state()
    try:
      tokens = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return False
    if len(tokens):
      self._docs.append((state, np.asarray(tokens, np.int32)))
      self._buffered += len(tokens)
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    need = self._seq_len + 1  # the row's inputs plus the one target past them
    while self._buffered < need and not self._exhausted:
      self._read()
    if not self._buffered:
      raise StopIteration
    return self._emit_row(min(need, self._buffered))

  def _emit_row(self, take: int) -> dict[str, np.ndarray]:
    """A row from the first `take` buffered tokens; all but the last become inputs, and are consumed.

    At the end of a finite stream (take <= seq_len) every token left becomes an input; the last has
    no target and is masked.
    """
    pieces, doc_ids, positions = [], [], []
    remaining, offset = take, self._head_offset
    for i, (_, tokens) in enumerate(self._docs):
      if remaining == 0:
        break
      piece = tokens[offset:offset + remaining]
      pieces.append(piece)
      doc_ids.append(np.full(len(piece), i + 1, np.int32))
      positions.append(np.arange(len(piece), dtype=np.int32))
      remaining -= len(piece)
      offset = 0
    stream, doc_of = np.concatenate(pieces), np.concatenate(doc_ids)
    length = self._seq_len
    row = batch.empty_row(length, self._pad_id, self._component)
    n = min(take, length)  # inputs in this row
    t = min(n, take - 1)  # inputs that have a target in the stream
    row["inputs"][:n] = stream[:n]
    row["targets"][:t] = stream[1:t + 1]
    # Segment ids count the document pieces of this row from 1; positions restart per piece.
    row["segment_ids"][:n] = doc_of[:n] - doc_of[0] + 1
    row["positions"][:n] = np.concatenate(positions)[:n]
    row["loss_mask"][:t] = doc_of[:t] == doc_of[1:t + 1]
    self._consume(n)
    return row

  def _consume(self, n: int) -> None:
    self._buffered -= n
    while n:
      _, tokens = self._docs[0]
      left = len(tokens) - self._head_offset
      if n < left:
        self._head_offset += n
        return
      n -= left
      self._docs.popleft()
      self._head_offset = 0

  def get_state(self) -> dict[str, Any]:
    if self._docs:
      return {"parent": self._docs[0][0], "head_offset": self._head_offset}
    return {"parent": self._parent.get_state(), "head_offset": 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._docs.clear()
    self._buffered, self._head_offset, self._exhausted = 0, 0, False
    if state["head_offset"]:
      self._read()
      self._head_offset = state["head_offset"]
      self._buffered -= self._head_offset
