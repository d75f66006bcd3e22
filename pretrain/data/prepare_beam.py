"""`pretrain prepare` as Apache Beam pipelines: config.data.prepare.engine = "beam".

The launcher (the host running `pretrain prepare`) plans the units (`sources.plan_units`), the plan
and fingerprint, checks and claims the output directory and writes the manifest, as the local engine
does; the workers run the two passes as two pipelines, with the same functions (prepare_steps.py):
  1. select (one pipeline for every component to select): read and filter each unit (`scan_unit`)
     -> exact dedup, a group per content hash -> near dedup: a group of keys per LSH band bucket, the
     shared buckets' members joined with their signatures and grouped again, candidate pairs confirmed
     by estimated Jaccard (`dedup.bucket_edges`), connected components
     (`components_beam`) -> counts per language and rule, and the kept positions per unit, written
     as JSON lines under a temporary directory that the launcher reads back into the selections.
  2. write: the launcher splits each component's missing shards into (unit, positions, ordinals)
     tasks as the local engine does (`shard_work`) -> tokenize (`tokenize_unit`) -> a group
     per shard, sorted by ordinal -> `finish_shard` (the shard under a temporary name, renamed, then
     its stats). The launcher reads the stats back for the manifest.
Both pipelines read their tasks from a file the launcher writes in the temporary directory, so the
pipeline's description is the same size whatever the corpus. The dedup rule is dedup.py's, and a
document's key comes from the plan, so what is kept, every shard and the manifest are the same bytes
as the local engine's, whatever the runner, workers or bundles.

A corrupt input is reported as locally: the workers emit it rather than raise, and the launcher
raises the one of the first unit in plan order. Workers read the inputs and write the shards into the
output directory themselves, so on a cluster both must be buckets (gs://, s3://) or a file system every
worker mounts; the temporary directory is
`--temp_location` when given (Dataflow requires one), else a local one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import pickle
import random
import shutil
import tempfile
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pretrain import storage
from pretrain.data import dedup, prepare_steps, sources
from pretrain.data.components_beam import DEFAULT_ROUNDS, ConnectedComponents
from pretrain.data.config import Prepare

KEPT = "kept"


class PrepareOptions(PipelineOptions):
  """Beam options of ours, passed among the runner's (config.data.prepare.beam_options)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--near_dedup_rounds", type=int, default=DEFAULT_ROUNDS,
                        help="large-star/small-star rounds of near-dedup's connected components")
    parser.add_argument("--unit_order_seed", type=int, default=None,
                        help="shuffle the order units enter the pipeline in (tests: other bundles, same output)")


class BeamEngine:
  """prepare.prepare's engine: both passes as Beam pipelines run with `config.beam_options`."""

  def __init__(self, tokenizer: prepare_steps.Tokenizer, config: Prepare):
    self.tokenizer, self.config = tokenizer, config
    self.options = PipelineOptions(list(config.beam_options))
    self.ours = self.options.view_as(PrepareOptions)

  def select(self, components, units: dict[str, list[sources.Unit]], skipped_files: dict[str, collections.Counter],
             log) -> dict[str, dict]:
    if not components:
      return {}
    log(f"beam: reading, filtering and deduplicating {sum(len(units[c.name]) for c in components)} files of "
        f"{', '.join(c.name for c in components)}")
    tasks = [(c.name, c.domain, u, unit) for c in components for u, unit in enumerate(units[c.name])]
    if self.ours.unit_order_seed is not None:
      random.Random(self.ours.unit_order_seed).shuffle(tasks)
    with self._scratch() as scratch:
      _write_tasks(f"{scratch}/units", tasks)
      with beam.Pipeline(options=self.options) as pipeline:
        (pipeline
         | "Units" >> _ReadTasks(f"{scratch}/units")
         | "Select" >> Select(self.tokenizer, self.config, self.ours.near_dedup_rounds)
         | "Write" >> beam.io.WriteToText(f"{scratch}/selection", file_name_suffix=".jsonl"))
      lines = _read_lines(f"{scratch}/selection*")
    return _selections(components, skipped_files, lines, self.config, log)

  def write_shards(self, out, components, units: dict[str, list[sources.Unit]], selections: dict[str, dict],
                   log) -> dict[str, list[dict]]:
    work = {c.name: prepare_steps.shard_work(out / c.name, c, selections[c.name], units[c.name], self.config)
            for c in components}
    tasks = [(c.name, *task) for c in components for task in work[c.name][2]]
    todo = {name: len(paths) - len(stats) for name, (paths, stats, _) in work.items()}
    if tasks:
      log("beam: tokenizing " + ", ".join(f"{n} of {len(work[c.name][0])} shards of {c.name}"
                                          for c in components if (n := todo[c.name])))
      shards = {c.name: (c, [str(p) for p in work[c.name][0]]) for c in components}
      with self._scratch() as scratch:
        _write_tasks(f"{scratch}/tasks", tasks)
        with beam.Pipeline(options=self.options) as pipeline:
          (pipeline
           | "Tasks" >> _ReadTasks(f"{scratch}/tasks")
           | "Spread" >> beam.Reshuffle()
           | "Tokenize" >> beam.ParDo(_Tokenize(self.tokenizer, self.config))
           | "By shard" >> beam.GroupByKey()
           | "Finish" >> beam.Map(_finish, shards))
    result = {}
    for c in components:
      paths, stats, _ = work[c.name]
      stats = {i: stats[i] if i in stats else prepare_steps.read_shard_stats(p) for i, p in enumerate(paths)}
      result[c.name] = [{"path": f"{c.name}/{p.name}", **stats[i]} for i, p in enumerate(paths)]
    return result

  def _scratch(self):
    return _scratch(self.options.get_all_options().get("temp_location"))


