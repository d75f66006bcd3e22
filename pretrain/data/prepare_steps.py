"""The work of `pretrain prepare`'s two passes on one unit (`sources.Unit`), and the files a shard is made of,
shared by both engines: prepare.py's process pool and prepare_beam.py's pipelines run these same functions, so
both write the same bytes.

  pass 1 (select): scan_unit -> per document its drop reason, content hash and MinHash signature;
    make_selection -> the kept documents' places and the counts of the rest.
  pass 2 (write): shard_work -> the (unit, domain, positions, ordinals) tasks of the shards not yet finished;
    tokenize_unit -> tokens per wanted document; finish_shard -> the shard and its stats beside it.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from pretrain.atomic_file import atomic_file
from pretrain.data import dedup, filters, records, sources
from pretrain.data.config import Prepare
from pretrain.data.mixture import Component

DROP_REASONS = ("empty", *filters.RULES, "exact_duplicate", "near_duplicate", "tokenizer_not_byte_exact")
SKIP_REASONS = ("unknown_type_files", "binary_files", "undecodable_files", "corrupt_records", "corrupt_files")


class Tokenizer(Protocol):
  """What prepare needs of a tokenizer; it must pickle, since every worker process gets a copy."""

  def encode(self, text: str) -> np.ndarray: ...  # int32 ids, no special tokens added
  def normalize(self, text: str) -> str: ...  # the text the ids of encode(text) stand for
  def is_byte_exact(self, text: str, ids) -> bool: ...  # whether ids stand for exactly normalize(text)
  def describe(self) -> dict: ...


def scan_unit(unit: sources.Unit, domain: str, tokenizer: Tokenizer, config: Prepare) -> tuple[list[tuple], dict]:
  """Pass 1 on one unit: (language, drop reason or None, content hash, MinHash signature) per document, and
  the counts of what it skipped."""
  skipped = collections.Counter()
  docs = []
  for doc, reason in documents(unit, domain, config, skipped):
    digest = hashvalues = None
    if reason is None:
      text = tokenizer.normalize(doc.text)
      if not text.strip():
        reason = "empty"
      else:
        digest = dedup.content_hash(text) if config.dedup.exact else None
        hashvalues = dedup.signature(text, config.dedup) if config.dedup.near else None
    docs.append((doc.language, reason, digest, hashvalues))
  return docs, dict(skipped)


def documents(unit: sources.Unit, domain: str, config: Prepare, skipped: collections.Counter, *,
              filter_all: bool = True) -> Iterator[tuple[sources.RawDocument, str | None]]:
  """A unit's documents in order, each with the reason a filter drops it (or None); both passes see the same.

  In a unit that groups repositories, files are filtered one by one: each dropped one is a document of its
  own, dropped, at its place; the others become their repository's document, at its first kept file's place.
  Pass 2 knows its documents' places: `filter_all=False` filters only where grouping needs it.
  """
  read = sources.read_unit(unit, skipped, skip_corrupt=config.skip_corrupt_records,
                           fallback_encoding=config.fallback_encoding)
  if not unit.grouped:
    for doc in read:
      yield doc, _filtered(doc, domain, config) if filter_all else None
    return
  order, repositories = [], {}  # documents with their reasons, and names of repositories in their places
  for doc in read:
    reason = _filtered(doc, domain, config)
    if doc.repository is None or reason:
      order.append((doc, reason))
      continue
    if doc.repository not in repositories:
      repositories[doc.repository] = []
      order.append(doc.repository)
    repositories[doc.repository].append(doc)
  for item in order:
    yield (sources.repository_document(unit, repositories[item]), None) if isinstance(item, str) else item


def _filtered(doc: sources.RawDocument, domain: str, config: Prepare) -> str | None:
  if not doc.text.strip():
    return "empty"
  return filters.check(doc.text, doc.language, config.filters) if domain == "code" else None


def tokenize_unit(unit: sources.Unit, domain: str, positions: list[int], ordinals: list[int], tokenizer: Tokenizer,
                  config: Prepare) -> list[tuple]:
  """Pass 2 on one unit: (ordinal, language, source, tokens or None, drop reason or None) per wanted document
  (`positions` ascending, each with its place among the component's kept documents in `ordinals`)."""
  wanted = dict(zip(positions, ordinals))
  out = []
  for position, (doc, _) in enumerate(documents(unit, domain, config, collections.Counter(), filter_all=False)):
    if position in wanted:
      tokens = np.asarray(tokenizer.encode(tokenizer.normalize(doc.text)), np.int32)
      reason = ("empty" if not tokens.size else
                None if tokenizer.is_byte_exact(doc.text, tokens) else "tokenizer_not_byte_exact")
      out.append((wanted[position], doc.language, doc.source, None if reason else tokens, reason))
    if position >= positions[-1]:
      break
  if len(out) != len(positions):
    raise RuntimeError(f"{unit.path} holds fewer documents than when it was selected; was it changed?")
  return out


def make_selection(by_language: dict[str, dict], skipped: dict, kept_keys: list[int], config: Prepare) -> dict:
  """A component's selection from its counts and its kept documents' keys (dedup.doc_key), of either engine."""
  stats = {"skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS},
           # Counts in one order, whichever order an engine met them in: saved selections of both read the same.
           "by_language": {language: {what: counts[what] for what in ("documents_read", *DROP_REASONS)
                                      if what in counts} for language, counts in sorted(by_language.items())}}
  if config.fallback_encoding:  # (without one, the selection saved is what it was before the setting existed)
    stats["fallback_decoded_files"] = skipped.get("fallback_decoded_files", 0)
  places = [dedup.unit_and_position(key) for key in sorted(kept_keys)]
  return {"stats": stats, "unit": np.asarray([u for u, _ in places], np.int64).reshape(-1),
          "position": np.asarray([p for _, p in places], np.int64).reshape(-1)}


def log_selection(component: Component, selection: dict, config: Prepare, log) -> None:
  stats = selection["stats"]
  notes = file_notes(stats["skipped"], stats.get("fallback_decoded_files", 0), config.fallback_encoding)
  read = sum(c["documents_read"] for c in stats["by_language"].values())
  log(f"{component.name}: kept {len(selection['unit'])} of {read} documents" + (f" ({notes})" if notes else ""))


_SKIPPED_WORDS = {"binary_files": ("binary file", ""), "undecodable_files": ("file", " not UTF-8"),
                  "unknown_type_files": ("file", " of unknown type"), "corrupt_records": ("corrupt record", ""),
                  "corrupt_files": ("corrupt file", "")}


def plural(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def file_notes(skipped: dict, fallback_decoded: int = 0, fallback_encoding: str | None = None) -> str:
  """What a component's files came to besides documents, in words: 'skipped 2 binary files, 1 file not UTF-8;
  decoded as cp1252: 3 files'. Empty when every file was read as UTF-8."""
  skips = []
  for reason in ("binary_files", "undecodable_files", "unknown_type_files", "corrupt_files", "corrupt_records"):
    if skipped.get(reason):
      noun, rest = _SKIPPED_WORDS[reason]
      if reason == "undecodable_files" and fallback_encoding:
        rest += f" nor {fallback_encoding} text"
      skips.append(plural(skipped[reason], noun) + rest)
  notes = [f"skipped {', '.join(skips)}"] if skips else []
  if fallback_decoded:
    notes.append(f"decoded as {fallback_encoding}: {plural(fallback_decoded, 'file')}")
  return "; ".join(notes)


def stats_path(shard: pathlib.Path) -> pathlib.Path:
  return shard.with_name(shard.name.removesuffix(records.SHARD_SUFFIX) + ".stats.json")


def shard_work(directory: pathlib.Path, component: Component, selection: dict, units: list[sources.Unit],
               config: Prepare) -> tuple[list[pathlib.Path], dict[int, dict], list[tuple]]:
  """(every shard's path, the stats of those finished before, (unit, domain, positions, ordinals) tasks for the
  rest).

  Shard i holds kept documents [i * docs_per_shard, (i + 1) * docs_per_shard) in key order, whichever engine
  writes it."""
  kept = len(selection["unit"])
  per_shard = config.docs_per_shard
  count = math.ceil(kept / per_shard)
  paths = [directory / records.shard_name(i, count) for i in range(count)]
  stats = {i: json.loads(stats_path(p).read_text()) for i, p in enumerate(paths)
           if p.exists() and stats_path(p).exists()}
  todo = [i for i in range(count) if i not in stats]
  ordinals = np.concatenate([np.arange(i * per_shard, min(kept, (i + 1) * per_shard)) for i in todo] or [[]])
  ordinals = ordinals.astype(np.int64)
  unit_of, position_of = selection["unit"][ordinals], selection["position"][ordinals]
  starts = [0, *np.flatnonzero(np.diff(unit_of) != 0) + 1]
  ends = [*starts[1:], len(ordinals)]
  tasks = [(units[unit_of[s]], component.domain, position_of[s:e].tolist(), ordinals[s:e].tolist())
           for s, e in zip(starts, ends) if e > s]
  return paths, stats, tasks


def read_shard_stats(path: pathlib.Path) -> dict:
  return json.loads(stats_path(path).read_text())


def finish_shard(path: pathlib.Path, component: Component, entries: list) -> dict:
  """Writes a shard of (language, source, tokens, drop reason) entries in ordinal order, then its stats; together
  they mark it finished."""
  by_language = collections.defaultdict(collections.Counter)
  dropped = collections.Counter()
  docs, first_not_exact = [], None
  for language, source, tokens, reason in entries:
    counts = by_language[language]
    if reason:
      counts[reason] += 1
      dropped[reason] += 1
      first_not_exact = first_not_exact or (source if reason == "tokenizer_not_byte_exact" else None)
    else:
      counts["documents_written"] += 1
      counts["tokens_written"] += int(tokens.size)
      docs.append(records.Document(tokens=tokens, domain=component.domain, language=language, source=source))
  records.write_shard(path, docs)
  stats = {"documents_written": len(docs), "tokens_written": sum(int(d.tokens.size) for d in docs),
           "dropped": dict(dropped), "first_not_byte_exact": first_not_exact,
           "by_language": {language: dict(counts) for language, counts in sorted(by_language.items())}}
  write_json(stats_path(path), stats)
  return stats


def write_json(path: pathlib.Path, value: Any) -> None:
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
