"""Exact and near duplicates: sha256 content hashes, and MinHash LSH over word shingles.

The rule, the same for the local and the Beam engine (`prepare_beam`), within one mixture
component (never across):
  - A document's key is its place in prepare order: (unit index from `sources.plan_units`,
    position in the unit), packed in one int (`doc_key`). It depends on the plan alone, not on
    workers or bundles.
  - Exact: documents with the same content hash form a group; its smallest key is kept, the rest
    are `exact_duplicate`.
  - Near, on what exact dedup kept: each document's MinHash `signature` is cut into the LSH bands
    datasketch's `MinHashLSH(threshold, num_perm)` picks (`band_split`). Documents sharing a band
    are candidates; a candidate pair whose estimated Jaccard (the fraction of equal hash values) is
    >= threshold is an edge. Each connected component of that graph keeps its smallest key, the
    rest are `near_duplicate`. So in a chain a~b~c, c goes even when a and c are not similar:
    what is kept does not depend on the order documents are looked at in.

`content_hash` and `signature` run in the workers (a signature is the expensive part: one hash per
shingle, `num_perm` permutations). `duplicates` is the local engine's: every candidate's signature
in memory, union-find over the edges. The Beam engine groups by band and runs a distributed
connected-components algorithm (`components_beam`) over the same edges (`bucket_edges`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
from datasketch import MinHash, MinHashLSH

from pretrain.data.config import Dedup

SEED = 1
SCHEME = "affine32"  # datasketch >= 2.0's default, named so signatures never mix schemes
POSITION_BITS = 32  # a unit (one file) holds fewer than 2**32 documents


def doc_key(unit: int, position: int) -> int:
  return unit << POSITION_BITS | position


def unit_and_position(key: int) -> tuple[int, int]:
  return key >> POSITION_BITS, key & ((1 << POSITION_BITS) - 1)


def content_hash(text: str) -> bytes:
  return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def shingles(text: str, size: int) -> list[bytes]:
  """Runs of `size` whitespace-separated words; a shorter document is one shingle."""
  words = text.split()
  if len(words) <= size:
    return [" ".join(words).encode("utf-8", "surrogatepass")]
  return [" ".join(words[i:i + size]).encode("utf-8", "surrogatepass") for i in range(len(words) - size + 1)]


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int):
  return MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations


def signature(text: str, config: Dedup) -> np.ndarray:
  """The MinHash signature of `text`'s word shingles: `num_perm` unsigned hash values."""
  minhash = MinHash(num_perm=config.num_perm, seed=SEED, permutations=_permutations(config.num_perm),
                    scheme=SCHEME)
  minhash.update_batch(shingles(text, config.shingle_size))
  return minhash.hashvalues


@functools.lru_cache(maxsize=8)
def band_split(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band): datasketch's choice, which minimizes its false positives + negatives."""
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  return lsh.b, lsh.r


def band_keys(hashvalues: np.ndarray, config: Dedup) -> Iterator[bytes]:
  """One bucket name per band: the band's index and its hash values."""
  bands, rows = band_split(config.threshold, config.num_perm)
  for band in range(bands):
    yield band.to_bytes(2, "little") + np.ascontiguousarray(hashvalues[band * rows:(band + 1) * rows]).tobytes()


def similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
  return bool(np.mean(a == b) >= threshold)


def bucket_edges(members: list[tuple[int, np.ndarray]], threshold: float) -> Iterator[tuple[int, int]]:
  """(smaller key, larger key) for every pair of a bucket's (key, signature) members that is similar."""
  if len(members) < 2:
    return
  members = sorted(members, key=lambda m: m[0])
  keys = [k for k, _ in members]
  signatures = np.stack([s for _, s in members])
  for i in range(len(keys) - 1):
    agreement = np.mean(signatures[i + 1:] == signatures[i], axis=1)  # vs every later member at once
    for j in np.flatnonzero(agreement >= threshold):
      yield keys[i], keys[i + 1 + j]


def duplicates(candidates: Iterable[tuple[int, bytes | None, np.ndarray | None]], config: Dedup) -> dict[int, str]:
  """The local engine: key -> "exact_duplicate" / "near_duplicate" for the dropped of (key, content hash,
  signature) candidates (the documents no filter dropped)."""
  dropped: dict[int, str] = {}
  first_of_hash: dict[bytes, int] = {}
  survivors: list[tuple[int, np.ndarray | None]] = []
  for key, digest, hashvalues in sorted(candidates, key=lambda c: c[0]):  # a hash's first is its smallest key
    if config.exact:
      if first_of_hash.setdefault(digest, key) != key:
        dropped[key] = "exact_duplicate"
        continue
    survivors.append((key, hashvalues))
  if not config.near:
    return dropped
  buckets: dict[bytes, list[tuple[int, np.ndarray]]] = {}
  for key, hashvalues in survivors:
    for band in band_keys(hashvalues, config):
      buckets.setdefault(band, []).append((key, hashvalues))
  parent: dict[int, int] = {}

  def root(key: int) -> int:
    while parent.get(key, key) != key:
      parent[key] = parent.get(parent[key], parent[key])  # path halving
      key = parent[key]
    return key

  for members in buckets.values():
    for a, b in bucket_edges(members, config.threshold):
      ra, rb = root(a), root(b)
      if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)  # a component's root is always its smallest key
  for key in parent:
    if root(key) != key:
      dropped[key] = "near_duplicate"
  return dropped
