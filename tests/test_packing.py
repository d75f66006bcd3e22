"""Packing: every token in exactly once, right shapes and masks, exact resume."""

import grain
import numpy as np
import pytest

from pretrain.data.packing import PackIterDataset

PAD = -1


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 1000, n).astype(np.int32) for n in lengths]


def _pack(docs, seq_len):
  return PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=seq_len, pad_id=PAD, component=3)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_tokens_in_equal_tokens_out_and_masks_are_right(seq_len):
  lengths = np.random.default_rng(1).integers(1, 150, 200)
  docs = _docs(lengths)
  rows = list(_pack(docs, seq_len))
  stream = np.concatenate(docs)
  doc_of = np.repeat(np.arange(len(docs)), lengths)
  inputs = np.concatenate([r["inputs"] for r in rows])
  real = np.concatenate([r["segment_ids"] for r in rows]) > 0
  # No token lost, none duplicated, in stream order; padding only at the very end.
  np.testing.assert_array_equal(inputs[real], stream)
  assert real[:len(stream)].all() and not real[len(stream):].any()
  for r in rows:
    for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):
      assert r[key].shape == (seq_len,)
    assert r["component"] == 3
  targets = np.concatenate([r["targets"] for r in rows])[:len(stream)]
  mask = np.concatenate([r["loss_mask"] for r in rows])[:len(stream)]
  # A target is supervised exactly when it is the next token of the same document.
  same_doc_next = np.append(doc_of[1:] == doc_of[:-1], False)
  np.testing.assert_array_equal(mask.astype(bool), same_doc_next)
  np.testing.assert_array_equal(targets[same_doc_next], stream[1:][same_doc_next[:-1]])


def test_segments_and_positions_restart_per_document_piece():
  docs = [np.arange(10, 13, dtype=np.int32), np.arange(20, 27, dtype=np.int32), np.arange(30, 32, dtype=np.int32)]
  rows = list(_pack(docs, 5))
  np.testing.assert_array_equal(rows[0]["inputs"], [10, 11, 12, 20, 21])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 0, 1, 1])
  # The split document continues in the next row as its own piece, positions from 0.
  np.testing.assert_array_equal(rows[1]["inputs"], [22, 23, 24, 25, 26])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows[1]["loss_mask"], [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(rows[2]["inputs"], [30, 31, PAD, PAD, PAD])
  np.testing.assert_array_equal(rows[2]["segment_ids"], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows[2]["loss_mask"], [1, 0, 0, 0, 0])


def test_long_documents_are_split_not_dropped():
  docs = _docs([1000, 3])
  rows = list(_pack(docs, 64))
  assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == 1003


def test_empty_documents_are_skipped():
  docs = [np.zeros(0, np.int32), np.arange(4, dtype=np.int32), np.zeros(0, np.int32)]
  rows = list(_pack(docs, 8))
  assert len(rows) == 1 and rows[0]["segment_ids"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("k", [0, 1, 5, 17])
def test_state_restores_the_stream_exactly(k):
  docs = _docs(np.random.default_rng(2).integers(1, 90, 120))
  dataset = _pack(docs, 16)
  it = iter(dataset)
  for _ in range(k):
    next(it)
  state = it.get_state()
  expected = list(it)
  restored = iter(dataset)
  restored.set_state(state)
  got = list(restored)
  assert len(got) == len(expected)
  for a, b in zip(got, expected, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
