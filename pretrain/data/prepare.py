"""`pretrain prepare`: a mixture's raw inputs -> filtered, deduplicated, tokenized shards.

Per component, two passes over its input files (`sources.Unit`s) on a process pool:
  1. select: read -> drop empty documents -> the paper's code filters (code domain only)
     -> content hash and MinHash signature of `tokenizer.normalize(text)` (workers)
     -> exact and near dedup, each a group's smallest document key kept (parent; the rule is in
     dedup.py's docstring). The kept documents' places are saved in `<component>/selection.npz`.
  2. write: re-read the kept documents -> tokenize the normalized text -> drop those whose
     tokens do not stand for it byte for byte (workers) -> shards of `docs_per_shard` kept
     documents, each with its stats beside it (parent).
`manifest.json` then sums it all up. Dedup is within a component, never across.

Pass 1 runs for every component before anything is written: a component left with no document
(no files, only binary or undecodable ones, every document filtered or a duplicate) is a
ConfigError naming it and the counts of why, and leaves no `plan.json`, no component
directory and no manifest behind.

Resuming: `plan.json`, written before any shard, fingerprints the inputs (paths, sizes, mtimes), the
tokenizer, the components and the config. A rerun with the same fingerprint reuses the saved
selections and every finished shard (a shard and its `.stats.json` both present; each is
written under a temporary name and renamed); another fingerprint is refused unless
`overwrite_mismatch`. Shard i always holds kept documents [i * docs_per_shard, (i + 1) *
docs_per_shard), so a rerun writes exactly the shards an interrupted run lacked.

With `config.engine = "beam"` the same two passes run as Apache Beam pipelines (prepare_beam.py),
from the same functions (prepare_steps.py), to the same files.

Workers start from a fork server (spawn where there is none), as in Python 3.14: a script
that calls `prepare` with more than one worker needs the usual `if __name__ == "__main__":`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

from pretrain import schema, storage
from pretrain.atomic_file import atomic_file
from pretrain.data import dedup, records, sources
from pretrain.data.config import Prepare
from pretrain.data.mixture import Component, Mixture
from pretrain.data.prepare_steps import (DROP_REASONS, Tokenizer, file_notes, finish_shard, log_selection,
                                     make_selection, plural, scan_unit, shard_work, tokenize_unit, write_json)
from pretrain.schema import ConfigError

PLAN, MANIFEST, SELECTION = "plan.json", "manifest.json", "selection.npz"
FORMAT = 1
MAX_NOT_BYTE_EXACT = 0.01  # above this fraction of a component's kept documents, the tokenizer is lossy
_LATER_SETTINGS = ("fallback_encoding",)  # Prepare fields left out of plan and manifest while None (_config_dict)
_HOW_SETTINGS = ("engine", "beam_options")  # how it runs, not what it makes: never in plan or manifest


def prepare(mixture: Mixture, out_dir, tokenizer: Tokenizer, *, config: Prepare, tokenizer_path: str,
            overwrite_mismatch: bool = False, log: Callable[[str], None] | None = None,
            out_key: str = "config.data.prepared_dir") -> dict:
  """Prepares every component of `mixture` into `out_dir` (a local directory or a gs:// / s3:// URL; `out_key`
  names it in errors); returns the manifest (also in manifest.json)."""
  log = log or (lambda message: None)
  config.validate("prepare")
  storage.check_bucket(out_dir, out_key)  # before any input is read
  out = storage.as_path(out_dir)
  units, skipped_files = {}, {}
  for i, component in enumerate(mixture.components):
    if component.name in (".", ".."):
      raise ConfigError(f"mixture {mixture.name}.components[{i}].name", "'.' and '..' cannot name a directory")
    units[component.name], skipped_files[component.name] = sources.plan_units(mixture, i)
  plan = _plan(mixture, units, tokenizer, tokenizer_path, config)
  old, problem = _check_claim(out, plan, mixture, overwrite_mismatch)
  reuse = old is not None and problem is None  # saved selections are this plan's
  components = {}
  with _engine(tokenizer, config) as engine:
    selections = {c.name: _load_selection(out / c.name / SELECTION) if reuse else None for c in mixture.components}
    selections.update(engine.select([c for c in mixture.components if selections[c.name] is None], units,
                                    skipped_files, log))
    _check_documents(mixture, units, selections, config)  # before anything is written
    _claim(out, plan, mixture, old, problem)
    for component in mixture.components:
      if not (out / component.name / SELECTION).exists():
        _save_selection(out / component.name / SELECTION, selections[component.name])
    all_shards = engine.write_shards(out, mixture.components, units, selections, log)
    for component in mixture.components:
      shards = all_shards[component.name]
      _check_byte_exact(component, shards, len(selections[component.name]["unit"]))
      components[component.name] = _component_manifest(component, mixture, selections[component.name]["stats"],
                                                        shards, config)
  manifest = _manifest(mixture, plan, config, components)
  write_json(out / MANIFEST, manifest)
  log(f"wrote {out / MANIFEST}: {manifest['documents_written']} documents, {manifest['tokens_written']} tokens")
  return manifest


# Worker processes: each gets a pickled copy of the tokenizer and the config.
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, config: Prepare) -> None:
  _WORKER.update(tokenizer=tokenizer, config=config)


def _scan(task: tuple[sources.Unit, str]) -> tuple[list[tuple], dict]:
  unit, domain = task
  return scan_unit(unit, domain, _WORKER["tokenizer"], _WORKER["config"])


def _tokenize(task: tuple[sources.Unit, str, list[int], list[int]]) -> list[tuple]:
  return tokenize_unit(*task, _WORKER["tokenizer"], _WORKER["config"])


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


@contextlib.contextmanager
def _engine(tokenizer: Tokenizer, config: Prepare):
  if config.engine == "beam":
    try:
      from pretrain.data import prepare_beam  # Beam is an optional dependency
    except ImportError as e:
      raise ConfigError("config.data.prepare.engine", f"'beam' needs Apache Beam ({e}): pip install "
                        "'pretrain[beam]' (Dataflow: 'pretrain[dataflow]')") from None
    yield prepare_beam.BeamEngine(tokenizer, config)
    return
  workers = config.workers or os.cpu_count() or 1
  with _pool(workers, tokenizer, config) as pool:
    yield _LocalEngine(pool, workers, config)


class _LocalEngine:
  """Both passes on this host's process pool, one component after the other."""

  def __init__(self, pool, workers: int, config: Prepare):
    self.pool, self.workers, self.config = pool, workers, config

  def select(self, components: list[Component], units: dict[str, list[sources.Unit]],
             skipped_files: dict[str, collections.Counter], log) -> dict[str, dict]:
    return {c.name: _select(c, units[c.name], skipped_files[c.name], self.pool, self.workers, self.config, log)
            for c in components}

  def write_shards(self, out: epath.Path, components: list[Component], units: dict[str, list[sources.Unit]],
                   selections: dict[str, dict], log) -> dict[str, list[dict]]:
    return {c.name: _write_shards(out / c.name, c, units[c.name], selections[c.name], self.pool, self.workers,
                                  self.config, log) for c in components}


