"""A component's raw inputs as documents: source trees, JSONL (.jsonl, .jsonl.gz) and Parquet files.

`plan_units` turns a component's `inputs` into an ordered list of `Unit`s, one file each:
inputs in the order listed, and within a directory or a glob the files in sorted path order,
so the document order (and with it which duplicate is kept) never depends on the file system.
`read_unit` yields a unit's documents. A unit is the grain of parallel work, so a corpus
that is one huge JSONL file prepares on one core: split it into parts to use them all.

Inputs may be gs:// or s3:// URLs (read through fsspec: gcsfs, s3fs), as an object, a glob of
objects, or a prefix read as a directory (its objects in the order a local walk of the same tree
gives). A unit of a bucket carries its object's size and generation (GCS) or ETag (S3) as
`stamp`, which the plan fingerprints as it does a local file's size and mtime.

Source files get their language from the extension or the file name; files of unknown type
are skipped, and binary ones (a NUL byte in the first 8 KiB) too, all counted. A source file
that is not UTF-8 is decoded with `fallback_encoding` (Prepare.fallback_encoding) when one is
set and the text it gives has no control characters, and counted as `fallback_decoded_files`;
otherwise it is skipped and counted as undecodable. JSONL and Parquet text is UTF-8 by their
specs: no fallback there. A JSONL row's language is the component's `language`, else the row's
`language` field, else "unknown".

With `Component.group_repositories`, a directory directly under an input directory is one `Unit` of kind
"repository" (its source files, in walk order), and a JSONL or Parquet unit marks each row that has a
`repository_field` with its repository and `path_field`; `repository_document` joins a repository's files.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import posixpath
import re
import zlib
from collections.abc import Iterator
from urllib import parse

import fsspec

from pretrain import storage
from pretrain.data import builtin_corpus
from pretrain.data.languages import language_of, path_comment
from pretrain.data.mixture import Mixture
from pretrain.schema import ConfigError

SKIPPED_DIRS = {"__pycache__"}  # and every hidden directory (.git, .venv, ...)
# C0 controls but tab, newline, vertical tab, form feed, carriage return and escape: text has none of these,
# and a single-byte fallback like latin-1 decodes any bytes, binary ones too.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f]")


class CorruptInputError(ConfigError):
  """An input file or row that does not read; the key names the file and line (or row).

  A ConfigError, so the CLI reports it as one line: the fix is in the inputs a config points at.
  """

  def __reduce__(self):  # raised in a worker process, pickled to the parent: rebuild from (key, message)
    return (type(self), (self.key, str(self).removeprefix(f"{self.key}: ")))


@dataclasses.dataclass(frozen=True)
class Unit:
  """One input file (a source file, a JSONL file or a Parquet file), or a repository's directory."""

  kind: str  # source | jsonl | parquet | repository
  path: str
  language: str  # a source file's language; the component's language for JSONL / Parquet ("" if none)
  text_field: str = "text"
  stamp: tuple = ()  # an object's (size, generation or ETag); () for a local file (the plan stats it)
  files: tuple = ()  # a repository's source files: ((path, stamp), ...)
  repository_field: str = ""  # JSONL / Parquet: the field naming a row's repository ("": rows are not grouped)
  path_field: str = ""

  @property
  def grouped(self) -> bool:
    return self.kind == "repository" or bool(self.repository_field)


@dataclasses.dataclass(frozen=True)
class RawDocument:
  text: str
  language: str
  source: str  # path, path:line (JSONL, 1-based) or path#row (Parquet, 0-based)
  repository: str | None = None  # when grouping repositories: the repository the file belongs to
  path: str = ""  # ... and its path there


def _kind_of(path: str) -> str | None:
  if path.endswith((".jsonl", ".jsonl.gz")):
    return "jsonl"
  if path.endswith(".parquet"):
    return "parquet"
  return "source" if language_of(path) else None


