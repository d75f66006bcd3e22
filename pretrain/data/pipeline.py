"""The training input pipeline, on Grain: prepared shards -> mixture of packed rows -> batches.

Per mixture component:
  documents (ArrayRecord shards of `pretrain prepare`, at least `min_length` tokens)
  -> one stream's slice (every `streams`-th document from the stream's index)
  -> global shuffle, reshuffled every epoch, repeated forever
  -> BOS + document (fill-in-the-middle on `fim_rate` of them) + EOS
  -> packed into rows of `seq_len` (packing.py)
Then the components' rows are interleaved by weight (Grain's deterministic mix: the
token proportions equal the weights, since every row holds `seq_len` tokens) and batched
into the stream's share of the global batch. A process reads its own streams (by default
one; `DataConfig.streams` fixes their number so the global batch is the same whatever the
process count) and concatenates their rows. Everything random is seeded from
`DataConfig.seed`, so the data is a pure function of the config, and the iterator's
state (`get_state` / `set_state`) restores it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import grain
import numpy as np

from pretrain import storage
from pretrain.data import fim, records
from pretrain.data.config import DataConfig
from pretrain.data.mixture import Component, Mixture
from pretrain.data.packing import PackIterDataset
from pretrain.schema import ConfigError


def shard_paths(prepared_dir, component: Component) -> list[pathlib.Path]:
  """A component's shards; those of a bucket's prepared directory in its local copy (`workspace.ensure_prepared`)."""
  local = storage.cache_path(prepared_dir) if storage.is_url(prepared_dir) else pathlib.Path(prepared_dir)
  directory = local / component.name
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


def component_rows(config: DataConfig, component: Component, index: int, tokenizer, *, stream: int,
                   streams: int, num_epochs: int | None = None) -> grain.IterDataset:
  """One component's packed rows for one input stream; forever unless `num_epochs` is given."""
  paths = shard_paths(config.prepared_dir, component)
  selected = select_documents(paths, component, skip_corrupt=config.skip_corrupt_records)
  if len(selected) < streams:
    raise ConfigError(f"mixture component {component.name!r}",
                      f"only {len(selected)} documents have at least {component.min_length} tokens; "
                      f"need one per input stream ({streams})")
  source = DocumentSource(paths, selected[stream::streams])
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
  streams = config.streams or process_count
  if streams % process_count:
    raise ConfigError("config.data.streams", f"{streams} streams do not split over {process_count} processes")
  if config.global_batch_size % streams:
    raise ConfigError("config.data.global_batch_size",
                      f"{config.global_batch_size} does not divide evenly over {streams} input streams")
  if any(c.fim_rate > 0 for c in mixture.components):
    tokenizer.require_fim()  # a tokenizer without the sentinels is an error before any data is read
  mixture = mixture.with_overrides(config.weights, config.min_length)
  per_process = streams // process_count
  batches = [_stream_batches(config, mixture, tokenizer, stream, streams, num_epochs)
             for stream in range(process_index * per_process, (process_index + 1) * per_process)]
  if len(batches) == 1:
    return batches[0]
  # Rows of this process's streams side by side, in stream order: the global batch's row blocks.
  return grain.experimental.ZipIterDataset(batches, strict=num_epochs is None).map(_concatenate_rows)


def _stream_batches(config: DataConfig, mixture: Mixture, tokenizer, stream: int, streams: int,
                    num_epochs: int | None) -> grain.IterDataset:
  """One stream's batches of global_batch_size / streams rows: its components' rows mixed by weight."""
  active = [(i, c) for i, c in enumerate(mixture.components) if c.weight > 0]
  rows = [component_rows(config, c, i, tokenizer, stream=stream, streams=streams,
                         num_epochs=num_epochs)
          for i, c in active]
  mixed = grain.IterDataset.mix(rows, [c.weight for _, c in active]) if len(rows) > 1 else rows[0]
  return mixed.batch(config.global_batch_size // streams, drop_remainder=num_epochs is None)


def _concatenate_rows(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
  return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def _seeds(seed: int, component: int) -> tuple[int, int]:
  """Independent 32-bit seeds for a component's shuffle and its examples (FIM draws)."""
  shuffle_seed, example_seed = np.random.SeedSequence([seed, component]).generate_state(2)
  return int(shuffle_seed), int(example_seed)