@contextlib.contextmanager
def _scratch(temp_location: str | None):
  """A directory for one pipeline's outputs to the launcher, removed after: under --temp_location when given
  (where a cluster's workers can write), else a local one."""
  if not temp_location:
    path = tempfile.mkdtemp(prefix="pretrain-prepare-beam-")
    try:
      yield path
    finally:
      shutil.rmtree(path, ignore_errors=True)
    return
  path = f"{temp_location.rstrip('/')}/pretrain-prepare-{uuid.uuid4().hex[:8]}"
  try:
    yield path
  finally:
    matches = FileSystems.match([f"{path}/*"])[0].metadata_list
    if matches:
      FileSystems.delete([m.path for m in matches])


# A pipeline's tasks (pass 1: every input file; pass 2: every kept document's position and ordinal) go to
# the workers as a file in the scratch directory, not as a beam.Create: a Create's elements travel inside
# the pipeline's own description, which would then grow with the corpus (Dataflow refuses a job request
# over 10 MB), and the runner would hand them out from memory.
def _write_tasks(path: str, tasks: list[tuple]) -> None:
  with FileSystems.create(path) as f:
    for task in tasks:
      f.write(base64.b64encode(pickle.dumps(task)) + b"\n")


class _ReadTasks(beam.PTransform):
  """_write_tasks's file -> its tasks, split among the workers by byte ranges."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def expand(self, pipeline):
    return (pipeline
            | "Read" >> beam.io.ReadFromText(self.path, validate=False)
            | "Decode" >> beam.Map(lambda line: pickle.loads(base64.b64decode(line))))


def _read_lines(pattern: str) -> list[dict]:
  lines = []
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    with FileSystems.open(metadata.path) as f:
      lines += [json.loads(line) for line in f.read().decode().splitlines() if line]
  return lines


def _selections(components, skipped_files, lines: list[dict], config: Prepare, log) -> dict[str, dict]:
  """The launcher's side of pass 1: the workers' JSON lines -> each component's selection, or the error."""
  order = {c.name: i for i, c in enumerate(components)}
  errors = sorted((line["error"] for line in lines if "error" in line),
                  key=lambda e: (order[e["component"]], e["unit"]))
  if errors:  # the first in plan order, as the local engine would have met it
    raise sources.CorruptInputError(errors[0]["key"], errors[0]["message"])
  by_language = {c.name: collections.defaultdict(collections.Counter) for c in components}
  skipped = {c.name: collections.Counter(skipped_files[c.name]) for c in components}
  kept = {c.name: [] for c in components}
  for line in lines:
    if "count" in line:
      name, language, what = line["count"]
      by_language[name][language][what] += line["n"]
    elif "skipped" in line:
      name, reason = line["skipped"]
      skipped[name][reason] += line["n"]
    else:
      name, unit = line[KEPT]
      kept[name] += [dedup.doc_key(unit, p) for p in line["positions"]]
  selections = {}
  for c in components:
    selections[c.name] = prepare_steps.make_selection(by_language[c.name], skipped[c.name], kept[c.name], config)
    prepare_steps.log_selection(c, selections[c.name], config, log)
  return selections


