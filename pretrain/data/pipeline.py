"""The training input pipeline, on Grain: prepared shards -> mixture of packed rows -> batches.

Per mixture component:
  documents (ArrayRecord shards of `pretrain prepare`, at least `min_length` tokens)
  -> this process's slice (every `process_count`-th document from `process_index`)
  -> global shuffle, reshuffled every epoch, repeated forever
  -> BOS + document (fill-in-the-middle on `fim_rate` of them) + EOS
  -> packed into rows of `seq_len` (packing.py)
Then the components' rows are interleaved by weight (Grain's deterministic mix: the
token proportions equal the weights, since every row holds `seq_len` tokens) and batched
into this process's share of the global batch. Everything random is seeded from
`DataConfig.seed`, so the stream is a pure function of the config, and the iterator's
state (`get_state` / `set_state`) restores it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import grain
import numpy as np

from pretrain.data import fim, records
from pretrain.data.config import DataConfig
from pretrain.data.mixture import Component, Mixture
from pretrain.data.packing import PackIterDataset
from pretrain.schema import ConfigError


def shard_paths(prepared_dir, component: Component) -> list[pathlib.Path]:
  directory = pathlib.Path(prepared_dir) / component.name
  paths = sorted(directory.glob(f"shard-*{records.SHARD_SUFFIX}"))
  if not paths:
    raise ConfigError("config.data.prepared_dir",
                      f"no shards for component {component.name!r} in {directory}; run `pretrain prepare` first")
  return paths


class DocumentSource(grain.sources.RandomAccessDataSource):
  """Token ids of a component's selected documents, by position."""

  def __init__(self, paths: list[pathlib.Path], indices: np.ndarray):
    self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> np.ndarray:
    record_index = int(self._indices[index])
    return records.decode(self._source[record_index], f"record {record_index}").tokens


def select_documents(paths: list[pathlib.Path], component: Component, *, skip_corrupt: bool) -> np.ndarray:
  """Indices (over the component's shards in order) of the documents with at least min_length tokens."""
  lengths_per_shard = [records.document_lengths(p) for p in paths]
  for path, lengths in zip(paths, lengths_per_shard, strict=True):
    corrupt = np.flatnonzero(lengths < 0)
    if len(corrupt) and not skip_corrupt:
      raise records.CorruptRecordError(
          f"{path}[{corrupt[0]}]: corrupt record ({len(corrupt)} in this shard); set "
          "config.data.skip_corrupt_records=True to skip them")
    if len(corrupt):
      logging.warning("skipping %d corrupt records in %s", len(corrupt), path)
  lengths = np.concatenate(lengths_per_shard)
  return np.flatnonzero(lengths >= max(component.min_length, 1))


@dataclasses.dataclass(frozen=True)
class MakeExample:
  """BOS + document (PSM/SPM fill-in-the-middle with probability fim_rate) + EOS."""

  tokenizer: object
  fim_rate: float
  spm_rate: float
  add_bos: bool

  def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(tokens) == 0:
      return tokens
    if self.fim_rate > 0:
      tokens = fim.transform(tokens, rng, self.tokenizer, fim_rate=self.fim_rate, spm_rate=self.spm_rate)
    parts = ([[self.tokenizer.bos_id]] if self.add_bos else []) + [tokens, [self.tokenizer.eos_id]]
    return np.concatenate(parts).astype(np.int32)


def component_rows(config: DataConfig, component: Component, index: int, tokenizer, *, process_index: int,
                   process_count: int, num_epochs: int | None = None) -> grain.IterDataset:
  """One component's packed rows for this process; forever unless `num_epochs` is given."""
  paths = shard_paths(config.prepared_dir, component)
  selected = select_documents(paths, component, skip_corrupt=config.skip_corrupt_records)
  if len(selected) < process_count:
    raise ConfigError(f"mixture component {component.name!r}",
                      f"only {len(selected)} documents have at least {component.min_length} tokens; "
                      f"need one per process ({process_count})")
  source = DocumentSource(paths, selected[process_index::process_count])
  example = MakeExample(tokenizer, component.fim_rate, component.fim_spm_rate, config.add_bos)
  shuffle_seed, example_seed = _seeds(config.seed, index)
  documents = (grain.MapDataset.source(source)
               .shuffle(seed=shuffle_seed)
               .repeat(num_epochs)
               .random_map(example, seed=example_seed))
  return PackIterDataset(documents.to_iter_dataset(), seq_len=config.seq_len, pad_id=tokenizer.pad_id,
                         component=index)


def build(config: DataConfig, mixture: Mixture, tokenizer, *, process_index: int = 0, process_count: int = 1,
          num_epochs: int | None = None) -> grain.IterDataset:
  """This process's batches: dicts of [global_batch_size / process_count, seq_len] arrays (see packing.py).

  Endless by default (training); with `num_epochs` the stream ends once a component has been read that
  many times (evaluation), and its last batch may hold fewer rows.
  """
  if config.global_batch_size % process_count:
    raise ConfigError("config.data.global_batch_size",
                      f"{config.global_batch_size} does not divide evenly over {process_count} processes")
  if any(c.fim_rate > 0 for c in mixture.components):
    tokenizer.require_fim()  # a tokenizer without the sentinels is an error before any data is read
  mixture = mixture.with_overrides(config.weights, config.min_length)
  active = [(i, c) for i, c in enumerate(mixture.components) if c.weight > 0]
  rows = [component_rows(config, c, i, tokenizer, process_index=process_index, process_count=process_count,
                         num_epochs=num_epochs)
          for i, c in active]
  mixed = grain.IterDataset.mix(rows, [c.weight for _, c in active]) if len(rows) > 1 else rows[0]
  return mixed.batch(config.global_batch_size // process_count, drop_remainder=num_epochs is None)


def _seeds(seed: int, component: int) -> tuple[int, int]:
  """Independent 32-bit seeds for a component's shuffle and its examples (FIM draws)."""
  shuffle_seed, example_seed = np.random.SeedSequence([seed, component]).generate_state(2)
  return int(shuffle_seed), int(example_seed)
