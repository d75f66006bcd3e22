"""`pretrain prepare`: a mixture's raw inputs -> filtered, deduplicated, tokenized shards.

Per component, two passes over its input files (`sources.Unit`s) on a process pool:
  1. select: read -> drop empty documents -> the paper's code filters (code domain only)
     -> content hash and MinHash signature of `tokenizer.normalize(text)` (workers)
     -> exact and near dedup in input order (parent). The kept documents' places are
     saved in `<component>/selection.npz`.
  2. write: re-read the kept documents -> tokenize the normalized text -> drop those whose
     tokens do not stand for it byte for byte (workers) -> shards of `docs_per_shard` kept
     documents, each with its stats beside it (parent).
`manifest.json` then sums it all up. Dedup is within a component, never across.

Resuming: `plan.json`, written first, fingerprints the inputs (paths, sizes, mtimes), the
tokenizer, the components and the config. A rerun with the same fingerprint reuses the saved
selections and every finished shard (a shard and its `.stats.json` both present; each is
written under a temporary name and renamed); another fingerprint is refused unless
`overwrite_mismatch`. Shard i always holds kept documents [i * docs_per_shard, (i + 1) *
docs_per_shard), so a rerun writes exactly the shards an interrupted run lacked.

Workers start from a fork server (spawn where there is none), as in Python 3.14: a script
that calls `prepare` with more than one worker needs the usual `if __name__ == "__main__":`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from pretrain import schema
from pretrain.atomic_file import atomic_file
from pretrain.data import dedup, filters, records, sources
from pretrain.data.config import Prepare
from pretrain.data.mixture import Component, Mixture
from pretrain.schema import ConfigError

PLAN, MANIFEST, SELECTION = "plan.json", "manifest.json", "selection.npz"
FORMAT = 1
MAX_NOT_BYTE_EXACT = 0.01  # above this fraction of a component's kept documents, the tokenizer is lossy
DROP_REASONS = ("empty", *filters.RULES, "exact_duplicate", "near_duplicate", "tokenizer_not_byte_exact")
SKIP_REASONS = ("unknown_type_files", "binary_files", "undecodable_files", "corrupt_records", "corrupt_files")


class Tokenizer(Protocol):
  """What prepare needs of a tokenizer; it must pickle, since every worker process gets a copy."""

  def encode(self, text: str) -> np.ndarray: ...  # int32 ids, no special tokens added
  def normalize(self, text: str) -> str: ...  # the text the ids of encode(text) stand for
  def is_byte_exact(self, text: str, ids) -> bool: ...  # whether ids stand for exactly normalize(text)
  def describe(self) -> dict: ...


def prepare(mixture: Mixture, out_dir, tokenizer: Tokenizer, *, config: Prepare, tokenizer_path: str,
            overwrite_mismatch: bool = False, log: Callable[[str], None] | None = None) -> dict:
  """Prepares every component of `mixture` into `out_dir`; returns the manifest (also in manifest.json)."""
  log = log or (lambda message: None)
  out = pathlib.Path(out_dir)
  units, skipped_files = {}, {}
  for i, component in enumerate(mixture.components):
    if component.name in (".", ".."):
      raise ConfigError(f"mixture {mixture.name}.components[{i}].name", "'.' and '..' cannot name a directory")
    units[component.name], skipped_files[component.name] = sources.plan_units(mixture, i)
  plan = _plan(mixture, units, tokenizer, tokenizer_path, config)
  _claim(out, plan, mixture, overwrite_mismatch)
  workers = config.workers or os.cpu_count() or 1
  components = {}
  with _pool(workers, tokenizer, config) as pool:
    for component in mixture.components:
      directory = out / component.name
      selection = _select(directory, component, units[component.name], skipped_files[component.name], pool,
                          workers, config, log)
      shards = _write_shards(directory, component, units[component.name], selection, pool, workers, config, log)
      components[component.name] = _component_manifest(component, mixture, selection["stats"], shards)
  manifest = _manifest(mixture, plan, config, components)
  _write_json(out / MANIFEST, manifest)
  log(f"wrote {out / MANIFEST}: {manifest['documents_written']} documents, {manifest['tokens_written']} tokens")
  return manifest


# Worker processes: each gets a pickled copy of the tokenizer and the config.
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, config: Prepare) -> None:
  _WORKER.update(tokenizer=tokenizer, config=config)


def _scan(task: tuple[sources.Unit, str]) -> tuple[list[tuple], dict]:
  """Pass 1 on one unit: (language, drop reason or None, content hash, MinHash signature) per document."""
  unit, domain = task
  tokenizer, config = _WORKER["tokenizer"], _WORKER["config"]
  skipped = collections.Counter()
  docs = []
  for doc in sources.read_unit(unit, skipped, skip_corrupt=config.skip_corrupt_records):
    reason = digest = hashvalues = None
    if not doc.text.strip():
      reason = "empty"
    elif domain == "code":
      reason = filters.check(doc.text, doc.language, config.filters)
    if reason is None:
      text = tokenizer.normalize(doc.text)
      if not text.strip():
        reason = "empty"
      else:
        digest = dedup.content_hash(text) if config.dedup.exact else None
        hashvalues = dedup.signature(text, config.dedup) if config.dedup.near else None
    docs.append((doc.language, reason, digest, hashvalues))
  return docs, dict(skipped)


def _tokenize(task: tuple[sources.Unit, list[int], list[int]]) -> list[tuple]:
  """Pass 2 on one unit: (ordinal, language, source, tokens or None, drop reason or None) per wanted document."""
  unit, positions, ordinals = task
  tokenizer, config = _WORKER["tokenizer"], _WORKER["config"]
  wanted = dict(zip(positions, ordinals))
  out = []
  for position, doc in enumerate(sources.read_unit(unit, collections.Counter(),
                                                   skip_corrupt=config.skip_corrupt_records)):
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


class _InlinePool:
  """Pool.imap in this process: one worker needs no pool, and errors keep their tracebacks."""

  def imap(self, fn, iterable, chunksize=1):
    return map(fn, iterable)


@contextlib.contextmanager
def _pool(workers: int, tokenizer: Tokenizer, config: Prepare):
  if workers == 1:
    _init_worker(tokenizer, config)
    yield _InlinePool()
    return
  # Not plain fork: the caller may hold threads (JAX's), whose locks a forked child would inherit held.
  # A fork server is a fresh process that has imported this module once; workers fork from it cheaply.
  if "forkserver" in multiprocessing.get_all_start_methods():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
  else:
    context = multiprocessing.get_context("spawn")
  with context.Pool(workers, _init_worker, (tokenizer, config)) as pool:
    yield pool


def _chunksize(tasks: int, workers: int) -> int:
  return max(1, min(32, tasks // (workers * 8)))


# Pass 1: selection.
def _select(directory: pathlib.Path, component: Component, units: list[sources.Unit],
            skipped_files: collections.Counter, pool, workers: int, config: Prepare, log) -> dict:
  path = directory / SELECTION
  if path.exists():
    with np.load(path) as saved:
      return {"stats": json.loads(str(saved["stats"])), "unit": saved["unit"], "position": saved["position"]}
  log(f"{component.name}: reading, filtering and deduplicating {len(units)} files")
  deduplicator = dedup.Deduplicator(config.dedup)
  by_language: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  skipped = collections.Counter(skipped_files)
  kept_unit, kept_position = [], []
  tasks = ((unit, component.domain) for unit in units)
  for u, (docs, unit_skipped) in enumerate(pool.imap(_scan, tasks, _chunksize(len(units), workers))):
    skipped.update(unit_skipped)
    for position, (language, reason, digest, hashvalues) in enumerate(docs):
      counts = by_language[language]
      counts["documents_read"] += 1
      reason = reason or deduplicator.offer(digest, hashvalues)
      if reason:
        counts[reason] += 1
      else:
        kept_unit.append(u)
        kept_position.append(position)
  stats = {"skipped": {r: skipped[r] for r in SKIP_REASONS},
           "by_language": {language: dict(counts) for language, counts in sorted(by_language.items())}}
  selection = {"stats": stats, "unit": np.asarray(kept_unit, np.int64), "position": np.asarray(kept_position, np.int64)}
  with atomic_file(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, stats=np.asarray(json.dumps(stats)), unit=selection["unit"], position=selection["position"])
  log(f"{component.name}: kept {len(kept_unit)} of {sum(c['documents_read'] for c in by_language.values())} documents")
  return selection


# Pass 2: tokenized shards.
def _stats_path(shard: pathlib.Path) -> pathlib.Path:
  return shard.with_name(shard.name.removesuffix(records.SHARD_SUFFIX) + ".stats.json")


def _write_shards(directory: pathlib.Path, component: Component, units: list[sources.Unit], selection: dict,
                  pool, workers: int, config: Prepare, log) -> list[dict]:
  kept = len(selection["unit"])
  per_shard = config.docs_per_shard
  count = math.ceil(kept / per_shard)
  paths = [directory / records.shard_name(i, count) for i in range(count)]
  stats = {i: json.loads(_stats_path(p).read_text()) for i, p in enumerate(paths)
           if p.exists() and _stats_path(p).exists()}
  todo = [i for i in range(count) if i not in stats]
  if todo:
    log(f"{component.name}: tokenizing {len(todo)} of {count} shards")
  ordinals = np.concatenate([np.arange(i * per_shard, min(kept, (i + 1) * per_shard)) for i in todo] or [[]])
  ordinals = ordinals.astype(np.int64)
  unit_of, position_of = selection["unit"][ordinals], selection["position"][ordinals]
  starts = [0, *np.flatnonzero(np.diff(unit_of) != 0) + 1]
  ends = [*starts[1:], len(ordinals)]
  tasks = [(units[unit_of[s]], position_of[s:e].tolist(), ordinals[s:e].tolist()) for s, e in zip(starts, ends)
           if e > s]
  building: dict[int, list] = {}
  for results in pool.imap(_tokenize, tasks, _chunksize(len(tasks), workers)):
    for ordinal, language, source, tokens, reason in results:
      i = ordinal // per_shard
      building.setdefault(i, []).append((language, source, tokens, reason))
      if ordinal == min(kept, (i + 1) * per_shard) - 1:
        stats[i] = _finish_shard(paths[i], component, building.pop(i))
        log(f"{component.name}: wrote {paths[i].name} ({stats[i]['documents_written']} documents)")
  shards = [{"path": f"{component.name}/{p.name}", **stats[i]} for i, p in enumerate(paths)]
  not_exact = sum(s["dropped"].get("tokenizer_not_byte_exact", 0) for s in shards)
  if not_exact > MAX_NOT_BYTE_EXACT * kept:
    example = next(s["first_not_byte_exact"] for s in shards if s["first_not_byte_exact"])
    raise ConfigError("tokenizer", f"{not_exact} of {kept} documents of component {component.name!r} "
                      f"({not_exact / kept:.1%}) do not tokenize byte-exactly, e.g. {example}: the tokenizer is "
                      "not lossless; use one with byte fallback (or byte-level BPE) and no lossy normalization")
  return shards


def _finish_shard(path: pathlib.Path, component: Component, entries: list) -> dict:
  """Writes a shard, then its stats; together they mark it finished."""
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
  _write_json(_stats_path(path), stats)
  return stats


# The plan: what this directory is being prepared from.
def _plan(mixture: Mixture, units: dict[str, list[sources.Unit]], tokenizer: Tokenizer, tokenizer_path: str,
          config: Prepare) -> dict:
  inputs = {name: [[u.path, *_size_and_mtime(u.path)] for u in component_units]
            for name, component_units in units.items()}
  parts = {
      "inputs": inputs,
      "tokenizer": {**tokenizer.describe(), "path": str(tokenizer_path), "sha256": _file_digest(tokenizer_path)},
      "components": {c.name: {"domain": c.domain, "language": c.language, "text_field": c.text_field}
                     for c in mixture.components},
      "config": {k: v for k, v in schema.to_dict(config).items() if k != "workers"},  # workers: same output
  }
  # The tokenizer is known by its contents: the same file elsewhere makes the same tokens.
  fingerprinted = {**parts, "tokenizer": {k: v for k, v in parts["tokenizer"].items() if k != "path"}}
  fingerprint = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
                 for k, v in fingerprinted.items()}
  return {"format": FORMAT, "mixture": mixture.name, "fingerprint": fingerprint,
          **{k: parts[k] for k in ("tokenizer", "components", "config")}}


def _size_and_mtime(path: str) -> tuple[int, int]:
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def _file_digest(path) -> str | None:
  path = pathlib.Path(path)
  files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
  digest = hashlib.sha256()
  for file in files:
    digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
  return digest.hexdigest() if files else None


def _prepared_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """What prepare writes in a component's directory; nothing else there is ever deleted."""
  patterns = (f"shard-*{records.SHARD_SUFFIX}", f"shard-*{records.SHARD_SUFFIX}.lengths.npy", "shard-*.stats.json",
              SELECTION, ".*.tmp-*")
  return [p for pattern in patterns for p in directory.glob(pattern)] if directory.is_dir() else []