def plan_units(mixture: Mixture, index: int) -> tuple[list[Unit], collections.Counter]:
  """The units of component `index`, and counts of files skipped for an unknown type. The built-in corpus
  is written on first use, here, where its files are first read."""
  if mixture.builtin_corpus is not None:
    builtin_corpus.ensure(mixture.builtin_corpus)
  component = mixture.components[index]
  key = f"mixture {mixture.name}.components[{index}].inputs"
  if not component.inputs:
    raise ConfigError(key, f"component {component.name!r} has no inputs to prepare")
  units, skipped = [], collections.Counter()
  rows_grouped = ({"repository_field": component.repository_field, "path_field": component.path_field}
                  if component.group_repositories else {})
  for given, path in zip(component.inputs, mixture.input_paths(component)):
    listing = _list_url(given, path, key) if storage.is_url(path) else _list_local(given, path, key)
    for match, stamp, files in listing:
      if files is not None:  # a directory: its source files, in walk order
        source_files = []
        for file, file_stamp in files:
          if _kind_of(file) == "source":
            source_files.append((file, file_stamp))
          else:  # data files inside a source tree are not read as data: list them as inputs
            skipped["unknown_type_files"] += 1
        if component.group_repositories:
          units.extend(_repository_units(match, source_files))
        else:
          units.extend(Unit("source", file, language_of(file), stamp=file_stamp) for file, file_stamp in source_files)
        continue
      kind = _kind_of(match)
      if kind is None:
        raise ConfigError(key, f"{match} is not a directory, .jsonl, .jsonl.gz, .parquet or known source file")
      units.append(Unit(kind, match, language_of(match) if kind == "source" else component.language,
                        component.text_field, stamp, **(rows_grouped if kind != "source" else {})))
  return units, skipped


def _repository_units(directory: str, files: list[tuple]) -> list[Unit]:
  """A directory's files as units: each directory directly under it a repository, its files in walk order;
  files directly in it stay units of their own. In the order of each one's first file."""
  root = directory.rstrip("/") + "/"
  units, repositories = [], {}
  for file, stamp in files:
    repository, slash, _ = file.removeprefix(root).partition("/")
    if not slash:
      units.append(Unit("source", file, language_of(file), stamp=stamp))
      continue
    if repository not in repositories:
      repositories[repository] = []
      units.append(repository)  # its place, filled below
    repositories[repository].append((file, stamp))
  return [Unit("repository", root + u, "", files=tuple(repositories[u])) if isinstance(u, str) else u for u in units]


# An input's matches: (path, stamp, None) for a file, (path, (), [(file, stamp), ...]) for a directory.
def _list_local(given: str, path: str, key: str) -> list[tuple]:
  if glob.has_magic(path):
    matches = sorted(glob.glob(path, recursive=True))
    if not matches:
      raise ConfigError(key, f"{given!r} ({path}) matches no file")
  elif os.path.exists(path):
    matches = [path]
  else:
    raise ConfigError(key, f"{given!r}: {path} does not exist")
  return [(m, (), [(f, ()) for f in _walk(m)] if os.path.isdir(m) else None) for m in matches]


def _list_url(given: str, url: str, key: str) -> list[tuple]:
  storage.check_bucket(url, key)
  fs, root = fsspec.core.url_to_fs(url)
  scheme = parse.urlparse(url).scheme
  if glob.has_magic(root):
    infos = fs.glob(root.rstrip("/"), detail=True)
    files = sorted((name, info) for name, info in infos.items() if info.get("type") == "file")
    if not files:
      raise ConfigError(key, f"{given!r} ({url}) matches no object")
    return [(f"{scheme}://{name}", _stamp(info), None) for name, info in files]
  root = root.rstrip("/")
  try:
    info = fs.info(root)
  except FileNotFoundError:
    info = None
  if info is not None and info.get("type") == "file":
    return [(url, _stamp(info), None)]
  # A prefix: the objects under it, as a local walk of the same tree would list them.
  found = {name: info for name, info in fs.find(root, detail=True).items()
           if info.get("type") == "file" and not name.endswith("/")}
  if not found:
    raise ConfigError(key, f"{given!r}: {url}: no such object, nor objects under it")
  files = []
  for name, info in found.items():
    parts = posixpath.relpath(name, root).split("/")
    if any(d.startswith(".") or d in SKIPPED_DIRS for d in parts[:-1]):
      continue
    order = tuple((1, d) for d in parts[:-1]) + ((0, parts[-1]),)  # a directory's files before its subdirectories
    files.append((order, f"{scheme}://{name}", _stamp(info)))
  return [(url, (), [(file, stamp) for _, file, stamp in sorted(files)])]


