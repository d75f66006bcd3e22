"""One run per work directory: `<workdir>/RUN_LOCK`, held from start-up to exit.

Two trainers on one work directory would race on the same checkpoint step and both append to
metrics.jsonl. `hold` creates the lock file, a JSON record of its owner (host, pid, start time,
command line, a random token, its last heartbeat), only if it does not exist yet, and removes it at
exit if it is still the one it wrote. A second run is refused with one line naming the owner.

Creating only if absent, on each kind of work directory:
  local (and NFS): the record is written to a temporary sibling and hard-linked to RUN_LOCK, which
    fails if RUN_LOCK exists (readers never see a half-written lock); where the filesystem has no
    hard links, `open(O_CREAT | O_EXCL)`.
  gs://: an upload with the precondition ifGenerationMatch=0 (google-cloud-storage).
  s3://: a PUT with `If-None-Match: *` (botocore; AWS S3 since 2024-08, as do MinIO and Ceph).
Every later write (a heartbeat, a takeover, the removal) is conditional on the lock being unchanged
since it was read: on a bucket by generation (ifGenerationMatch) or ETag (If-Match); locally by the
record's bytes, checked under a `RUN_LOCK.takeover-<token>` file created with O_EXCL, so of two runs
taking over the same stale lock only one does, and a heartbeat never overwrites a lock taken over.

Heartbeat: while the lock is held, a daemon thread of process 0 rewrites the record every
`refresh_seconds` with a new `heartbeat` time. When the lock has been taken over meanwhile, the
thread says so in one line and stops; the run goes on (its exit leaves the other run's lock alone).

Stale, and taken over with one line saying why:
  - a lock of this host (same hostname, same pid namespace) whose process is gone, at once: its pid
    is not alive, or belongs to a later process (the pid's start time, from /proc, differs from the
    one recorded), or the host has rebooted since (another boot id);
  - any lock, of any host or container, with no heartbeat for `stale_after_seconds` (and for at least
    two of its owner's own refresh periods): a pod run SIGKILLed on one VM (preempted, OOM-killed,
    requeued) is taken over by its restart on another once that much time has passed.
A process of this host seen alive (its recorded start time matches) is never taken over, however
old its heartbeat: it is stopped or stuck, and would write again once it goes on. A record without
a `heartbeat` field does not refresh itself and so never goes stale that way.

How old a heartbeat is, is read from the store's own clock, never the writer's, so hosts' clocks
may disagree: S3's LastModified against the Date of the same response (S3's clock only); GCS's
`updated` and a local file's mtime (the file server's, on NFS) against this host's clock, which is
assumed within a few minutes of theirs (NTP; 15 minutes of slack by default). Only where the store
gives no time is the record's `heartbeat_epoch` (the writer's clock) used.

Multi-host runs: process 0 takes, refreshes and releases the lock; the others learn whether it
succeeded (`broadcast_one_to_all`), so that all raise or all continue. One process needs no jax.distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import errno
import hashlib
import itertools
import json
import os
import pathlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from urllib import parse

from pretrain import storage
from pretrain.schema import ConfigError
from pretrain.train import distributed

LOCK_FILE = "RUN_LOCK"
REFRESH_SECONDS = 60.0
STALE_AFTER_SECONDS = 900.0  # 15 heartbeats missed
_ATTEMPTS = 20  # rounds of create / read / take over before giving up on a lock that keeps changing
_RETRY_SECONDS = 0.05
_TAKEOVER_DEBRIS_SECONDS = 60  # a local takeover file this old was left by a run that died taking over
_ALIVE = "alive"  # _local_state of a process seen running on this host

_held: set[str] = set()  # tokens of the locks this process holds: its own pid is no proof of staleness


def _utc(epoch: float) -> str:
  return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Owner:
  """The record in a lock file. `process_start` (clock ticks after boot, /proc/<pid>/stat), `boot_id` and
  `pid_namespace` tell a live owner from a reused pid; None where the platform has no /proc. `heartbeat`
  (ISO-8601 UTC) and `heartbeat_epoch` (time.time()) are of the last refresh, every `refresh_seconds`."""

  host: str
  pid: int
  started: str  # ISO-8601 UTC, when the lock was taken
  argv: list[str]
  token: str
  process_start: int | None = None
  boot_id: str | None = None
  pid_namespace: str | None = None
  heartbeat: str | None = None
  heartbeat_epoch: float | None = None
  refresh_seconds: float | None = None

  @classmethod
  def this_process(cls, refresh_seconds: float | None = None) -> Owner:
    now = time.time()
    return cls(host=socket.gethostname(), pid=os.getpid(), started=_utc(now), argv=list(sys.argv),
               token=uuid.uuid4().hex, process_start=_process_start(os.getpid()), boot_id=_boot_id(),
               pid_namespace=_pid_namespace(), heartbeat=_utc(now), heartbeat_epoch=now,
               refresh_seconds=refresh_seconds)

  @classmethod
  def parse(cls, data: bytes) -> Owner:
    """The record in `data`; ValueError when it is not one (a foreign or half-written file)."""
    try:
      record = json.loads(data)
      fields = {f.name for f in dataclasses.fields(cls)}
      owner = cls(**{k: v for k, v in record.items() if k in fields})
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"not a lock record: {e}") from None
    if not isinstance(owner.pid, int) or not owner.token:
      raise ValueError("not a lock record: no pid or token")
    return owner

  def beat(self) -> Owner:
    """This record with a heartbeat of now."""
    now = time.time()
    return dataclasses.replace(self, heartbeat=_utc(now), heartbeat_epoch=now)

  def to_bytes(self) -> bytes:
    return (json.dumps(dataclasses.asdict(self), indent=2) + "\n").encode()

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host} since {self.started}"


class _Found(NamedTuple):
  """A lock as read: its bytes, the version a conditional write names, and how many seconds ago the store
  says it was written (None where it does not say)."""

  raw: bytes
  version: Any
  age: float | None


@contextlib.contextmanager
def hold(workdir, key: str = "config.train.workdir", *, log: Callable[[str], Any] = print,
         refresh_seconds: float = REFRESH_SECONDS,
         stale_after_seconds: float = STALE_AFTER_SECONDS) -> Iterator[Owner | None]:
  """Holds `<workdir>/RUN_LOCK` for the block; a ConfigError for `key` when another run holds it.

  Yields this run's lock record on process 0, None on the others. The lock is removed when the block
  ends, by an exception too (a SIGTERM the trainer turns into a clean exit included), unless another
  run has taken it over meanwhile. `log`: where the one line about a stale lock taken over goes.
  `refresh_seconds`: how often process 0 refreshes the lock's heartbeat; `stale_after_seconds`: how old
  another run's heartbeat must be for its lock to be taken over, whichever host wrote it.
  """
  if not 0 < refresh_seconds < stale_after_seconds:
    raise ValueError(f"run lock: refresh_seconds ({refresh_seconds}) must be positive and below "
                     f"stale_after_seconds ({stale_after_seconds})")
  workdir = storage.as_path(workdir)
  where = f"{workdir}/{LOCK_FILE}"
  main, processes = _process_group()
  owner, error, store, heartbeat = None, None, None, None
  if main:
    try:
      store = _store(workdir)
      owner, version = _acquire(store, workdir, where, key, log, refresh_seconds, stale_after_seconds)
      heartbeat = _Heartbeat(store, owner, version, where, refresh_seconds, log)
    except Exception as e:  # the others must hear of it whatever it is, or they wait at the broadcast
      error = e

  def let_go():
    if heartbeat is not None:
      heartbeat.stop()  # before the removal: a refresh after it would put the lock back
    if owner is not None:
      _release(store, owner, where, log)

  try:
    got = owner is not None and error is None
    if processes > 1:
      got = distributed.main_process_says(got)
  except BaseException:  # a peer lost at start-up: the lock must not outlive this run
    let_go()
    raise
  if error is not None:
    let_go()
    raise error
  if not got:
    raise ConfigError(key, f"{workdir}: process 0 did not get the run lock {where}; its error says why")
  try:
    yield owner
  finally:
    let_go()


def _process_group() -> tuple[bool, int]:
  """(this is process 0, process count); one process without asking JAX's backends when jax.distributed is off."""
  import jax

  if not jax.distributed.is_initialized():
    return True, 1
  return jax.process_index() == 0, jax.process_count()