def _claim(out: pathlib.Path, plan: dict, mixture: Mixture, overwrite: bool) -> None:
  """Makes `out` this plan's directory: refuses (or with `overwrite`, clears) one prepared otherwise."""
  out.mkdir(parents=True, exist_ok=True)
  old = json.loads((out / PLAN).read_text()) if (out / PLAN).exists() else None
  names = set(mixture.names) | set((old or {}).get("components", {}))
  if old is not None and old.get("fingerprint") != plan["fingerprint"]:
    differs = [k for k in plan["fingerprint"] if old.get("fingerprint", {}).get(k) != plan["fingerprint"][k]]
    problem = f"{out} was prepared from different {', '.join(differs)} (see {out / PLAN})"
  elif old is None and ((out / MANIFEST).exists() or any(_prepared_files(out / n) for n in names)):
    problem = f"{out} holds prepared data without a {PLAN}"
  else:
    problem = None
  if problem and not overwrite:
    raise FileExistsError(f"{problem}; refusing to mix them. Prepare into another directory, or overwrite "
                          "it (overwrite_mismatch) to delete its prepared components and start over")
  if problem:
    for path in [out / MANIFEST, *(p for n in names for p in _prepared_files(out / n))]:
      path.unlink(missing_ok=True)
  if problem or old is None:
    _write_json(out / PLAN, plan)
  for directory in [out, *(out / name for name in mixture.names)]:
    directory.mkdir(exist_ok=True)
    for leftover in directory.glob(".*.tmp-*"):  # of an interrupted run; never a finished file
      leftover.unlink()