# Pass 1.
class _Scan(beam.DoFn):
  """A unit -> its documents (name, key, language, reason, content hash, signature); skips and errors aside."""

  def __init__(self, tokenizer, config: Prepare):
    self.tokenizer, self.config = tokenizer, config

  def process(self, task):
    name, domain, u, unit = task
    try:
      docs, skipped = prepare_steps.scan_unit(unit, domain, self.tokenizer, self.config)
    except sources.CorruptInputError as e:
      message = str(e).removeprefix(f"{e.key}: ")
      yield beam.pvalue.TaggedOutput("error", {"error": {"component": name, "unit": u, "key": e.key,
                                                         "message": message}})
      return
    for reason, n in skipped.items():
      yield beam.pvalue.TaggedOutput("skipped", ((name, reason), n))
    for position, (language, reason, digest, hashvalues) in enumerate(docs):
      yield name, dedup.doc_key(u, position), language, reason, digest, hashvalues


def _exact_group(group, docs):
  """A content hash's documents: the smallest key goes on, the rest are exact duplicates. One pass over a
  group that may be large (the same file a million times), holding one document."""
  best = None
  for doc in docs:
    if best is not None and doc[0] > best[0]:
      doc, best = best, doc
    if best is not None:
      yield beam.pvalue.TaggedOutput("dropped", (group[0], best[0], best[1], "exact_duplicate"))
    best = doc
  yield group[0], *best


def _band_entries(doc, config):
  name, key, _, hashvalues = doc
  for band in dedup.band_keys(hashvalues, config.dedup):
    yield (name, band), key


def _shared_bucket(band_and_keys):
  """A band bucket of two or more documents -> ((name, key), bucket id) for each; a lone document's is dropped
  here, so only candidates' signatures ever travel again."""
  (name, band), keys = band_and_keys
  keys = sorted(set(keys))
  if len(keys) < 2:
    return
  bucket = hashlib.blake2b(band, digest_size=16).digest()  # names the bucket in fewer bytes than its band key
  for key in keys:
    yield (name, key), (name, bucket)


def _to_buckets(node_and_joined):
  (name, key), joined = node_and_joined
  for signature in joined["signature"]:
    for bucket in joined["bucket"]:
      yield bucket, (key, signature)


def _bucket_edges(bucket_and_members, threshold):
  (name, _), members = bucket_and_members
  for a, b in dedup.bucket_edges(list(members), threshold):
    yield (name, b), (name, a)  # (larger, smaller)


def _near_outcome(node, joined):
  name, key = node
  for language in joined["doc"]:
    yield name, key, language, "near_duplicate" if joined["duplicate"] else None


class NearDuplicates(beam.PTransform):
  """(name, key, language, signature) of exact dedup's survivors -> (name, key) of each near duplicate: the
  members of a connected component of similar LSH candidates but its smallest key.

  The band shuffle carries keys only (8 bytes per document and band, not its 512-byte signature): buckets
  of one document, nearly all of them, end there, and only the members of shared buckets are joined with
  their signatures and grouped again to be compared."""

  def __init__(self, config: Prepare, rounds: int):
    super().__init__()
    self.config, self.rounds = config, rounds

  def expand(self, survivors):
    buckets = (survivors
               | "Band entries" >> beam.FlatMap(_band_entries, self.config)
               | "Same band" >> beam.GroupByKey()
               | "Shared buckets" >> beam.FlatMap(_shared_bucket))
    signatures = survivors | "Signatures" >> beam.Map(lambda d: ((d[0], d[1]), d[3]))
    return ({"bucket": buckets, "signature": signatures}
            | "With signatures" >> beam.CoGroupByKey()
            | "To buckets" >> beam.FlatMap(_to_buckets)
            | "Same bucket" >> beam.GroupByKey()
            | "Similar pairs" >> beam.FlatMap(_bucket_edges, self.config.dedup.threshold)
            | "Components" >> ConnectedComponents(self.rounds)
            | "Not representative" >> beam.Keys())


