"""glibc malloc settings under which XLA:CPU reuses its step buffers instead of faulting them in anew.

XLA:CPU allocates every execution's buffers with posix_memalign and frees them at its end;
the dense benchmark model's step (bench/train_step.py) takes an 841 MiB temp buffer. glibc
serves such a request from its worker thread's arena, and an arena other than the main one
can only grow by 64 MiB heaps, so the request becomes a fresh mmap every step, munmapped at
its end: 250,000 page faults and about 0.5 s of kernel time (zeroing 1 GB) per 2.6 s step on
a 2-core host. With one arena, mmap disabled and no trimming, the freed buffer stays in
the heap and the next step takes it back: no faults, 10-20% more tokens/s on that host.
The cost is that the process's RSS never shrinks below its peak, which a training process
reaches every step anyway.

glibc reads these settings at process start only, so `reexec_tuned` restarts the process
(same PID, arguments and stdio) with them set. It does so on hosts without an accelerator,
where XLA's buffers are host memory; on GPU and TPU hosts the device buffers do not come
from malloc, and the setting is left to the user. PRETRAIN_HOST_MALLOC=0 turns it off; a
user's own MALLOC_* values are kept.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap, which can grow to any size
    "MALLOC_MMAP_MAX_": "0",  # large blocks come from the heap too, so a freed one can be reused
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # and is never handed back to the kernel
}
_SWITCH = "PRETRAIN_HOST_MALLOC"  # "0": leave malloc alone; set to "1" once the settings are in place
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # NVIDIA; TPU v4; TPU v5+


def accelerator_present() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def tuned_environment(environ: Mapping[str, str], *, accelerator: bool) -> dict[str, str] | None:
  """The environment to restart with, or None where there is nothing to do."""
  if sys.platform != "linux" or accelerator or environ.get(_SWITCH) in ("0", "1"):
    return None
  return {**SETTINGS, **environ, _SWITCH: "1"}


def reexec_tuned() -> None:
  """Restarts this Python process with `SETTINGS` in its environment, unless they are in place or
  not wanted (see the module docstring). Call before any work: nothing after it runs twice."""
  environment = tuned_environment(os.environ, accelerator=accelerator_present())
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the interpreter's own command line (`python -m pretrain.cli ...`, or the script).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