# The manifest.
def _sum_into(total: dict, part: dict) -> None:
  for key, value in part.items():
    if isinstance(value, dict):
      _sum_into(total.setdefault(key, {}), value)
    elif isinstance(value, int):
      total[key] = total.get(key, 0) + value


def _counts(flat: dict) -> dict:
  """Flat per-reason counts -> the manifest's nested form, every drop reason listed."""
  return {"documents_read": flat.get("documents_read", 0),
          "dropped": {r: flat.get(r, 0) for r in DROP_REASONS},
          "documents_written": flat.get("documents_written", 0),
          "tokens_written": flat.get("tokens_written", 0)}


def _component_manifest(component: Component, mixture: Mixture, selection_stats: dict, shards: list[dict]) -> dict:
  flat: dict[str, dict] = {}
  _sum_into(flat, selection_stats["by_language"])
  for shard in shards:
    _sum_into(flat, shard["by_language"])
  by_language = {language: _counts(counts) for language, counts in sorted(flat.items())}
  total = _counts({})
  for counts in by_language.values():
    _sum_into(total, counts)
  return {"domain": component.domain, "inputs": [str(p) for p in mixture.input_paths(component)],
          **total, "skipped": selection_stats["skipped"], "by_language": by_language,
          "shards": [{"path": s["path"], "documents": s["documents_written"], "tokens": s["tokens_written"]}
                     for s in shards]}


def _manifest(mixture: Mixture, plan: dict, config: Prepare, components: dict[str, dict]) -> dict:
  by_domain: dict[str, dict] = {}
  by_language: dict[str, dict] = {}
  keys = ("documents_read", "documents_written", "tokens_written")
  for component in components.values():
    _sum_into(by_domain.setdefault(component["domain"], {}), {k: component[k] for k in keys})
    for language, counts in component["by_language"].items():
      _sum_into(by_language.setdefault(language, {}), {k: counts[k] for k in keys})
  totals = {k: sum(c[k] for c in components.values()) for k in keys}
  return {"format": FORMAT, "mixture": mixture.name, "tokenizer": plan["tokenizer"],
          "config": schema.to_dict(config), **totals, "by_domain": by_domain,
          "by_language": dict(sorted(by_language.items())), "components": components}


def _write_json(path: pathlib.Path, value: Any) -> None:
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