def _stamp(info: dict) -> tuple:
  """What changes when an object is rewritten: its size and its generation (GCS) or ETag (S3)."""
  version = info.get("generation") or info.get("ETag") or info.get("etag") or info.get("mtime") or ""
  return int(info.get("size") or 0), str(version)


def _walk(directory: str) -> Iterator[str]:
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
    for name in sorted(files):
      yield os.path.join(root, name)


@contextlib.contextmanager
def _open(path: str):
  """A unit's file, binary, local or on a bucket."""
  with (fsspec.open(path, "rb") if storage.is_url(path) else open(path, "rb")) as f:
    yield f


def read_unit(unit: Unit, skipped: collections.Counter, *, skip_corrupt: bool,
              fallback_encoding: str | None = None) -> Iterator[RawDocument]:
  """The documents of one unit in file order; counts what it skips (and decodes by the fallback) in `skipped`."""
  if unit.kind == "source":
    yield from _read_source(unit, skipped, fallback_encoding)
  elif unit.kind == "repository":
    root = unit.path + "/"
    for file, stamp in unit.files:
      for doc in _read_source(Unit("source", file, language_of(file), stamp=stamp), skipped, fallback_encoding):
        yield dataclasses.replace(doc, repository=unit.path, path=file.removeprefix(root))
  elif unit.kind == "jsonl":
    yield from _read_jsonl(unit, skipped, skip_corrupt)
  else:
    yield from _read_parquet(unit, skipped, skip_corrupt)


def _read_source(unit: Unit, skipped: collections.Counter, fallback_encoding: str | None) -> Iterator[RawDocument]:
  with _open(unit.path) as f:
    data = f.read()
  if b"\0" in data[:8192]:
    skipped["binary_files"] += 1
    return
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = _decode_fallback(data, fallback_encoding)
    if text is None:
      skipped["undecodable_files"] += 1
      return
    skipped["fallback_decoded_files"] += 1
  yield RawDocument(text.removeprefix("\ufeff"), unit.language, unit.path)


def _decode_fallback(data: bytes, encoding: str | None) -> str | None:
  """`data` decoded with `encoding`, or None: no fallback, bytes it does not map, or control characters."""
  if encoding is None:
    return None
  try:
    text = data.decode(encoding)
  except UnicodeDecodeError:
    return None
  return None if _CONTROL_CHARACTERS.search(text) else text


def _corrupt(where: str, message: str, skip_corrupt: bool, skipped: collections.Counter, what: str) -> None:
  if not skip_corrupt:
    raise CorruptInputError(where, f"{message} (to count and skip it, set "
                            "config.data.prepare.skip_corrupt_records=True, or pass --skip-corrupt-records to "
                            "`pretrain prepare --input`)")
  skipped[what] += 1


