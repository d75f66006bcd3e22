"""One prepared document as an ArrayRecord record, and the shard files that hold them.

A record is `<u32 header length><header JSON><int32 little-endian token ids>`. The
header holds the document's metadata (domain, language, source); tokens carry no BOS
or EOS (the pipeline adds them). Decoding is a JSON parse of a short header and one
`np.frombuffer`, so reading never costs per token in Python.

Shards are written to a hidden temporary name and renamed when complete, so a file
named like a shard is always a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct

import numpy as np

from pretrain import storage
from pretrain.atomic_file import atomic_file

SHARD_SUFFIX = ".array_record"
_HEADER_LEN = struct.Struct("<I")


class CorruptRecordError(ValueError):
  """A record that does not decode; the message names the shard and index when known."""


@dataclasses.dataclass(frozen=True)
class Document:
  tokens: np.ndarray  # int32 [n], no BOS/EOS
  domain: str  # code | math | text
  language: str  # e.g. python, markdown, english
  source: str  # where it came from: a file path, or path:line for JSONL/Parquet rows


def encode(doc: Document) -> bytes:
  header = json.dumps({"domain": doc.domain, "language": doc.language, "source": doc.source},
                      ensure_ascii=False).encode()
  return _HEADER_LEN.pack(len(header)) + header + np.asarray(doc.tokens, "<i4").tobytes()


def decode(record: bytes, where: str = "record") -> Document:
  try:
    (header_len,) = _HEADER_LEN.unpack_from(record, 0)
    header = json.loads(record[4:4 + header_len])
    body = memoryview(record)[4 + header_len:]
    if len(body) % 4:
      raise ValueError(f"token bytes {len(body)} not a multiple of 4")
    tokens = np.frombuffer(body, "<i4")
    return Document(tokens=tokens, domain=header["domain"], language=header["language"], source=header["source"])
  except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CorruptRecordError(f"{where}: corrupt record ({e})") from e


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shard(path: pathlib.Path, docs) -> int:
  """Writes documents to `path` all-or-nothing; returns the number written."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = storage.as_path(path)  # a shard may be written straight into a bucket (atomic_file uploads it whole)
  lengths = []
  with atomic_file(path) as tmp:
    writer = ArrayRecordWriter(str(tmp), "group_size:1")  # random access to every record
    try:
      for doc in docs:
        writer.write(encode(doc))
        lengths.append(len(doc.tokens))
    finally:
      writer.close()
  _save_lengths(path, np.asarray(lengths, np.int64))  # so the pipeline never has to scan the shard
  return len(lengths)


def _lengths_path(path: pathlib.Path) -> pathlib.Path:
  return path.parent / (path.name + ".lengths.npy")


def _save_lengths(path: pathlib.Path, lengths: np.ndarray) -> None:
  with atomic_file(_lengths_path(path)) as tmp, open(tmp, "wb") as f:
    np.save(f, lengths)


def read_shard(path: pathlib.Path):
  """Yields the documents of one shard in order (for tools and tests; training reads via Grain)."""
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(str(path))
  try:
    for i in range(reader.num_records()):
      yield decode(reader.read([i])[0], f"{path}[{i}]")
  finally:
    reader.close()


def document_lengths(path: pathlib.Path) -> np.ndarray:
  """Token count of every document of a shard (-1 for a corrupt record), from its `.lengths.npy` sidecar.

  The sidecar is made on first use by decoding every record, which also finds corrupt ones early.
  """
  from array_record.python.array_record_module import ArrayRecordReader

  path = pathlib.Path(path)
  sidecar = _lengths_path(path)
  if sidecar.exists() and sidecar.stat().st_mtime >= path.stat().st_mtime:
    return np.load(sidecar)
  try:
    reader = ArrayRecordReader(str(path))
    try:
      lengths = np.empty(reader.num_records(), np.int64)
      for i in range(len(lengths)):
        try:
          lengths[i] = len(decode(reader.read([i])[0]).tokens)
        except CorruptRecordError:
          lengths[i] = -1
    finally:
      reader.close()
  except CorruptRecordError:
    raise
  except Exception as e:  # not an ArrayRecord file at all, or a truncated one
    raise CorruptRecordError(f"{path}: cannot read as an ArrayRecord shard ({e})") from e
  _save_lengths(path, lengths)
  return lengths