def _acquire(store, workdir, where: str, key: str, log, refresh_seconds: float,
             stale_after_seconds: float) -> tuple[Owner, Any]:
  """This run's record and the version of the lock it wrote."""
  me = Owner.this_process(refresh_seconds)
  data = me.to_bytes()
  unreadable = None
  for _ in range(_ATTEMPTS):
    version = store.create(data)
    if version is not None:
      _held.add(me.token)
      return me, version
    found = store.read()
    if found is None:  # released between our create and our read
      continue
    try:
      owner = Owner.parse(found.raw)
    except ValueError as e:  # maybe being written (O_EXCL, no hard links): look again shortly
      unreadable = e
      time.sleep(_RETRY_SECONDS)
      continue
    if owner.token == me.token:  # our own create, retried by the client after a lost reply
      _held.add(me.token)
      return me, found.version
    age = _heartbeat_age(owner, found.age)
    limit = _stale_limit(owner, stale_after_seconds)
    state = _local_state(owner)
    reason = _stale_reason(state, age, limit)
    if reason is None:
      raise ConfigError(key, _refusal(workdir, where, owner, age, limit if state is None else None))
    version = store.replace(data, found.version)
    if version is not None:
      _held.add(me.token)
      log(f"took over the stale lock of pid {owner.pid} ({reason}) on host {owner.host} since {owner.started} "
          f"({where})")
      return me, version
    time.sleep(_RETRY_SECONDS)  # another run took it over, or is doing so: see who holds it now
  if unreadable is not None:
    raise ConfigError(key, f"{workdir} is in use: {where} exists but is no lock record ({unreadable}); "
                      "stop that run, or remove the file if it is dead")
  raise ConfigError(key, f"{where} kept changing while this run tried to take it ({_ATTEMPTS} times): "
                    "another run is starting on this work directory; run again once it has")


