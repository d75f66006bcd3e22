"""Exact and near duplicates: sha256 content hashes, and MinHash LSH over word shingles.

`content_hash` and `signature` run in the worker processes (a signature is the expensive
part: one hash per shingle, `num_perm` permutations). `Deduplicator` runs in the parent:
documents are offered in the prepare order, and the first of a group is kept, so the
result does not depend on how the work was split between workers. A near-duplicate
candidate from the LSH index is confirmed by its estimated Jaccard similarity, since
LSH banding alone also returns some less similar pairs.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from pretrain.data.config import Dedup

SEED = 1
SCHEME = "affine32"  # datasketch >= 2.0's default, named so signatures never mix schemes


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


class Deduplicator:
  """Remembers kept documents; says whether a new one duplicates one of them."""

  def __init__(self, config: Dedup):
    self.config = config
    self._hashes: set[bytes] = set()
    self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    self._signatures: list[np.ndarray] = []  # of kept documents, by LSH key

  def offer(self, digest: bytes | None, hashvalues: np.ndarray | None) -> str | None:
    """"exact_duplicate", "near_duplicate", or None (kept, and remembered)."""
    if self.config.exact and digest in self._hashes:
      return "exact_duplicate"
    if self.config.near:
      minhash = MinHash(num_perm=self.config.num_perm, seed=SEED, hashvalues=hashvalues, scheme=SCHEME)
      for key in self._lsh.query(minhash):
        if np.mean(self._signatures[key] == hashvalues) >= self.config.threshold:
          return "near_duplicate"
      self._lsh.insert(len(self._signatures), minhash, check_duplication=False)
      self._signatures.append(hashvalues)
    if self.config.exact:
      self._hashes.add(digest)
    return None
