"""Running untrusted, model-written Python programs: each in its own process and fresh temporary
directory (deleted afterwards), under resource limits, without network where the host allows,
with stdin closed and a minimal environment, killed at a wall-clock timeout.

Containment, strongest first; `best_isolation()` names the best this host has, `available(name)` checks one:
- "bubblewrap": `bwrap` with every namespace unshared (user, pid, network, ipc, uts, cgroup), the file
  system read-only but for the work directory, a private /tmp.
- "unshare": util-linux `unshare` into new user, pid, mount and network namespaces: no network (a
  namespace with only a loopback, down), only its own processes visible, the host's files under the
  uid's permissions.
- "rlimits only": neither works (e.g. a container whose seccomp filter forbids namespaces): the
  limits below, and an unprivileged uid when we are root; the program has the host's network.
firejail is not used: it runs programs only as users with a passwd entry that /etc/firejail/firejail.users
lists, and we give each program a uid of its own (below), which has neither.

In every case the limits are set by a small wrapper inside the sandbox (`_WRAPPER`), on itself, before
the program runs: CPU seconds, address space, processes, file size, no core dumps.

Fork bombs. RLIMIT_NPROC counts a uid's processes, and the kernel does not enforce it for root, not even
for root mapped into a user namespace (still uid 0 outside it). So when we are root each program gets
a uid of its own (from `UIDS`): its process limit is its own, no neighbour's fork bomb uses it up, and
afterwards every process of that uid is killed, wherever it went (a new session, a pid namespace).
Inside a user namespace the count is per namespace, so there a program has a limit of its own even
when we are not root; with "rlimits only" and not root, all programs share ours.

What the limits do not bound: RLIMIT_AS is per process, so a program may hold up to processes x
memory bytes; and RLIMIT_FSIZE is per file, so a program may write files until its time is up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

ISOLATIONS = ("bubblewrap", "unshare", "rlimits only")
UIDS = range(2**30, 2**31 - 1)  # programs' uids when we are root: far above real users' (bwrap wants < 2**31)
STATUS_CHARS = 200


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program resource limits, set inside the sandbox as soft and hard limits: the program cannot raise them."""
  cpu_s: int = 30
  memory_bytes: int = 1 << 30  # address space: a 10 GB allocation fails with MemoryError
  processes: int = 16  # processes and threads; with user namespaces or our own uid, this program's alone
  file_bytes: int = 16 << 20  # any one file the program writes; a larger write fails with EFBIG


@dataclasses.dataclass(frozen=True)
class Outcome:
  passed: bool  # exited 0 within the time limit
  status: str  # "passed", "timed out", "failed: <last line of stderr>", "failed: killed by SIGXCPU", ...
  isolation: str  # one of ISOLATIONS
  seconds: float  # wall-clock