def _refusal(workdir, where: str, owner: Owner, age: float | None, limit: float | None) -> str:
  """The one line refusing a live lock; `limit`: after how long without a heartbeat it is taken over, None when
  never (a process seen running here)."""
  beat = "" if age is None else f", last heartbeat {age:.0f} s ago"
  message = (f"{workdir} is in use by {owner.describe()}{beat} ({where}); stop that run, or remove the file if it "
             "is dead")
  if age is not None and limit is not None:
    message += f"; it is taken over automatically after {limit:.0f} s without a heartbeat"
  return message


class _Heartbeat:
  """Refreshes the lock's heartbeat every `refresh_seconds` from a daemon thread (it must not keep a dying
  process alive) until `stop`, or until the lock turns out to be another run's. Never raises: a run is not
  stopped for its lock's sake, and a store out of reach for a while is logged once and tried again."""

  def __init__(self, store, me: Owner, version, where: str, refresh_seconds: float, log):
    self._store, self._me, self._version, self._where, self._log = store, me, version, where, log
    self._refresh_seconds = refresh_seconds
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._run, name=f"run-lock heartbeat {where}", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stopped.set()
    # No timeout: a refresh under way ends within the store's own request timeouts, and must end before the
    # lock is removed.
    self._thread.join()

  def _run(self) -> None:
    failing = False
    while not self._stopped.wait(self._refresh_seconds):
      try:
        if not self._beat():
          return
        failing = False
      except Exception as e:
        if not failing:
          self._log(f"could not refresh the heartbeat of {self._where} ({type(e).__name__}: {e}); trying again "
                    f"every {self._refresh_seconds:g} s")
        failing = True

  def _beat(self) -> bool:
    """Writes a new heartbeat; False when the lock is not this run's any more."""
    self._me = self._me.beat()
    version = self._store.replace(self._me.to_bytes(), self._version)
    if version is not None:
      self._version = version
      return True
    found = self._store.read()
    try:
      owner = None if found is None else Owner.parse(found.raw)
    except ValueError:
      owner = None
    if owner is not None and owner.token == self._me.token:
      # Our own write retried by the client after a lost reply, or a takeover in progress locally (it holds
      # the takeover file): the next refresh, against what is there now, tells.
      self._version = found.version
      return True
    whom = "something that is no lock" if found is not None else "nothing: it was removed"
    if owner is not None:
      whom = owner.describe()
    self._log(f"{self._where} was taken over by {whom}; this run no longer refreshes its heartbeat")
    return False


