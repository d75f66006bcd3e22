"""One run per work directory (train/run_lock.py): a second run is refused naming the owner, a stale lock of
this host is taken over at once, any host's once its heartbeat is old, a live one's heartbeat advances and stops
once another run took the lock; local, on emulated gs:// and s3:// buckets, under a real race of processes, and
across the processes of a 2-process jax.distributed pod."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pretrain import storage
from pretrain.schema import ConfigError
from pretrain.train import run_lock

# Takes the lock when the file `go` exists ("-": at once), says so, holds it until the file `release` exists.
HOLDER = textwrap.dedent("""\
    import os, pathlib, sys, time
    import jax  # imported before the start, as hold() would on its first use
    from pretrain.schema import ConfigError
    from pretrain.train import run_lock
    workdir, ready, go, release = sys.argv[1:5]
    pathlib.Path(ready).touch()
    while go != "-" and not os.path.exists(go):
      time.sleep(0.001)
    try:
      with run_lock.hold(workdir):
        print("won", flush=True)
        while not os.path.exists(release):
          time.sleep(0.01)
    except ConfigError as e:
      print("refused", e, flush=True)
    """)


def start_holder(workdir, tmp_path: pathlib.Path, name: str, go: str = "-") -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(tmp_path / f"ready-{name}"), go,
                           str(tmp_path / "release")], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def record(workdir) -> dict:
  """The lock's record, read in one request by the lock's own store (a HEAD then a GET, as s3fs reads, can
  straddle a heartbeat's replace)."""
  found = run_lock._store(storage.as_path(workdir)).read()
  assert found is not None, f"{workdir} holds no lock"
  return json.loads(found.raw)


def write_record(workdir, **changes) -> run_lock.Owner:
  """A lock file as another run would have left it: this process's record with `changes`."""
  owner = dataclasses.replace(run_lock.Owner.this_process(), **changes)
  path = storage.as_path(workdir) / run_lock.LOCK_FILE
  if not storage.is_url(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(owner.to_bytes())
  return owner


def dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def refusal(workdir, pid: int, host: str, key: str = "config.train.workdir", beat: str | None = r"\d+",
            after: float | None = None) -> str:
  """The regex of the one-line refusal naming this owner: `beat`, how many seconds ago its heartbeat was (None:
  no heartbeat); `after`, how long until it is taken over (None: never, a process seen running here)."""
  where = re.escape(str(workdir))
  beat = "" if beat is None else f", last heartbeat {beat} s ago"
  after = "" if after is None else f"; it is taken over automatically after {after:.0f} s without a heartbeat"
  return (f"^{key}: {where} is in use by pid {pid} on host {re.escape(host)} since "
          rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ{beat} \({where}/RUN_LOCK\); stop that run, or remove the file if it is "
          f"dead{re.escape(after)}$")


def refused(workdir, pid: int, host: str, key: str = "config.train.workdir", **kwargs):
  """pytest.raises for the one-line refusal naming this owner (see `refusal`)."""
  return pytest.raises(ConfigError, match=refusal(workdir, pid, host, key, **kwargs))


def backdate(workdir, seconds: float) -> None:
  """Makes the local lock look last written `seconds` ago, by the clock that counts: the file's mtime."""
  path = pathlib.Path(workdir) / run_lock.LOCK_FILE
  then = time.time() - seconds
  os.utime(path, (then, then))


def heartbeat_threads() -> list[str]:
  import threading

  return [t.name for t in threading.enumerate() if t.name.startswith("run-lock heartbeat")]


def wait_for(condition, what: str, timeout: float = 20):
  deadline = time.time() + timeout
  while not (result := condition()):
    assert time.time() < deadline, f"no {what} within {timeout} s"
    time.sleep(0.02)
  return result


def test_a_second_run_is_refused_naming_the_owner_and_the_lock_goes_at_exit(tmp_path):
  workdir = tmp_path / "run"  # not there yet: the lock is the work directory's first file
  with run_lock.hold(workdir) as owner:
    found = record(workdir)
    assert found["pid"] == os.getpid() and found["host"] == socket.gethostname() and found["argv"] == sys.argv
    assert found["token"] == owner.token and found["started"].endswith("Z")
    with refused(workdir, os.getpid(), socket.gethostname(), key="the.key"):
      with run_lock.hold(workdir, key="the.key"):
        pass
    assert record(workdir)["token"] == owner.token  # the refused run leaves the lock alone
  assert not workdir.exists()  # the lock gone, no temporary sibling left, and so the directory made for it
  with pytest.raises(RuntimeError, match="boom"):
    with run_lock.hold(workdir):
      raise RuntimeError("boom")
  assert not (workdir / run_lock.LOCK_FILE).exists()


def test_directories_made_for_the_lock_go_with_it_unless_the_run_wrote_there(tmp_path):
  with run_lock.hold(tmp_path / "a" / "b" / "run"):
    assert (tmp_path / "a" / "b" / "run" / run_lock.LOCK_FILE).exists()
  assert list(tmp_path.iterdir()) == []  # a run refused for its config right after leaves no trace
  with run_lock.hold(tmp_path / "a" / "run"):
    (tmp_path / "a" / "run" / "metrics.jsonl").touch()
  assert sorted(p.name for p in (tmp_path / "a" / "run").iterdir()) == ["metrics.jsonl"]
  (tmp_path / "kept").mkdir()
  with run_lock.hold(tmp_path / "kept"):
    pass
  assert (tmp_path / "kept").is_dir()  # there before the run


def test_a_live_run_in_another_process_is_refused_and_once_sigkilled_its_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  holder = start_holder(workdir, tmp_path, "holder")
  try:
    assert holder.stdout.readline().strip() == "won"
    with refused(workdir, holder.pid, socket.gethostname()):
      with run_lock.hold(workdir):
        pass
    backdate(workdir, 1000)  # stopped or stuck, but seen running here: it would go on writing, so still refused
    with refused(workdir, holder.pid, socket.gethostname(), beat="1000"):
      with run_lock.hold(workdir):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert record(workdir)["pid"] == holder.pid  # a SIGKILLed run leaves its lock
    logged = []
    with run_lock.hold(workdir, log=logged.append) as owner:
      assert record(workdir)["token"] == owner.token
    assert logged == [f"took over the stale lock of pid {holder.pid} (dead) on host {socket.gethostname()} since "
                      f"{logged[0].split(' since ')[1].split(' ')[0]} ({workdir}/RUN_LOCK)"]
  finally:
    holder.kill()
    holder.communicate()


@pytest.mark.parametrize("changes, reason", [
    ({"pid": None}, "dead"),  # pid filled in below: a process started and waited for
    ({"process_start": -1}, "dead; pid {pid} is another process now"),  # this live pid, started later than recorded
    ({"boot_id": "another-boot"}, "the host has rebooted since"),
    ({"pid": os.getpid(), "token": "an-earlier-process"}, "not this process's lock"),  # a restarted container's pid
])
def test_a_stale_lock_of_this_host_is_taken_over_saying_why(tmp_path, changes, reason):
  if changes.get("pid", 0) is None:
    changes = dict(changes, pid=dead_pid())
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    changes = {"pid": sleeper.pid} | changes
    stale = write_record(tmp_path, **changes)
    logged = []
    with run_lock.hold(tmp_path, log=logged.append) as owner:
      assert record(tmp_path)["token"] == owner.token != stale.token
    assert logged[0].startswith(f"took over the stale lock of pid {stale.pid} ({reason.format(pid=stale.pid)}) on ")
  finally:
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize("changes", [
    {"host": "another-host"},  # whatever its pid
    {"pid_namespace": "pid:[1]"},  # another container with this hostname: its pids are not visible here
])
def test_a_lock_this_host_cannot_check_is_refused_while_its_heartbeat_is_fresh_and_taken_over_once_old(tmp_path,
                                                                                                      changes):
  stale = write_record(tmp_path, pid=dead_pid(), **changes)
  with refused(tmp_path, stale.pid, stale.host, beat=r"\d", after=900):
    with run_lock.hold(tmp_path):
      pass
  assert record(tmp_path)["token"] == stale.token
  backdate(tmp_path, 899)  # a restart on another VM, or in a new container, before the stale period is out
  with refused(tmp_path, stale.pid, stale.host, beat="899", after=900):
    with run_lock.hold(tmp_path):
      pass
  backdate(tmp_path, 1000)
  logged = []
  with run_lock.hold(tmp_path, log=logged.append) as owner:
    assert record(tmp_path)["token"] == owner.token
  assert logged == [f"took over the stale lock of pid {stale.pid} (no heartbeat for 1000 s) on host {stale.host} "
                    f"since {stale.started} ({tmp_path}/RUN_LOCK)"]


@pytest.mark.parametrize("changes, seconds, message", [
    # The writer's clock an hour behind (or its record copied): the file's mtime, the store's clock, counts.
    ({"heartbeat_epoch": time.time() - 3600, "heartbeat": "2000-01-01T00:00:00Z"}, 0, {"beat": r"\d", "after": 900}),
    # A record that does not refresh itself (no heartbeat field) never goes stale that way.
    ({"heartbeat": None, "heartbeat_epoch": None}, 10**6, {"beat": None}),
    # Its owner refreshes every 1000 s: two of its periods, not this run's 900 s.
    ({"refresh_seconds": 1000.0}, 1500, {"beat": "1500", "after": 2000}),
])
def test_a_heartbeat_is_judged_by_the_stores_clock_and_the_owners_promise(tmp_path, changes, seconds, message):
  stale = write_record(tmp_path, host="another-host", pid=dead_pid(), **changes)
  backdate(tmp_path, seconds)
  with refused(tmp_path, stale.pid, stale.host, **message):
    with run_lock.hold(tmp_path):
      pass
  assert record(tmp_path)["token"] == stale.token


def test_the_heartbeat_period_must_be_below_the_stale_period(tmp_path):
  with pytest.raises(ValueError, match=r"refresh_seconds \(5\) must be positive and below stale_after_seconds \(5\)"):
    with run_lock.hold(tmp_path, refresh_seconds=5, stale_after_seconds=5):
      pass
  assert list(tmp_path.iterdir()) == []


def test_a_held_locks_heartbeat_advances_and_stops_without_clobbering_once_another_run_took_it(tmp_path):
  logged = []
  with run_lock.hold(tmp_path, log=logged.append, refresh_seconds=0.05, stale_after_seconds=1) as owner:
    first = record(tmp_path)
    assert first["token"] == owner.token and first["heartbeat"] == first["started"] and first["refresh_seconds"] == 0.05
    later = wait_for(lambda: (r := record(tmp_path))["heartbeat_epoch"] > first["heartbeat_epoch"] and r, "heartbeat")
    assert later["heartbeat"].endswith("Z") and {**later, "heartbeat": 0, "heartbeat_epoch": 0} == {
        **first, "heartbeat": 0, "heartbeat_epoch": 0}  # only the heartbeat changes
    assert time.time() - (tmp_path / run_lock.LOCK_FILE).stat().st_mtime < 1  # the clock a reader goes by
    other = write_record(tmp_path, host="another-host", token="another-run")  # taken over meanwhile
    taken = (tmp_path / run_lock.LOCK_FILE).read_bytes()
    wait_for(lambda: not heartbeat_threads(), "stopped heartbeat")
    time.sleep(0.2)  # four refresh periods: none comes
    assert (tmp_path / run_lock.LOCK_FILE).read_bytes() == taken
  assert logged == [f"{tmp_path}/RUN_LOCK was taken over by {other.describe()}; this run no longer refreshes its "
                    "heartbeat", f"{tmp_path}/RUN_LOCK was taken over by another run; left in place"]
  assert record(tmp_path)["token"] == other.token


def test_the_heartbeat_thread_stops_before_the_lock_goes(tmp_path):
  with run_lock.hold(tmp_path, refresh_seconds=0.001, stale_after_seconds=1):  # refreshing all the time
    first = record(tmp_path)["heartbeat_epoch"]
    wait_for(lambda: record(tmp_path)["heartbeat_epoch"] > first, "heartbeat")
    assert len(heartbeat_threads()) == 1
  assert not heartbeat_threads()
  time.sleep(0.05)
  assert list(tmp_path.iterdir()) == []  # no refresh put the lock back after its removal, nor left a file behind


def test_a_store_out_of_reach_is_logged_once_and_tried_again(tmp_path, monkeypatch):
  logged = []
  failures = []
  replace = run_lock._LocalStore.replace

  def flaky(self, data, version):
    if len(failures) < 3:
      failures.append(1)
      raise OSError(errno.EIO, "Input/output error")
    return replace(self, data, version)

  monkeypatch.setattr(run_lock._LocalStore, "replace", flaky)
  with run_lock.hold(tmp_path, log=logged.append, refresh_seconds=0.02, stale_after_seconds=1):
    first = record(tmp_path)["heartbeat_epoch"]
    wait_for(lambda: record(tmp_path)["heartbeat_epoch"] > first, "heartbeat after the failures")
  assert logged == [f"could not refresh the heartbeat of {tmp_path}/RUN_LOCK (OSError: [Errno 5] Input/output "
                    "error); trying again every 0.02 s"]


def test_a_file_that_is_no_lock_record_is_refused(tmp_path):
  (tmp_path / run_lock.LOCK_FILE).write_text("not json")
  with pytest.raises(ConfigError, match="is in use: .*RUN_LOCK exists but is no lock record"):
    with run_lock.hold(tmp_path):
      pass


def test_of_two_runs_taking_over_one_stale_local_lock_only_one_does_nor_over_a_heartbeat(tmp_path):
  stale = write_record(tmp_path, pid=dead_pid())
  store = run_lock._LocalStore(tmp_path)
  seen = store.read().version
  marker = tmp_path / f"{run_lock.LOCK_FILE}.takeover-{stale.token}"
  marker.touch()  # a run in the middle of taking it over
  assert store.replace(b'{"pid": 1, "token": "a"}', seen) is None
  assert store.delete(seen) is False
  marker.unlink()
  refreshed = store.replace(stale.beat().to_bytes(), seen)  # its owner was only slow: a heartbeat after our read
  assert refreshed is not None and store.read().version == refreshed != seen
  assert store.replace(b'{"pid": 1, "token": "a"}', seen) is None  # so the takeover of what we read fails
  assert store.replace(b'{"pid": 1, "token": "a"}', refreshed) is not None
  assert store.replace(b'{"pid": 2, "token": "b"}', refreshed) is None  # the second read the same stale lock
  assert record(tmp_path)["token"] == "a" and not marker.exists()


def test_without_hard_links_the_lock_is_created_with_o_excl(tmp_path, monkeypatch):
  def no_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted", str(dst))

  monkeypatch.setattr(os, "link", no_links)  # FUSE mounts, some SMB shares
  with run_lock.hold(tmp_path) as owner:
    assert record(tmp_path)["token"] == owner.token
    with refused(tmp_path, os.getpid(), socket.gethostname()):
      with run_lock.hold(tmp_path):
        pass
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary sibling left either


def test_a_lock_taken_over_meanwhile_is_left_in_place_at_exit(tmp_path):
  logged = []
  with run_lock.hold(tmp_path, log=logged.append):
    other = write_record(tmp_path, token="another-run")
  assert record(tmp_path)["token"] == other.token
  assert logged == [f"{tmp_path}/RUN_LOCK was taken over by another run; left in place"]


def test_of_runs_starting_at_the_same_moment_exactly_one_gets_the_lock(tmp_path):
  workdir, go = tmp_path / "run", tmp_path / "go"
  runs = [start_holder(workdir, tmp_path, str(i), go=str(go)) for i in range(4)]
  try:
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(4)) and time.time() < deadline:
      time.sleep(0.01)
    go.touch()
    first = [run.stdout.readline().strip() for run in runs]
    winners = [run for run, line in zip(runs, first, strict=True) if line == "won"]
    assert len(winners) == 1, first
    for line in first:
      assert line == "won" or line.startswith(f"refused config.train.workdir: {workdir} is in use by pid "
                                              f"{winners[0].pid} on host "), line
  finally:
    (tmp_path / "release").touch()
    for run in runs:
      run.communicate(timeout=60)
  assert not (workdir / run_lock.LOCK_FILE).exists()


@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_on_a_bucket_a_second_run_is_refused_a_stale_lock_taken_over_and_the_lock_goes_at_exit(bucket, request,
                                                                                             tmp_path):
  workdir = f"{request.getfixturevalue(bucket)}/{tmp_path.name}/run"
  store = run_lock._store(workdir)  # the emulator honours the preconditions themselves, not only our checks
  assert store.create(b"first") and not store.create(b"second")
  raw, version, age = store.read()
  assert raw == b"first" and 0 <= age < 5 and not store.replace(b"x", 1 if bucket == "gcs_bucket" else '"0"')
  new = store.replace(b"second", version)
  assert new is not None and store.read()[:2] == (b"second", new)  # a replace says its version, for the next
  store.delete(store.read().version)
  assert store.read() is None

  with run_lock.hold(workdir) as owner:
    assert record(workdir)["token"] == owner.token
    with refused(workdir, os.getpid(), socket.gethostname()):
      with run_lock.hold(workdir):
        pass
  assert not storage.as_path(f"{workdir}/RUN_LOCK").exists()

  stale = write_record(workdir, pid=dead_pid())
  logged = []
  with run_lock.hold(workdir, log=logged.append) as owner:
    assert record(workdir)["token"] == owner.token
    other = write_record(workdir, token="another-run")
  assert logged[0].startswith(f"took over the stale lock of pid {stale.pid} (dead) on ")
  assert logged[1] == f"{workdir}/RUN_LOCK was taken over by another run; left in place"
  assert record(workdir)["token"] == other.token


@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_on_a_bucket_the_heartbeat_advances_stops_once_taken_over_and_an_old_one_is_taken_over(bucket, request,
                                                                                              tmp_path):
  workdir = f"{request.getfixturevalue(bucket)}/{tmp_path.name}/run"
  logged = []
  with run_lock.hold(workdir, log=logged.append, refresh_seconds=0.05, stale_after_seconds=1) as owner:
    first = record(workdir)
    wait_for(lambda: record(workdir)["heartbeat_epoch"] > first["heartbeat_epoch"], "heartbeat")
    assert record(workdir)["token"] == owner.token
    other = write_record(workdir, host="another-host", pid=dead_pid(), token="another-run")
    wait_for(lambda: not heartbeat_threads(), "stopped heartbeat")
    assert record(workdir) == json.loads(other.to_bytes())  # not clobbered
  assert logged == [f"{workdir}/RUN_LOCK was taken over by {other.describe()}; this run no longer refreshes its "
                    "heartbeat", f"{workdir}/RUN_LOCK was taken over by another run; left in place"]

  with refused(workdir, other.pid, other.host, beat=r"\d", after=900):  # by the bucket's clock, from its own write
    with run_lock.hold(workdir):
      pass
  taken = []

  def take_over():  # the bucket's clocks count in seconds: a second or two until it is more than one old
    try:
      with run_lock.hold(workdir, log=taken.append, refresh_seconds=0.05, stale_after_seconds=1):
        return True
    except ConfigError as e:
      assert re.match(refusal(workdir, other.pid, other.host, beat="[01]", after=1), str(e)), e
      return False

  wait_for(take_over, "takeover", timeout=10)
  assert re.fullmatch(rf"took over the stale lock of pid {other.pid} \(no heartbeat for \d s\) on host another-host "
                      rf"since {other.started} \({re.escape(workdir)}/RUN_LOCK\)", taken[0]), taken
  assert not storage.as_path(f"{workdir}/RUN_LOCK").exists()


# Process 0 and 1 of a pod: first while the test holds the lock, then once it has let go.
POD_PROCESS = textwrap.dedent("""\
    import json, os, pathlib, sys, time
    from pretrain.schema import ConfigError
    from pretrain.train import distributed, run_lock
    port, index, workdir, flags = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])
    distributed.initialize(distributed.ProcessGroup(f"127.0.0.1:{port}", 2, index, "flags"), peer_timeout=60)
    try:
      with run_lock.hold(workdir):
        print("entered", flush=True)
    except ConfigError as e:
      print("refused", e, flush=True)
    (flags / f"attempted-{index}").touch()
    while not (flags / "released").exists():
      time.sleep(0.01)
    with run_lock.hold(workdir) as owner:
      found = json.loads(pathlib.Path(workdir, "RUN_LOCK").read_text())
      print("held by", found["pid"], "yielded", owner and owner.pid, flush=True)
      distributed.barrier("read")  # before process 0 removes it
    distributed.barrier("released")
    print("after", pathlib.Path(workdir, "RUN_LOCK").exists(), flush=True)
    """)


@pytest.mark.slow
def test_a_pod_takes_the_lock_once_and_all_its_processes_are_refused_or_go_on_together(tmp_path):
  workdir = tmp_path / "run"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with run_lock.hold(workdir):
    pod = [subprocess.Popen([sys.executable, "-c", POD_PROCESS, str(port), str(i), str(workdir), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"attempted-{i}").exists() for i in range(2)) and time.time() < deadline:
      if any(p.poll() is not None for p in pod):
        break
      time.sleep(0.05)
  (tmp_path / "released").touch()
  outs = [p.communicate(timeout=120)[0] for p in pod]
  for p, out in zip(pod, outs, strict=True):
    assert p.returncode == 0, out
  lines = [[line for line in out.splitlines() if line.startswith(("entered", "refused", "held", "after"))]
           for out in outs]
  assert re.match(refusal(workdir, os.getpid(), socket.gethostname()), lines[0][0].removeprefix("refused "))
  assert lines[1][0] == (f"refused config.train.workdir: {workdir}: process 0 did not get the run lock "
                         f"{workdir}/RUN_LOCK; its error says why")
  assert lines[0][1] == f"held by {pod[0].pid} yielded {pod[0].pid}"
  assert lines[1][1] == f"held by {pod[0].pid} yielded None"  # process 1 took nothing, only learnt of it
  assert lines[0][2] == lines[1][2] == "after False"