# Runs inside the sandbox as `python -c _WRAPPER CPU AS NPROC FSIZE`: limits itself, then runs
# program.py as __main__ in this same interpreter (one interpreter start per program).
_WRAPPER = """
import os, resource, runpy, sys
names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE")
for name, value in zip(names, [*map(int, sys.argv[1:]), 0]):
  # The CPU limit's hard value a second later: SIGXCPU first (its name in the status), then SIGKILL.
  resource.setrlimit(getattr(resource, name), (value, value + (name == "RLIMIT_CPU")))
# A pid namespace's init (pid 1 under unshare) is immune to default-action signals such as the CPU
# limit's SIGXCPU, so there the program runs in a child, whose end we pass on as a shell would.
if os.getpid() == 1 and os.fork():
  code = os.waitstatus_to_exitcode(os.wait()[1])
  sys.exit(code if code >= 0 else 128 - code)
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


def run(program: str, timeout_s: float, limits: Limits = Limits(), isolation: str | None = None) -> Outcome:
  """Runs `program` (Python source) in the sandbox; `isolation` defaults to the best available."""
  isolation = isolation or best_isolation()
  start = time.monotonic()
  with (_program_uid() as uid,
        tempfile.TemporaryDirectory(prefix="pretrain-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as stderr):
    (pathlib.Path(workdir) / "program.py").write_text(program)
    if uid is not None:
      os.chown(workdir, uid, uid)
    limit_args = [str(v) for v in (limits.cpu_s, limits.memory_bytes, limits.processes, limits.file_bytes)]
    command = [*_isolation_prefix(isolation, workdir), _interpreter(), "-s", "-c", _WRAPPER, *limit_args]
    process = subprocess.Popen(
        command, cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=stderr, start_new_session=True, **_as_user(uid))
    try:
      returncode = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
      returncode = None
    finally:
      # Whatever the program left behind: its process group, and (as root) everything of its uid.
      with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      if uid is not None:
        _kill_all_processes_of(uid)
    stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
    tail = stderr.read().decode(errors="replace")
  status = _status(returncode, tail)
  return Outcome(status == "passed", status, isolation, time.monotonic() - start)


def run_all(programs: Sequence[str], timeout_s: float, limits: Limits = Limits(), workers: int | None = None,
            isolation: str | None = None) -> list[Outcome]:
  """`run` on each program, `workers` (default: the host's cores) at a time; outcomes in order."""
  isolation = isolation or best_isolation()
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    return list(pool.map(lambda program: run(program, timeout_s, limits, isolation), programs))


def available(isolation: str) -> bool:
  """Whether `isolation` works here: its tool is installed and a trivial program runs under it."""
  return _probe(isolation) == "passed"


def best_isolation() -> str:
  """The strongest of ISOLATIONS that works on this host."""
  for isolation in ISOLATIONS:
    if available(isolation):
      return isolation
  # Even "rlimits only" fails when, say, the temporary directory lies where the programs' uid cannot go.
  raise RuntimeError(f"no sandbox runs a trivial program here: {[(i, _probe(i)) for i in ISOLATIONS]}")


@functools.cache
def _probe(isolation: str) -> str:
  if isolation not in ISOLATIONS:
    raise ValueError(f"unknown isolation {isolation!r}; one of {', '.join(ISOLATIONS)}")
  tool = {"bubblewrap": "bwrap", "unshare": "unshare"}.get(isolation)
  if tool and not shutil.which(tool):
    return f"{tool} is not installed"
  return run("import sys", timeout_s=60, isolation=isolation).status


def _isolation_prefix(isolation: str, workdir: str) -> list[str]:
  if isolation == "bubblewrap":
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", workdir, workdir, "--chdir", workdir, "--unshare-all", "--die-with-parent", "--"]
  if isolation == "unshare":
    return ["unshare", "--user", "--map-current-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--"]
  if isolation == "rlimits only":
    return []
  raise ValueError(f"unknown isolation {isolation!r}; one of {', '.join(ISOLATIONS)}")


def _environment(workdir: str) -> dict[str, str]:
  # Nothing of ours leaks in (tokens, paths); temporary files go to the work directory, deleted afterwards.
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
          "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _status(returncode: int | None, stderr_tail: str) -> str:
  if returncode is None:
    return "timed out"
  if returncode == 0:
    return "passed"
  # Killed by a signal: negative here, 128 + the signal from bwrap and from _WRAPPER as pid 1 (where a
  # program's own exit status above 128 reads the same; it failed either way).
  number = -returncode if returncode < 0 else returncode - 128
  if number in signal.valid_signals():
    return f"failed: killed by {signal.Signals(number).name}"
  lines = [line for line in stderr_tail.splitlines() if line.strip()]
  return f"failed: {lines[-1].strip() if lines else f'exit status {returncode}'}"[:STATUS_CHARS]


# --- When we are root: a uid of its own per program ------------------------------------------------------

_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


@contextlib.contextmanager
def _program_uid() -> Iterator[int | None]:
  """A uid for one program, which no running program has (None when we are not root: programs run as us).

  Drawn at random from UIDS rather than counted from its start, so that two evaluations on one host do
  not share uids, and a uid does not come back while its last program's orphaned zombies (the host's init
  reaps them, eventually) still count against its process limit.
  """
  if os.geteuid() != 0:
    yield None
    return
  with _uids_lock:
    uid = UIDS[secrets.randbelow(len(UIDS))]
    while uid in _uids_in_use:
      uid = UIDS[secrets.randbelow(len(UIDS))]
    _uids_in_use.add(uid)
  try:
    yield uid
  finally:
    with _uids_lock:
      _uids_in_use.discard(uid)


def _as_user(uid: int | None) -> dict:
  """Popen arguments that run the child as `uid` (set in the child after fork, no preexec_fn)."""
  return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


def _kill_all_processes_of(uid: int) -> None:
  # kill(-1) signals every process the caller may signal: run as `uid`, all of that uid's.
  subprocess.run(_kill_all_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"}, check=False, **_as_user(uid))


@functools.cache
def _kill_all_command() -> list[str]:
  kill = shutil.which("kill", path="/usr/bin:/bin")  # procps; slim container images may lack it
  return [kill, "-9", "-1"] if kill else [_interpreter(), "-S", "-c", "import os; os.kill(-1, 9)"]


@functools.cache
def _interpreter() -> str:
  """A Python the programs' uid can run: ours if it can (as root, ours may sit in root's 0700 home)."""
  candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
  with _program_uid() as uid:
    for python in filter(None, candidates):
      with contextlib.suppress(OSError):  # PermissionError: not executable by uid
        probe = subprocess.run([python, "-c", "pass"], stdin=subprocess.DEVNULL, capture_output=True, cwd="/",
                               env={"PATH": "/usr/bin:/bin"}, timeout=60, check=False, **_as_user(uid))
        if probe.returncode == 0:
          return python
  raise RuntimeError(f"no Python interpreter that the sandbox's uid can run among {candidates}")