def _release(store, me: Owner, where: str, log) -> None:
  """Removes the lock if it is still ours. A failure is logged, never raised: it would hide the block's own error."""
  _held.discard(me.token)
  try:
    found = store.read()
    if found is None:
      log(f"{where} was gone at exit: something removed this run's lock")
      return
    try:
      token = Owner.parse(found.raw).token
    except ValueError:
      token = None
    if token != me.token or not store.delete(found.version):
      log(f"{where} was taken over by another run; left in place")
  except Exception as e:  # a bucket out of reach at exit: the lock goes stale without its heartbeat
    log(f"could not remove {where} ({type(e).__name__}: {e}); remove it once this run has stopped")


def _heartbeat_age(owner: Owner, stored_age: float | None) -> float | None:
  """Seconds since `owner` last wrote its lock: by the store's clock where it has one, else by the writer's;
  None for a record that does not refresh itself."""
  if owner.heartbeat is None:
    return None
  if stored_age is not None:
    return max(stored_age, 0.0)
  if isinstance(owner.heartbeat_epoch, int | float):
    return max(time.time() - owner.heartbeat_epoch, 0.0)
  return None


def _stale_limit(owner: Owner, stale_after_seconds: float) -> float:
  """How long `owner` may go without a heartbeat: two of its own refresh periods at least, should another run
  have been configured to refresh less often than this one expects."""
  if isinstance(owner.refresh_seconds, int | float):
    return max(stale_after_seconds, 2 * owner.refresh_seconds)
  return stale_after_seconds


def _stale_reason(state: str | None, age: float | None, limit: float) -> str | None:
  """Why the owner of a lock is gone ("dead", ...), or None when it may be alive; `state` from _local_state, `age`
  from _heartbeat_age."""
  if state == _ALIVE:
    return None
  if state is not None:
    return state
  if age is not None and age > limit:
    return f"no heartbeat for {age:.0f} s"
  return None


def _local_state(owner: Owner) -> str | None:
  """Why `owner` is gone, judged from this host's processes; _ALIVE when it runs here; None when that cannot be
  told from here (another host or container, no /proc)."""
  if owner.host != socket.gethostname():
    return None
  namespace = _pid_namespace()
  if owner.pid_namespace and namespace and owner.pid_namespace != namespace:
    return None  # another container with this hostname: its pids are not ours to look at
  boot = _boot_id()
  if owner.boot_id and boot and owner.boot_id != boot:
    return "the host has rebooted since"
  if owner.pid == os.getpid():
    # A lock naming this very process that this process does not hold: left by an earlier process with the
    # same pid (a restarted container's trainer often gets the same one), or by a release that failed.
    return _ALIVE if owner.token in _held else "not this process's lock"
  try:
    os.kill(owner.pid, 0)
  except ProcessLookupError:
    return "dead"
  except PermissionError:
    pass  # alive, another user's
  started = _process_start(owner.pid)
  if owner.process_start is None or started is None:
    return None  # a live pid, maybe reused: only the heartbeat tells
  if started != owner.process_start:
    return f"dead; pid {owner.pid} is another process now"
  return _ALIVE