def _read_jsonl(unit: Unit, skipped: collections.Counter, skip_corrupt: bool) -> Iterator[RawDocument]:
  line_number = 0
  try:
    with _open(unit.path) as raw, (gzip.GzipFile(fileobj=raw) if unit.path.endswith(".gz") else raw) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          text = row[unit.text_field]
          if not isinstance(text, str):
            raise TypeError(f"field {unit.text_field!r} is {type(text).__name__}, not a string")
          text.encode("utf-8")  # a lone surrogate from a "\ud800" escape would break the tokenizer
        except (ValueError, KeyError, TypeError) as e:
          reason = f"no field {e}" if isinstance(e, KeyError) else str(e)
          _corrupt(f"{unit.path}:{line_number}", f"corrupt JSONL line: {reason}", skip_corrupt, skipped,
                   "corrupt_records")
          continue
        language = unit.language or str(row.get("language") or "unknown")
        yield _row_document(unit, text, language, f"{unit.path}:{line_number}", row.get(unit.repository_field),
                            row.get(unit.path_field))
  except (OSError, EOFError, zlib.error) as e:  # unreadable, or a truncated or damaged .gz
    _corrupt(f"{unit.path}:{line_number + 1}", f"unreadable: {e}", skip_corrupt, skipped, "corrupt_files")


def _read_parquet(unit: Unit, skipped: collections.Counter, skip_corrupt: bool) -> Iterator[RawDocument]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  row = 0
  raw = None
  try:
    raw = fsspec.open(unit.path, "rb").open() if storage.is_url(unit.path) else unit.path
    parquet = pq.ParquetFile(raw)
    names = parquet.schema_arrow.names
    if unit.text_field not in names:
      raise CorruptInputError(unit.path, f"no column {unit.text_field!r}; columns: {', '.join(names)}")
    wanted = [unit.text_field] + [c for c in ("language",) if not unit.language] + [
        c for c in (unit.repository_field, unit.path_field) if unit.repository_field]
    columns = [c for c in dict.fromkeys(wanted) if c in names]
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
      table = {c: batch.column(i).to_pylist() for i, c in enumerate(columns)}
      for i, text in enumerate(table[unit.text_field]):
        language, repository, path = (table[c][i] if c in table else None
                                      for c in ("language", unit.repository_field, unit.path_field))
        if isinstance(text, str):
          yield _row_document(unit, text, unit.language or str(language or "unknown"), f"{unit.path}#{row}",
                              repository, path)
        else:
          _corrupt(f"{unit.path}#{row}", f"column {unit.text_field!r} is {text!r}, not a string", skip_corrupt,
                   skipped, "corrupt_records")
        row += 1
  except (OSError, pa.ArrowException) as e:
    _corrupt(f"{unit.path}#{row}", f"unreadable Parquet: {e}", skip_corrupt, skipped, "corrupt_files")
  finally:
    if raw is not None and not isinstance(raw, str):
      raw.close()


def _row_document(unit: Unit, text: str, language: str, source: str, repository, path) -> RawDocument:
  """A JSONL or Parquet row's document; marked with its repository when the unit groups them and the row names
  one (a row without is a document of its own)."""
  if not unit.repository_field or repository in (None, ""):
    return RawDocument(text, language, source)
  return RawDocument(text, language, source, repository=str(repository), path="" if path is None else str(path))


def repository_document(unit: Unit, files: list[RawDocument]) -> RawDocument:
  """One repository's files as one document: in path order (then order read), each after a comment naming its
  path in its language; of the language most of its characters are in."""
  files = sorted(files, key=lambda f: f.path)  # stable: equal paths keep the order read
  characters = collections.Counter()
  for f in files:
    characters[f.language] += len(f.text)
  language = min(characters, key=lambda lang: (-characters[lang], lang))
  parts = []
  for f in files:
    parts += [path_comment(f.language, f.path), "\n", f.text, "" if f.text.endswith("\n") else "\n"]
  text = "".join(parts)
  where = files[0].repository if unit.kind == "repository" else f"{unit.path}[{files[0].repository}]"
  return RawDocument(text, language, where, repository=files[0].repository)


def mixture_texts(mixture: Mixture) -> Iterator[str]:
  """Every document's text, as `prepare` reads them (same files, same order); for tokenizer training,
  which skips a corrupt record rather than stop (prepare reports it)."""
  for index in range(len(mixture.components)):
    units, _ = plan_units(mixture, index)
    for unit in units:
      for document in read_unit(unit, collections.Counter(), skip_corrupt=True):
        yield document.text