# Pass 1: selection.
def _select(component: Component, units: list[sources.Unit], skipped_files: collections.Counter, pool,
            workers: int, config: Prepare, log) -> dict:
  """The kept documents' places and the counts of the rest."""
  log(f"{component.name}: reading, filtering and deduplicating {len(units)} files")
  by_language: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  skipped = collections.Counter(skipped_files)
  candidates, candidate_languages = [], []  # documents no filter dropped, for dedup
  tasks = ((unit, component.domain) for unit in units)
  for u, (docs, unit_skipped) in enumerate(pool.imap(_scan, tasks, _chunksize(len(units), workers))):
    skipped.update(unit_skipped)
    for position, (language, reason, digest, hashvalues) in enumerate(docs):
      by_language[language]["documents_read"] += 1
      if reason:
        by_language[language][reason] += 1
      else:
        candidates.append((dedup.doc_key(u, position), digest, hashvalues))
        candidate_languages.append(language)
  dropped = dedup.duplicates(candidates, config.dedup)
  kept = []
  for (key, _, _), language in zip(candidates, candidate_languages):
    if key in dropped:
      by_language[language][dropped[key]] += 1
    else:
      kept.append(key)
  selection = make_selection(by_language, skipped, kept, config)
  log_selection(component, selection, config, log)
  return selection


def _load_selection(path: epath.Path) -> dict | None:
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes())) as saved:
    return {"stats": json.loads(str(saved["stats"])), "unit": saved["unit"], "position": saved["position"]}