class Select(beam.PTransform):
  """(component name, domain, unit index, unit) -> JSON lines: counts, skips, kept positions per unit, errors."""

  def __init__(self, tokenizer, config: Prepare, rounds: int):
    super().__init__()
    self.tokenizer, self.config, self.rounds = tokenizer, config, rounds

  def expand(self, tasks):
    config = self.config
    scanned = (tasks
               | "Spread units" >> beam.Reshuffle()
               | "Scan" >> beam.ParDo(_Scan(self.tokenizer, config))
               .with_outputs("skipped", "error", main="docs"))
    docs = scanned.docs
    read = docs | "Read" >> beam.Map(lambda d: ((d[0], d[2], "documents_read"), 1))
    filtered = (docs | "Filtered" >> beam.Filter(lambda d: d[3] is not None)
                | "Filter outcome" >> beam.Map(lambda d: (d[0], d[1], d[2], d[3])))
    candidates = docs | "Candidates" >> beam.Filter(lambda d: d[3] is None)
    outcomes = [filtered]
    if config.dedup.exact:
      exact = (candidates
               | "By hash" >> beam.Map(lambda d: ((d[0], d[4]), (d[1], d[2], d[5])))
               | "Same hash" >> beam.GroupByKey()
               | "First of hash" >> beam.FlatMapTuple(_exact_group).with_outputs("dropped", main="kept"))
      outcomes.append(exact.dropped)
      survivors = exact.kept  # (name, key, language, signature)
    else:
      survivors = candidates | "Survivors" >> beam.Map(lambda d: (d[0], d[1], d[2], d[5]))
    if config.dedup.near:
      duplicates = survivors | "Near duplicates" >> NearDuplicates(config, self.rounds)
      by_node = survivors | "By node" >> beam.Map(lambda d: ((d[0], d[1]), d[2]))
      outcomes.append({"doc": by_node, "duplicate": duplicates | "Dropped" >> beam.Map(lambda node: (node, True))}
                      | "Join" >> beam.CoGroupByKey() | "Near outcome" >> beam.FlatMapTuple(_near_outcome))
    else:
      outcomes.append(survivors | "Kept" >> beam.Map(lambda d: (d[0], d[1], d[2], None)))
    outcome = outcomes | "Outcomes" >> beam.Flatten()
    counts = ((read, outcome | "Not kept" >> beam.Filter(lambda o: o[3] is not None)
               | "Count dropped" >> beam.Map(lambda o: ((o[0], o[2], o[3]), 1)))
              | "Counts" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)
              | "Count lines" >> beam.MapTuple(lambda what, n: json.dumps({"count": list(what), "n": n})))
    skips = (scanned.skipped | "Sum skips" >> beam.CombinePerKey(sum)
             | "Skip lines" >> beam.MapTuple(lambda what, n: json.dumps({"skipped": list(what), "n": n})))
    kept = (outcome
            | "Kept only" >> beam.Filter(lambda o: o[3] is None)
            | "By unit" >> beam.Map(lambda o: ((o[0], dedup.unit_and_position(o[1])[0]),
                                               dedup.unit_and_position(o[1])[1]))
            | "Unit's kept" >> beam.GroupByKey()
            | "Kept lines" >> beam.MapTuple(lambda where, ps: json.dumps({KEPT: list(where), "positions": sorted(ps)})))
    errors = scanned.error | "Error lines" >> beam.Map(json.dumps)
    return (counts, skips, kept, errors) | "Lines" >> beam.Flatten()


# Pass 2.
class _Tokenize(beam.DoFn):
  def __init__(self, tokenizer, config: Prepare):
    self.tokenizer, self.config = tokenizer, config

  def process(self, task):
    name, unit, domain, positions, ordinals = task
    entries = prepare_steps.tokenize_unit(unit, domain, positions, ordinals, self.tokenizer, self.config)
    for ordinal, language, source, tokens, reason in entries:
      yield (name, ordinal // self.config.docs_per_shard), (ordinal, language, source, tokens, reason)


def _finish(shard_and_entries, shards):
  (name, i), entries = shard_and_entries
  component, paths = shards[name]
  entries = sorted(entries, key=lambda e: e[0])  # ordinal order, whatever order the bundles came in
  prepare_steps.finish_shard(storage.as_path(paths[i]), component, [e[1:] for e in entries])
  return name, i
