"""glibc malloc on transparent huge pages, so XLA:CPU's step buffers cost 512x fewer page faults.

XLA:CPU allocates every execution's buffers with posix_memalign and frees them at its end;
the dense benchmark model's step (bench/train_step.py) takes an 841 MiB temp buffer. glibc
serves a request that large with a fresh mmap (from a worker thread's arena it has no
other way: such an arena grows by 64 MiB heaps), unmapped again when it is freed, so every
step faults all of it back in, 4 KiB at a time: 250,000 page faults and about 0.5 s of kernel
time per step on a 2-core host. glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35)
marks its mmaps for transparent huge pages: 2 MiB faults, about 1,600 per step and 0.2 s of
kernel time. Memory use is unchanged.

(Keeping the buffers instead, with one arena, no mmap and no trimming, removes the faults
altogether but lets the heap fragment: the same benchmark's RSS grew from 2.0 to 3.6 GiB in
30 steps.)

glibc reads tunables at process start only, so `reexec_tuned` restarts the process (same
PID, arguments and stdio) with the tunable added to GLIBC_TUNABLES. It does so on Linux
hosts without an accelerator, where XLA's buffers are host memory, and where the kernel
grants huge pages on request (transparent_hugepage `always` or `madvise`); on GPU and TPU
hosts the device buffers do not come from malloc. PRETRAIN_HOST_MALLOC=0 turns it off; a
GLIBC_TUNABLES that already sets glibc.malloc.hugetlb is kept as it is.
"""

from __future__ import annotations

import glob
import os
import pathlib
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"  # madvise(MADV_HUGEPAGE) on malloc's mmaps
_SWITCH = "PRETRAIN_HOST_MALLOC"  # "0": leave malloc alone; set to "1" once the tunable is in place
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # NVIDIA; TPU v4; TPU v5+
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")  # e.g. "always [madvise] never"


def accelerator_present() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def huge_pages_on_request() -> bool:
  """Whether the kernel backs a madvise(MADV_HUGEPAGE) region with transparent huge pages."""
  try:
    mode = _THP_MODE.read_text()
  except OSError:
    return False
  return "[always]" in mode or "[madvise]" in mode


def tuned_environment(environ: Mapping[str, str], *, applicable: bool) -> dict[str, str] | None:
  """The environment to restart with, or None where there is nothing to do."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if not applicable or environ.get(_SWITCH) in ("0", "1") or "glibc.malloc.hugetlb=" in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE, _SWITCH: "1"}


def reexec_tuned() -> None:
  """Restarts this Python process with `TUNABLE` in its environment, unless it is in place or
  not wanted (see the module docstring). Call before any work: nothing after it runs twice."""
  applicable = sys.platform == "linux" and not accelerator_present() and huge_pages_on_request()
  environment = tuned_environment(os.environ, applicable=applicable)
  if environment is None:
    return
  print(f"pretrain: restarting once with GLIBC_TUNABLES={environment['GLIBC_TUNABLES']} (XLA:CPU's step buffers "
        f"on transparent huge pages, pretrain/host_allocator.py); {_SWITCH}=0 turns this off", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the interpreter's own command line (`python -m pretrain.cli ...`, or the script).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