def _save_selection(path: epath.Path, selection: dict) -> None:
  with atomic_file(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, stats=np.asarray(json.dumps(selection["stats"])), unit=selection["unit"],
             position=selection["position"])


def _check_documents(mixture: Mixture, units: dict[str, list[sources.Unit]], selections: dict[str, dict],
                     config: Prepare) -> None:
  """Refuses a mixture with a component that keeps no document: preparing nothing is a mistake in the inputs."""
  empty = [i for i, c in enumerate(mixture.components) if not len(selections[c.name]["unit"])]
  if not empty:
    return
  i = empty[0]
  component = mixture.components[i]
  stats = selections[component.name]["stats"]
  skipped = stats["skipped"]
  read = sum(c.get("documents_read", 0) for c in stats["by_language"].values())
  dropped = collections.Counter()
  for counts in stats["by_language"].values():
    dropped.update({r: n for r, n in counts.items() if r != "documents_read"})
  files = len(units[component.name]) + skipped.get("unknown_type_files", 0)
  why = [f"{plural(files, 'file')} found, {plural(read, 'document')} read"]
  notes = file_notes(skipped, stats.get("fallback_decoded_files", 0), config.fallback_encoding)
  why += [notes] if notes else []
  if dropped:
    why.append("dropped " + ", ".join(f"{dropped[r]} {r}" for r in DROP_REASONS if dropped[r]))
  if skipped.get("undecodable_files") and not config.fallback_encoding:
    why.append("set config.data.prepare.fallback_encoding (or --fallback-encoding), e.g. cp1252, to decode files "
               "that are not UTF-8")
  if skipped.get("unknown_type_files"):
    why.append("a directory's files are read as source files by extension; give .jsonl and .parquet files as inputs")
  also = [mixture.components[j].name for j in empty[1:]]
  if also:
    why.append(f"nor do {', '.join(repr(n) for n in also)}")
  raise ConfigError(f"mixture {mixture.name}.components[{i}]",
                    f"component {component.name!r} (inputs: {', '.join(component.inputs)}) yields no document: "
                    f"{'; '.join(why)}; nothing was written")


# Pass 2: tokenized shards.
def _write_shards(directory: epath.Path, component: Component, units: list[sources.Unit], selection: dict,
                  pool, workers: int, config: Prepare, log) -> list[dict]:
  kept = len(selection["unit"])
  per_shard = config.docs_per_shard
  paths, stats, tasks = shard_work(directory, component, selection, units, config)
  if len(stats) < len(paths):
    log(f"{component.name}: tokenizing {len(paths) - len(stats)} of {len(paths)} shards")
  building: dict[int, list] = {}
  for results in pool.imap(_tokenize, tasks, _chunksize(len(tasks), workers)):
    for ordinal, language, source, tokens, reason in results:
      i = ordinal // per_shard
      building.setdefault(i, []).append((language, source, tokens, reason))
      if ordinal == min(kept, (i + 1) * per_shard) - 1:
        stats[i] = finish_shard(paths[i], component, building.pop(i))
        log(f"{component.name}: wrote {paths[i].name} ({stats[i]['documents_written']} documents)")
  return [{"path": f"{component.name}/{p.name}", **stats[i]} for i, p in enumerate(paths)]


def _check_byte_exact(component: Component, shards: list[dict], kept: int) -> None:
  not_exact = sum(s["dropped"].get("tokenizer_not_byte_exact", 0) for s in shards)
  if not_exact > MAX_NOT_BYTE_EXACT * kept:
    example = next(s["first_not_byte_exact"] for s in shards if s["first_not_byte_exact"])
    raise ConfigError("tokenizer", f"{not_exact} of {kept} documents of component {component.name!r} "
                      f"({not_exact / kept:.1%}) do not tokenize byte-exactly, e.g. {example}: the tokenizer is "
                      "not lossless; use one with byte fallback (or byte-level BPE) and no lossy normalization")


