"""Paths that may be object-storage URLs: `gs://bucket/key` (Google Cloud Storage), `s3://bucket/key`, or local.

`as_path` turns either into an `etils.epath.Path`: local paths behave as `pathlib` ones (`~` expanded),
URLs go through fsspec (gcsfs, s3fs). Arrays (Orbax checkpoints, OCDBT reads) go through tensorstore's
own `gcs` and `s3` drivers, whose specs `kvstore` writes (pretrain/orbax_s3.py teaches Orbax the s3 one).
Readers that need local files (ArrayRecord shards, sentencepiece, tokenizers) read a `download`ed
copy under $PRETRAIN_CACHE/objects/ (default ~/.cache/pretrain).

Every client finds its endpoint and credentials the usual way: Application Default Credentials
for GCS, the AWS environment or config files for S3. An emulator is reached through the clients'
own variables, which `emulator_env` returns for a given URL:
  GCS: STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs), TENSORSTORE_GCS_HTTP_URL and
    GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore), FSSPEC_GCS_TOKEN=anon (gcsfs sends no credentials),
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs would ask the Storage Control gRPC API, which
    emulators lack, for the bucket's type: a 60 s timeout on every first use).
  S3: AWS_ENDPOINT_URL (botocore, s3fs), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import uuid
from urllib import parse

import fsspec
import fsspec.config
from etils import epath

from pretrain.data.config import cache_dir
from pretrain.schema import ConfigError

URL_SCHEMES = ("gs://", "s3://")

# A work directory is shared by a pod's processes and written by tensorstore as well: gcsfs's and
# s3fs's listing caches would show a process a stale directory (a new checkpoint missing, a deleted
# one still there). Explicit settings (FSSPEC_GCS_USE_LISTINGS_CACHE, ...) still win.
for _protocol in ("gcs", "s3"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(path: str | os.PathLike) -> bool:
  return str(path).startswith(URL_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path` for a local path (`~` expanded) or a gs:// or s3:// URL."""
  if is_url(path):
    return epath.Path(str(path))
  return epath.Path(os.fspath(path)).expanduser()


def local_absolute(path: str | os.PathLike) -> epath.Path:
  """`as_path`, made absolute when local (Orbax refuses relative directories); a URL as it is."""
  path = as_path(path)
  return path if is_url(path) else path.absolute()


def check_bucket(path: str | os.PathLike, key: str) -> None:
  """For a URL: its bucket exists and lets this process in; a local path passes. Otherwise a ConfigError
  for `key` naming the URL, raised before anything is written."""
  if not is_url(path):
    return
  url = str(path)
  parsed = parse.urlparse(url)
  bucket = epath.Path(f"{parsed.scheme}://{parsed.netloc}")
  try:  # a listing, not `exists`: s3fs answers a refused bucket with "does not exist"
    next(iter(bucket.iterdir()), None)
  except FileNotFoundError as e:
    raise ConfigError(key, f"{url}: bucket {bucket} does not exist") from e
  except Exception as e:  # each client raises its own errors: refused access, no endpoint
    raise ConfigError(key, f"{url}: bucket {bucket} cannot be reached or refuses access "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def kvstore(path: str | os.PathLike) -> dict:
  """The tensorstore kvstore spec of a local path, gs:// or s3:// URL (a directory's ends with /).

  S3's endpoint and region come from the AWS variables, as botocore and s3fs read them (tensorstore's s3
  driver reads neither AWS_ENDPOINT_URL nor AWS_DEFAULT_REGION); credentials from the
  environment when it has them, else by the AWS default chain (profiles, then the instance's)."""
  url = str(path)
  if not is_url(url):
    return {"driver": "file", "path": os.fspath(path)}
  parsed = parse.urlparse(url)
  key = parsed.path.lstrip("/")
  if parsed.scheme == "gs":
    return {"driver": "gcs", "bucket": parsed.netloc, "path": key}
  spec = {"driver": "s3", "bucket": parsed.netloc, "path": key}
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    spec["aws_region"] = region
  if os.environ.get("AWS_ENDPOINT_URL"):
    spec["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
  if os.environ.get("AWS_ACCESS_KEY_ID"):  # else the default chain, which logs each config file it lacks
    spec["aws_credentials"] = {"type": "environment"}
  return spec


def cache_path(url: str | os.PathLike) -> pathlib.Path:
  """Where `download` keeps its copy of `url`: $PRETRAIN_CACHE/objects/<scheme>/<bucket>/<key>."""
  parsed = parse.urlparse(str(url))
  return cache_dir() / "objects" / parsed.scheme / parsed.netloc / parsed.path.strip("/")


def download(url: str | os.PathLike, key: str) -> pathlib.Path:
  """A local copy of the object or the tree of objects under `url`, at `cache_path(url)`.

  Files already there with their object's size are kept (prepared shards and tokenizers are
  written once), so a second call costs one listing. Each file is written under a temporary name
  and renamed, so processes sharing a host may download at once. A ConfigError for `key` when the
  bucket or the objects are not there.
  """
  check_bucket(url, key)
  fs, root = fsspec.core.url_to_fs(str(url))
  root = root.rstrip("/")
  files = {name: info for name, info in fs.find(root, detail=True).items()
           if info.get("type") == "file" and not name.endswith("/")}
  if not files:
    raise ConfigError(key, f"{url}: no such object, nor objects under it")
  local = cache_path(url)
  for name, info in files.items():
    relative = posixpath.relpath(name, root)
    target = local if relative == "." else local / relative
    if target.is_file() and target.stat().st_size == info["size"]:
      continue
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
      fs.get_file(name, str(tmp))
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
  return local


def emulator_env(*, gcs: str | None = None, s3: str | None = None) -> dict[str, str]:
  """The environment that points every client at a GCS and/or S3 emulator at these URLs (http://host:port)."""
  env = {}
  if gcs:
    env.update(STORAGE_EMULATOR_HOST=gcs, TENSORSTORE_GCS_HTTP_URL=gcs, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
               FSSPEC_GCS_TOKEN="anon", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  if s3:
    env.update(AWS_ENDPOINT_URL=s3, AWS_ACCESS_KEY_ID="emulator", AWS_SECRET_ACCESS_KEY="emulator",
               AWS_DEFAULT_REGION="us-east-1")
  return env
