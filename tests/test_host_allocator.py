"""host_allocator: the restart with glibc's huge-page tunable, and that XLA:CPU's buffers then fault far less."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pretrain import host_allocator

# Runs one compiled program with a 66 MiB temp buffer (16,900 4-KiB pages) 4 times; prints the
# page faults of runs 2 to 4 and the tunables it ran with.
_PROGRAM = """
import os, resource
from pretrain import host_allocator
host_allocator.reexec_tuned()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 4096), jnp.float32)
compiled = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(x, 0) * 2, 1).sum()).lower(x).compile()
assert compiled.memory_analysis().temp_size_in_bytes > 64 << 20  # beyond one glibc thread heap: an mmap
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  compiled(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[1:], os.environ.get("GLIBC_TUNABLES", "-"))
"""


def test_environment_adds_the_tunable_once_and_keeps_the_users_own():
  environment = host_allocator.tuned_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                                 applicable=True)
  assert environment["PATH"] == "/bin"
  assert environment["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert environment["PRETRAIN_HOST_MALLOC"] == "1"
  assert host_allocator.tuned_environment(environment, applicable=True) is None  # no second restart
  assert host_allocator.tuned_environment({}, applicable=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert host_allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, applicable=True) is None
  assert host_allocator.tuned_environment({"PRETRAIN_HOST_MALLOC": "0"}, applicable=True) is None
  assert host_allocator.tuned_environment({}, applicable=False) is None


def _run_program(**environment) -> tuple[list[int], str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("PRETRAIN_HOST_MALLOC", "GLIBC_TUNABLES")}
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env={**env, **environment}, capture_output=True,
                       text=True, check=True, timeout=300)
  *faults, tunables = out.stdout.split()
  return [int(f) for f in faults], tunables, out.stderr


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or host_allocator.accelerator_present()
                    or not host_allocator.huge_pages_on_request(), reason="glibc on a CPU host with huge pages")
def test_restarted_process_faults_its_xla_buffers_in_by_huge_pages():
  faults, tunables, log = _run_program()
  assert tunables == "glibc.malloc.hugetlb=1"
  # One line says it happened and how to turn it off.
  assert log.count("pretrain: restarting once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == 1
  assert "PRETRAIN_HOST_MALLOC=0 turns this off" in log
  untuned_faults, untuned_tunables, untuned_log = _run_program(PRETRAIN_HOST_MALLOC="0")
  assert untuned_tunables == "-" and "restarting" not in untuned_log
  assert min(untuned_faults) > 16_000  # glibc's default: the buffer mmapped afresh and faulted page by page
  assert max(faults) < 4_000  # ~600-1,100 here: 2 MiB faults for the buffer, small ones elsewhere