# The plan: what this directory is being prepared from.
def _plan(mixture: Mixture, units: dict[str, list[sources.Unit]], tokenizer: Tokenizer, tokenizer_path: str,
          config: Prepare) -> dict:
  inputs = {name: [[u.path, *_size_and_mtime(u)] for u in component_units]
            for name, component_units in units.items()}
  parts = {
      "inputs": inputs,
      "tokenizer": {**tokenizer.describe(), "path": str(tokenizer_path), "sha256": _file_digest(tokenizer_path)},
      "components": {c.name: {"domain": c.domain, "language": c.language, "text_field": c.text_field,
                              **_grouping(c)} for c in mixture.components},
      "config": {k: v for k, v in _config_dict(config).items() if k != "workers"},  # workers: same output
  }
  # The tokenizer is known by its contents: the same file elsewhere makes the same tokens.
  fingerprinted = {**parts, "tokenizer": {k: v for k, v in parts["tokenizer"].items() if k != "path"}}
  fingerprint = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
                 for k, v in fingerprinted.items()}
  return {"format": FORMAT, "mixture": mixture.name, "fingerprint": fingerprint,
          **{k: parts[k] for k in ("tokenizer", "components", "config")}}


def _config_dict(config: Prepare) -> dict:
  """The settings as plan and manifest record them. One added since FORMAT 1 appears only when set, so that a
  directory prepared before it existed still matches its plan, and its manifest reads the same."""
  return {k: v for k, v in schema.to_dict(config).items()
          if not (k in _LATER_SETTINGS and v is None) and k not in _HOW_SETTINGS}


def _grouping(component: Component) -> dict:
  """How a component groups repositories, for the plan; nothing when it does not (as before the setting)."""
  if not component.group_repositories:
    return {}
  return {"group_repositories": True, "repository_field": component.repository_field,
          "path_field": component.path_field}


def _size_and_mtime(unit: sources.Unit) -> tuple:
  """A local file's size and mtime; an object's size and generation (or ETag); a repository's files, each
  with its own."""
  if unit.kind == "repository":
    return tuple(x for file, stamp in unit.files
                 for x in (file, *_size_and_mtime(sources.Unit("source", file, "", stamp=stamp))))
  if unit.stamp:
    return unit.stamp
  stat = os.stat(unit.path)
  return stat.st_size, stat.st_mtime_ns


def _file_digest(path) -> str | None:
  path = pathlib.Path(path)
  files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
  digest = hashlib.sha256()
  for file in files:
    digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
  return digest.hexdigest() if files else None


def _prepared_files(directory: epath.Path) -> list[epath.Path]:
  """What prepare writes in a component's directory; nothing else there is ever deleted."""
  patterns = (f"shard-*{records.SHARD_SUFFIX}", f"shard-*{records.SHARD_SUFFIX}.lengths.npy", "shard-*.stats.json",
              SELECTION, ".*.tmp-*")
  return [p for pattern in patterns for p in directory.glob(pattern)] if directory.is_dir() else []


def _check_claim(out: epath.Path, plan: dict, mixture: Mixture, overwrite: bool) -> tuple[dict | None, str | None]:
  """(the plan `out` holds or None, what stands against making it this plan's); refuses one prepared otherwise
  unless `overwrite`. Writes nothing."""
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
  return old, problem


def _claim(out: epath.Path, plan: dict, mixture: Mixture, old: dict | None, problem: str | None) -> None:
  """Makes `out` this plan's directory; with a `problem` (overwrite_mismatch), clears what it held first."""
  out.mkdir(parents=True, exist_ok=True)
  names = set(mixture.names) | set((old or {}).get("components", {}))
  if problem:
    for path in [out / MANIFEST, *(p for n in names for p in _prepared_files(out / n))]:
      path.unlink(missing_ok=True)
  if problem or old is None:
    write_json(out / PLAN, plan)
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


def _component_manifest(component: Component, mixture: Mixture, selection_stats: dict, shards: list[dict],
                        config: Prepare) -> dict:
  flat: dict[str, dict] = {}
  _sum_into(flat, selection_stats["by_language"])
  for shard in shards:
    _sum_into(flat, shard["by_language"])
  by_language = {language: _counts(counts) for language, counts in sorted(flat.items())}
  total = _counts({})
  for counts in by_language.values():
    _sum_into(total, counts)
  # Only with a fallback set, so that a manifest prepared without one reads as before it existed.
  fallback = {"fallback_decoded": {"encoding": config.fallback_encoding,
                                   "files": selection_stats.get("fallback_decoded_files", 0)}
              } if config.fallback_encoding else {}
  return {"domain": component.domain, "inputs": [str(p) for p in mixture.input_paths(component)],
          **total, "skipped": selection_stats["skipped"], **fallback, "by_language": by_language,
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
          "config": _config_dict(config), **totals, "by_domain": by_domain,
          "by_language": dict(sorted(by_language.items())), "components": components}


