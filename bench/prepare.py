"""`pretrain prepare`'s two engines: throughput on one corpus, and the near-dedup stage's peak memory.

  .venv/bin/python bench/prepare.py                                   # ~200 MB corpus, 100k and 1M documents
  .venv/bin/python bench/prepare.py --corpus-mb 5 --dedup-docs 20000,200000 --workers 2   # ~1 minute

Throughput: a code corpus of this Python install's site-packages sources (`.py` files in sorted
path order, every 20th also written lightly edited: near duplicates), prepared by the local engine
(process pool) and by the Beam engine (DirectRunner, worker processes), with a byte tokenizer (so the
figures are prepare's own, not a tokenizer's). Documents/s counts documents read; tokens/s, tokens
written.

Near-dedup memory: synthetic MinHash signatures (one document in 10 a near copy of the one before),
N of them, through each engine's near-dedup stage alone: the local engine's `dedup.duplicates` in a
fresh process (peak RSS of that process: every signature, bucket and union-find entry in memory), and
the Beam engine's `NearDuplicates` on worker processes that generate their own share of the
signatures (peak RSS per worker; the in-process runner's own process also holds the shuffled data,
the shuffle service's job on a cluster, reported apart). `bare GBK/worker` is the runner's own share:
the same signatures and as many band entries per document through one GroupByKey whose every group
is a single entry, none of our transforms. The DirectRunner gives each worker its share of a stage as
one bundle, so this figure too grows with the documents.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

from pretrain import schema
from pretrain.data import dedup, prepare
from pretrain.data.config import Dedup, Prepare
from pretrain.data.mixture import Mixture

EDIT_EVERY = 20


class ByteTokenizer:
  """UTF-8 bytes as ids: lossless and cheap, so the bench measures prepare."""

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int32)

  def normalize(self, text: str) -> str:
    return text

  def is_byte_exact(self, text: str, ids) -> bool:
    return bytes(np.asarray(ids, np.uint8)) == text.encode("utf-8", "surrogatepass")

  def describe(self) -> dict:
    return {"kind": "bytes", "vocab_size": 256}


def peak_rss_mb() -> float:
  """This process's peak resident memory: VmHWM, not ru_maxrss, which a child keeps from its parent across exec."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def write_corpus(out: pathlib.Path, megabytes: float) -> int:
  """Site-packages' .py files (sorted) up to `megabytes`, every EDIT_EVERY-th also edited; returns bytes."""
  site = pathlib.Path(sysconfig.get_paths()["purelib"])
  budget, written = int(megabytes * 1e6), 0
  for i, path in enumerate(sorted(site.rglob("*.py"))):
    if written >= budget:
      break
    try:
      text = path.read_text()
    except (UnicodeDecodeError, OSError):
      continue
    target = out / "code" / path.relative_to(site)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    written += len(text)
    if i % EDIT_EVERY == 0 and text.count("\n") > 10:
      lines = text.splitlines()
      lines[len(lines) // 2] = "# edited"
      target.with_name("edited_" + target.name).write_text("\n".join(lines) + "\n")
      written += len(text)
  return written


def throughput(root: pathlib.Path, engine: str, workers: int) -> dict:
  mixture = schema.parse(Mixture, {"name": "bench", "root": str(root), "components": [
      {"name": "code", "domain": "code", "weight": 1.0, "inputs": ["code"]}]})
  options = (f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing")
  config = Prepare(workers=workers, engine=engine, beam_options=options if engine == "beam" else ())
  out = root / f"out-{engine}"
  start = time.perf_counter()
  manifest = prepare.prepare(mixture, out, ByteTokenizer(), config=config, tokenizer_path="bytes")
  seconds = time.perf_counter() - start
  code = manifest["components"]["code"]
  return {"engine": engine, "seconds": seconds, "documents_read": code["documents_read"],
          "documents_written": code["documents_written"], "near_duplicates": code["dropped"]["near_duplicate"],
          "docs_per_s": code["documents_read"] / seconds, "tokens_per_s": code["tokens_written"] / seconds,
          "manifest": (out / "manifest.json").read_bytes()}


def synthetic_signatures(first: int, count: int, num_perm: int) -> np.ndarray:
  """Signatures of documents [first, first + count): random, one in 10 a near copy (4% changed) of the one
  before; the same for a document whichever chunk makes it."""
  out = np.empty((count, num_perm), np.uint64)
  for i in range(first, first + count):
    rng = np.random.default_rng(i - 1 if i % 10 == 1 else i)
    row = rng.integers(0, 2**32, num_perm, dtype=np.uint64)
    if i % 10 == 1:
      changed = np.random.default_rng([i, 1]).choice(num_perm, num_perm // 25, replace=False)
      row[changed] ^= 1
    out[i - first] = row
  return out


def near_local(n: int) -> None:
  """In a fresh process: N signatures in memory, as pass 1 leaves them, then the local near-dedup stage."""
  config = Dedup(exact=False)
  imports = peak_rss_mb()
  signatures = synthetic_signatures(0, n, config.num_perm)
  start = time.perf_counter()
  dropped = dedup.duplicates(((k, None, signatures[k]) for k in range(n)), config)
  print(json.dumps({"near_duplicates": len(dropped), "seconds": time.perf_counter() - start,
                    "peak_rss_mb": peak_rss_mb(), "imports_mb": imports}))


CHUNK = 5000


def _generate(chunk: int, n: int, num_perm: int):
  first = chunk * CHUNK
  for k, row in enumerate(synthetic_signatures(first, min(CHUNK, n - first), num_perm)):
    yield "bench", first + k, "python", row


def _peak(_):
  return os.getpid(), peak_rss_mb()


def _bare_band_entries(doc, bands: int):
  yield from (((doc[1], band), doc[1]) for band in range(bands))


def near_beam(n: int, workers: int, bare: bool = False) -> None:
  """In a fresh process: the Beam near-dedup stage on worker processes that make their own signatures.

  `bare`: the runner's own share instead, none of our transforms: as many (key, band) entries per document
  as near dedup's band shuffle, through a GroupByKey whose every group is one entry."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from pretrain.data.prepare_beam import NearDuplicates

  config = Prepare(dedup=Dedup(exact=False))
  scratch = tempfile.mkdtemp(prefix="bench-prepare-")
  options = PipelineOptions([f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"])
  start = time.perf_counter()
  with beam.Pipeline(options=options) as pipeline:
    survivors = (pipeline | beam.Create(range(-(-n // CHUNK))) | beam.Reshuffle()
                 | beam.FlatMap(_generate, n, config.dedup.num_perm))
    if bare:
      bands, _ = dedup.band_split(config.dedup.threshold, config.dedup.num_perm)
      duplicates = (survivors | beam.FlatMap(_bare_band_entries, bands) | beam.GroupByKey()
                    | beam.MapTuple(lambda key, _: key[0]))
    else:
      duplicates = survivors | NearDuplicates(config, 24)
    (duplicates | "Count" >> beam.combiners.Count.Globally()
     | "Write count" >> beam.io.WriteToText(f"{scratch}/count"))
    (survivors | "Count seen" >> beam.combiners.Count.Globally()  # every document made it through the runner
     | "Write seen" >> beam.io.WriteToText(f"{scratch}/seen"))
    # Every worker's peak so far, read after it ran the stage's last step (its process ran the others too).
    peaks = ((duplicates | "Spread" >> beam.Reshuffle() | "Peak" >> beam.Map(_peak)),
             survivors | "Sample" >> beam.Filter(lambda d: d[1] % 997 == 0) | "Peak of readers" >> beam.Map(_peak))
    (peaks | beam.Flatten() | beam.CombinePerKey(max) | beam.Map(json.dumps)
     | "Write peaks" >> beam.io.WriteToText(f"{scratch}/peaks"))
  seconds = time.perf_counter() - start
  lines = {stem: [line for p in pathlib.Path(scratch).glob(f"{stem}*") for line in p.read_text().splitlines() if line]
           for stem in ("peaks", "count", "seen")}
  peaks, count = [json.loads(line)[1] for line in lines["peaks"]], int(lines["count"][0])
  if int(lines["seen"][0]) != n:
    raise SystemExit(f"the Beam pipeline saw {lines['seen'][0]} of {n} documents")
  shutil.rmtree(scratch)
  print(json.dumps({"near_duplicates": count, "seconds": seconds, "worker_peak_rss_mb": max(peaks),
                    "workers_seen": len(peaks), "runner_peak_rss_mb": peak_rss_mb()}))


def _fresh(flag: str, n: int, workers: int) -> dict:
  run = subprocess.run([sys.executable, __file__, flag, str(n), "--workers", str(workers)], check=True,
                       capture_output=True, text=True)
  return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--corpus-mb", type=float, default=200)
  parser.add_argument("--dedup-docs", default="100000,1000000",
                      help="comma-separated document counts ('' for the throughput run alone)")
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--near-local", type=int, help=argparse.SUPPRESS)  # the fresh processes of near_*
  parser.add_argument("--near-beam", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--bare-beam", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.near_local:
    return near_local(args.near_local)
  if args.near_beam:
    return near_beam(args.near_beam, args.workers)
  if args.bare_beam:
    return near_beam(args.bare_beam, args.workers, bare=True)
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench-prepare-"))
  try:
    size = write_corpus(root, args.corpus_mb)
    print(f"corpus: {size / 1e6:.1f} MB of site-packages sources, {args.workers} workers")
    print(f"{'engine':<8}{'seconds':>9}{'docs read':>11}{'kept':>8}{'near dups':>11}{'docs/s':>9}{'tokens/s':>12}")
    results = [throughput(root, engine, args.workers) for engine in ("local", "beam")]
    for r in results:
      print(f"{r['engine']:<8}{r['seconds']:>9.1f}{r['documents_read']:>11,}{r['documents_written']:>8,}"
            f"{r['near_duplicates']:>11,}{r['docs_per_s']:>9,.0f}{r['tokens_per_s']:>12,.0f}")
    print(f"manifests byte-identical: {results[0]['manifest'] == results[1]['manifest']}")
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"\nnear-dedup stage, peak RSS (MB; local: after imports -> peak)\n{'documents':>10}{'local':>14}"
        f"{'beam/worker':>13}{'beam runner':>13}{'dups local':>12}{'dups beam':>11}{'bare GBK/worker':>17}")
  for n in (int(x) for x in args.dedup_docs.split(",") if x):
    local, beam_run, bare = (_fresh(flag, n, args.workers) for flag in ("--near-local", "--near-beam", "--bare-beam"))
    print(f"{n:>10,}{local['imports_mb']:>7.0f} ->{local['peak_rss_mb']:>5.0f}{beam_run['worker_peak_rss_mb']:>13.0f}"
          f"{beam_run['runner_peak_rss_mb']:>13.0f}{local['near_duplicates']:>12,}{beam_run['near_duplicates']:>11,}"
          f"{bare['worker_peak_rss_mb']:>17.0f}   (seconds: local {local['seconds']:.1f}, beam {beam_run['seconds']:.1f})")


if __name__ == "__main__":
  main()