def _process_start(pid: int) -> int | None:
  """When process `pid` started, in clock ticks after boot (Linux); None without /proc."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return int(stat.rpartition(")")[2].split()[19])  # field 22, counted from the state after "(comm)"


def _boot_id() -> str | None:
  try:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return None


def _pid_namespace() -> str | None:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _store(workdir):
  url = str(workdir)
  if url.startswith("gs://"):
    return _GcsStore(url)
  if url.startswith("s3://"):
    return _S3Store(url)
  return _LocalStore(pathlib.Path(url))


class _LocalStore:
  """RUN_LOCK on a local or network filesystem. Versions are (token, digest of the bytes): the token names the
  takeover file that writers of one lock take turns under, the digest tells a refreshed record from the one read.

  The directories `create` makes are removed with the lock when they hold nothing else: a run refused for
  its config, right after taking the lock, leaves no trace of itself.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / LOCK_FILE
    self._made: list[pathlib.Path] = []  # deepest first

  @staticmethod
  def _version(raw: bytes) -> tuple[str | None, str]:
    try:
      token = Owner.parse(raw).token
    except ValueError:
      token = None
    return token, hashlib.sha256(raw).hexdigest()

  def create(self, data: bytes) -> tuple[str | None, str] | None:
    for attempt in range(3):
      missing = list(itertools.takewhile(lambda d: not d.exists(), (self.path.parent, *self.path.parent.parents)))
      self.path.parent.mkdir(parents=True, exist_ok=True)
      try:
        made = self._linked(self._write_sibling(data), data)
      except FileNotFoundError:  # a run releasing its lock removed the directory just made: make it again
        if attempt == 2:
          raise
        continue
      if made:
        self._made = missing
        return self._version(data)
      return None

  def _linked(self, tmp: pathlib.Path, data: bytes) -> bool:
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
    finally:
      tmp.unlink(missing_ok=True)
    return self._create_exclusive(data)  # no hard links here (FUSE mounts, some SMB shares)

  def _create_exclusive(self, data: bytes) -> bool:
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def read(self) -> _Found | None:
    try:
      with open(self.path, "rb") as f:
        raw = f.read()
        written = os.fstat(f.fileno()).st_mtime  # of these very bytes: a replace puts another file in place
    except FileNotFoundError:
      return None
    return _Found(raw, self._version(raw), time.time() - written)

  def replace(self, data: bytes, version: tuple[str | None, str]) -> tuple[str | None, str] | None:
    """Puts `data` in place of the lock read as `version`, if it is still that; its new version, or None."""
    with self._exclusive(version[0]) as mine:
      if not mine:
        return None
      found = self.read()  # under the takeover file no one else writes this lock
      if found is None or found.version != version:
        return None
      tmp = self._write_sibling(data)
      try:
        os.replace(tmp, self.path)
      finally:
        tmp.unlink(missing_ok=True)
      return self._version(data)

  def delete(self, version: tuple[str | None, str]) -> bool:
    with self._exclusive(version[0]) as mine:
      if not mine:
        return False
      found = self.read()
      if found is None or found.version != version:
        return False
      self.path.unlink()
    for directory in self._made:  # once the takeover file is gone too
      try:
        directory.rmdir()
      except OSError:  # holds the run's files (or another run's): kept, and so are the directories above
        break
    return True

  @contextlib.contextmanager
  def _exclusive(self, token: str | None) -> Iterator[bool]:
    """Whether this process alone may write the lock of `token` for the block: the takeover file is its own."""
    marker = self.path.with_name(f"{self.path.name}.takeover-{token}")
    try:
      os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
      with contextlib.suppress(OSError):
        if time.time() - marker.stat().st_mtime > _TAKEOVER_DEBRIS_SECONDS:
          marker.unlink()
      yield False
      return
    try:
      yield True
    finally:
      marker.unlink(missing_ok=True)

  def _write_sibling(self, data: bytes) -> pathlib.Path:
    tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return tmp


