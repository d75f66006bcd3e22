"""s3:// work directories for Orbax, which writes arrays to a bucket only through tensorstore's gcs driver.

Orbax 0.12 builds a tensorstore kvstore from a checkpoint directory in three private functions of
`tensorstore_utils` and `gcs_utils`: `gs://` goes to the gcs driver, anything else is taken for a local
path (google/orbax#359; the pull request adding S3, #2739, is not merged). `install()` wraps those three
so that an `s3://` directory goes to tensorstore's s3 driver, as `storage.kvstore` spells it, and leaves
every other path to Orbax as before. Everything else Orbax does on S3 goes through `epath` (fsspec's
s3fs) already; S3 has no directory rename, so a checkpoint on S3 is committed as on GCS, by a
commit_success.txt written last (`atomicity_options`).

Importing this module installs the wrappers (every reader and writer of Orbax checkpoints imports it
for `atomicity_options`). The wrapped functions are checked first: an Orbax whose internals moved
makes an s3:// directory one clear error (`unsupported_reason`), never a checkpoint written elsewhere.
"""

from __future__ import annotations

import functools

import orbax.checkpoint as ocp

from pretrain import storage
from pretrain.schema import ConfigError

S3 = "s3://"


def unsupported_reason() -> str | None:
  """Why this Orbax cannot be taught S3 (its internals are not the ones wrapped here), or None."""
  try:
    _modules()
  except (ImportError, AttributeError) as e:
    return (f"orbax-checkpoint {ocp.__version__} no longer has the functions pretrain wraps to write arrays to "
            f"S3 ({e}); use a gs:// or local work directory, or the orbax-checkpoint version in pyproject.toml")
  return None


def atomicity_options(directory) -> ocp.options.AtomicityOptions | None:
  """Commit files on S3 (no atomic rename there); Orbax's own choice elsewhere."""
  if str(directory).startswith(S3):
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
  return None


def check(directory, key: str) -> None:
  """A ConfigError for `key` when `directory` is on S3 and this Orbax cannot write there."""
  if str(directory).startswith(S3) and unsupported_reason():
    raise ConfigError(key, f"{directory}: {unsupported_reason()}")


@functools.cache
def install() -> None:
  """Routes s3:// checkpoint directories to tensorstore's s3 driver; idempotent."""
  if unsupported_reason():
    return
  tensorstore_utils, gcs_utils = _modules()
  use_gcs_driver, normalize_path = tensorstore_utils._use_gcs_driver, tensorstore_utils._normalize_path
  get_kvstore_for_gcs = gcs_utils.get_kvstore_for_gcs

  def s3_or_gcs_driver(directory: str) -> bool:
    return directory.startswith(S3) or use_gcs_driver(directory)

  def s3_or_gcs_kvstore(path) -> dict:
    return storage.kvstore(path) if str(path).startswith(S3) else get_kvstore_for_gcs(path)

  def normalized(path: str) -> str:  # os.path.normpath turns s3://b into s3:/b; Orbax mends only gs:/
    return normalize_path(path).replace("s3:/", S3, 1) if path.startswith(S3) else normalize_path(path)

  # The kvstore builders take their "gcs" branch for a bucket, and that branch asks get_kvstore_for_gcs
  # for the base spec: for s3:// it gets the s3 driver's.
  tensorstore_utils._use_gcs_driver = s3_or_gcs_driver
  gcs_utils.get_kvstore_for_gcs = s3_or_gcs_kvstore
  tensorstore_utils._normalize_path = normalized


def _modules():
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils

  for module, name in ((tensorstore_utils, "_use_gcs_driver"), (tensorstore_utils, "_normalize_path"),
                       (gcs_utils, "get_kvstore_for_gcs")):
    if not callable(getattr(module, name)):
      raise AttributeError(f"{module.__name__}.{name} is not a function")
  return tensorstore_utils, gcs_utils


install()
