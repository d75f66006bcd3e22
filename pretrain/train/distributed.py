"""Multi-host runs: JAX's multi-controller runtime, started from flags or the environment.

Every process of a pod runs the same `pretrain train`; `initialize` joins them before
any device is touched. Where the process group comes from, first match wins:

  1. flags `--coordinator HOST:PORT --num_processes N --process_id I`, or `--coordinator auto`
     (rule 3 forced: let JAX read the cluster's own metadata);
  2. the environment: PRETRAIN_COORDINATOR, PRETRAIN_NUM_PROCESSES, PRETRAIN_PROCESS_ID
     (what launch/local.sh and the Kubernetes manifests set);
  3. a cluster JAX detects itself: Cloud TPU VM pods and SLURM jobs of more than one task
     (`jax.distributed.initialize()` with no arguments reads their metadata/env);
  4. otherwise one process: nothing to initialize.

On CPU the processes' collectives go over gloo (TCP), which is how the multi-process
tests run on one machine. `peer_timeout` bounds how long a process waits for the others
at start-up and how long a lost peer goes unnoticed (the coordination service's
heartbeat): a process whose peer died exits with an error instead of hanging.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from pretrain.schema import ConfigError

ENV_COORDINATOR = "PRETRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "PRETRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "PRETRAIN_PROCESS_ID"
ENV_PEER_TIMEOUT = "PRETRAIN_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 300


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process stands; `source` says which rule above found it."""

  coordinator: str | None
  num_processes: int
  process_id: int
  source: str  # "flags", "environment", "cluster" or "single"


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            environ: dict[str, str] | None = None) -> ProcessGroup:
  """The process group the flags and environment describe; a partial or inconsistent one is an error."""
  environ = os.environ if environ is None else environ
  given = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
  source = "flags"
  if coordinator == "auto":
    return ProcessGroup(None, -1, -1, "cluster")
  if all(v is None for v in given.values()):
    given = {ENV_COORDINATOR: environ.get(ENV_COORDINATOR), ENV_NUM_PROCESSES: environ.get(ENV_NUM_PROCESSES),
             ENV_PROCESS_ID: environ.get(ENV_PROCESS_ID)}
    source = "environment"
  if all(v is None for v in given.values()):
    if _cluster_detected(environ):
      return ProcessGroup(None, -1, -1, "cluster")
    return ProcessGroup(None, 1, 0, "single")
  missing = [name for name, v in given.items() if v is None]
  if missing:
    raise ConfigError(missing[0], f"a multi-process run needs all of {', '.join(given)}; {missing[0]} is missing")
  (coord_key, coord), (count_key, count), (id_key, pid) = given.items()
  if ":" not in str(coord):
    raise ConfigError(coord_key, f"must be HOST:PORT, got {coord!r}")
  count, pid = _integer(count_key, count), _integer(id_key, pid)
  if count < 1:
    raise ConfigError(count_key, f"must be >= 1, got {count}")
  if not 0 <= pid < count:
    raise ConfigError(id_key, f"must be in [0, {count}), got {pid}")
  return ProcessGroup(str(coord), count, pid, source)


def initialize(group: ProcessGroup, *, peer_timeout: int | None = None) -> None:
  """Joins the process group (no-op for one process). Call before anything touches a device."""
  if group.source == "single":
    return
  timeout = peer_timeout or int(os.environ.get(ENV_PEER_TIMEOUT, DEFAULT_PEER_TIMEOUT))
  if timeout < 1:
    raise ConfigError("--peer_timeout", f"must be >= 1 second, got {timeout}")
  # Only the CPU backend's collectives: harmless where the devices are GPUs or TPUs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"initialization_timeout": timeout, "heartbeat_timeout_seconds": timeout}
  if group.source == "cluster":
    jax.distributed.initialize(**kwargs)
  else:
    jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id, **kwargs)


def is_main_process() -> bool:
  """Process 0 writes logs, metrics and the work directory's files; the others only compute and checkpoint."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def main_process_says(value: bool) -> bool:
  """Process 0's `value`, on every process (`value` itself with one process)."""
  if jax.process_count() == 1:
    return value
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


def processes_where_false(ok: bool) -> list[int]:
  """The indices of the processes whose `ok` is false, the same list on every process."""
  if jax.process_count() == 1:
    return [] if ok else [0]
  import numpy as np
  from jax.experimental import multihost_utils

  return [int(i) for i in np.flatnonzero(~np.asarray(multihost_utils.process_allgather(np.asarray(ok))))]


def _cluster_detected(environ) -> bool:
  """A Cloud TPU VM pod or a SLURM job of several tasks: jax.distributed finds the rest itself."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in environ:
    return True
  hostnames = environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hostnames  # a multi-worker TPU slice; a single-host TPU VM needs no initialization


def _integer(key: str, value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(key, f"must be an integer, got {value!r}") from None