def _split(url: str) -> tuple[str, str]:
  parsed = parse.urlparse(url)
  return parsed.netloc, f"{parsed.path.strip('/')}/{LOCK_FILE}".lstrip("/")


class _GcsStore:
  """RUN_LOCK on Google Cloud Storage; versions are object generations, every write conditional on one."""

  def __init__(self, url: str):
    from google.cloud import storage as gcs

    bucket, self.name = _split(url)
    self.bucket = gcs.Client().bucket(bucket)  # Application Default Credentials, or STORAGE_EMULATOR_HOST

  def create(self, data: bytes) -> int | None:
    return self._upload(data, 0)

  def read(self) -> _Found | None:
    from google.api_core import exceptions

    for _ in range(_ATTEMPTS):
      blob = self.bucket.get_blob(self.name)  # the metadata, for `updated`: a download does not carry it
      if blob is None:
        return None
      generation, updated = blob.generation, blob.updated
      try:
        raw = blob.download_as_bytes()
      except exceptions.NotFound:
        return None
      if blob.generation == generation:  # the download's own generation: the bytes are those `updated` is of
        return _Found(raw, generation, None if updated is None else time.time() - updated.timestamp())
    raise RuntimeError(f"gs://{self.bucket.name}/{self.name} kept changing while read ({_ATTEMPTS} times)")

  def replace(self, data: bytes, generation: int) -> int | None:
    return self._upload(data, generation)

  def delete(self, generation: int) -> bool:
    from google.api_core import exceptions

    try:  # fake-gcs-server ignores this precondition on delete: there only the caller's token check holds
      self.bucket.blob(self.name).delete(if_generation_match=generation)
      return True
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False

  def _upload(self, data: bytes, generation: int) -> int | None:
    from google.api_core import exceptions

    blob = self.bucket.blob(self.name)
    try:
      blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
    except exceptions.PreconditionFailed:
      return None
    return blob.generation


class _S3Store:
  """RUN_LOCK on S3; versions are ETags, every write conditional (If-None-Match: * to create, If-Match after)."""

  _LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")

  def __init__(self, url: str):
    import botocore.session

    self.bucket, self.key = _split(url)
    self.client = botocore.session.get_session().create_client("s3")  # AWS_ENDPOINT_URL, credentials as usual

  def create(self, data: bytes) -> str | None:
    response = self._call("put_object", Body=data, ContentType="application/json", IfNoneMatch="*")
    return None if response is None else response["ETag"]

  def read(self) -> _Found | None:
    try:
      response = self.client.get_object(Bucket=self.bucket, Key=self.key)
    except self.client.exceptions.NoSuchKey:
      return None
    now = datetime.datetime.now(datetime.UTC)
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    with contextlib.suppress(TypeError, ValueError):  # the response's Date: S3's clock, as LastModified is
      now = email.utils.parsedate_to_datetime(date)
    age = (now - response["LastModified"]).total_seconds()
    return _Found(response["Body"].read(), response["ETag"], age)

  def replace(self, data: bytes, etag: str) -> str | None:
    response = self._call("put_object", Body=data, ContentType="application/json", IfMatch=etag)
    return None if response is None else response["ETag"]

  def delete(self, etag: str) -> bool:
    return self._call("delete_object", IfMatch=etag) is not None  # conditional deletes: AWS S3 since 2025-09

  def _call(self, method: str, **kwargs) -> dict | None:
    """The response when the conditional request succeeded, None when its condition did not hold (a lost race)."""
    from botocore.exceptions import ClientError

    try:
      return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
    except ClientError as e:
      if e.response.get("Error", {}).get("Code") in self._LOST:
        return None
      raise
