"""host_allocator: the restart with glibc malloc settings, and that XLA:CPU then stops faulting its buffers in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pretrain import host_allocator

# Runs one compiled program with a 66 MiB temp buffer twice; prints the second run's page faults.
_PROGRAM = """
import os, resource
from pretrain import host_allocator
host_allocator.reexec_tuned()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 4096), jnp.float32)
compiled = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(x, 0) * 2, 1).sum()).lower(x).compile()
assert compiled.memory_analysis().temp_size_in_bytes > 64 << 20  # beyond one glibc thread heap
compiled(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
compiled(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, os.environ.get("MALLOC_ARENA_MAX"))
"""


def test_environment_adds_the_settings_once_and_keeps_the_users_own():
  environment = host_allocator.tuned_environment({"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}, accelerator=False)
  if sys.platform != "linux":
    assert environment is None
    return
  assert environment["PATH"] == "/bin"
  assert environment["MALLOC_ARENA_MAX"] == "4"  # the user's value wins
  assert environment["MALLOC_MMAP_MAX_"] == "0"
  assert environment["PRETRAIN_HOST_MALLOC"] == "1"
  assert host_allocator.tuned_environment(environment, accelerator=False) is None  # no second restart
  assert host_allocator.tuned_environment({"PRETRAIN_HOST_MALLOC": "0"}, accelerator=False) is None
  assert host_allocator.tuned_environment({}, accelerator=True) is None


def _run_program(**environment) -> tuple[int, str]:
  env = {k: v for k, v in os.environ.items() if k != "PRETRAIN_HOST_MALLOC" and not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env={**env, **environment}, capture_output=True,
                       text=True, check=True, timeout=300)
  faults, arena_max = out.stdout.split()
  return int(faults), arena_max


@pytest.mark.skipif(sys.platform != "linux" or host_allocator.accelerator_present(), reason="glibc, CPU hosts")
def test_restarted_process_reuses_xla_buffers_instead_of_faulting_them_in():
  faults, arena_max = _run_program()
  assert arena_max == "1"
  assert faults < 1000  # the 66 MiB buffer is 16,900 pages; it comes back from the heap
  untuned_faults, untuned_arena_max = _run_program(PRETRAIN_HOST_MALLOC="0")
  assert untuned_arena_max == "None"
  assert untuned_faults > 16_000  # glibc's default: a fresh mmap every run
