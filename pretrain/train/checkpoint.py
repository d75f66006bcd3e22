"""Training checkpoints (Orbax CheckpointManager) and `init_from` for continued pretraining.

A checkpoint holds two items: `state` (parameters, optimizer state, step, the bad-update
guard; sharded arrays, saved asynchronously) and `data` (the input pipeline's iterator
state, JSON, one file per process). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed at any moment, mid-save included, resumes from the last whole
checkpoint. Restoring takes the target's shardings, so a checkpoint restores onto any
mesh or device count.

What goes wrong, and what happens then:
- A checkpoint that does not restore (a data file truncated or gone, its metadata deleted):
  `restore_latest` says which step and what failed, moves that step aside to
  <workdir>/checkpoints_aside/<step> (never deletes it), and resumes from the newest step that
  restores. `config.train.resume_step` picks the step by hand instead (the newer ones are moved aside
  too, so the run can write its own steps again).
- A save that fails in the background (a full disk): noticed at the next step (`check`), the run
  stops with one line (which step, the OS error, the space needed and free), the partial step
  directory removed, earlier checkpoints intact. Before each save, free space below the state's
  size is warned about.

`init_from` reads parameters only: a Hugging Face directory (config.json), an Orbax
model checkpoint (`pretrain convert --to-orbax`), or a training work directory (its
latest checkpoint).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from pretrain import orbax_s3, storage
from pretrain.convert import hf_import, orbax_io
from pretrain.convert.errors import ConversionError
from pretrain.schema import ConfigError
from pretrain.train import distributed
from pretrain.train import workdir as workdir_layout
from pretrain.train.config import TrainConfig

CHECKPOINTS_DIR = workdir_layout.CHECKPOINTS_DIR
# <workdir>/checkpoints_aside/<step>: checkpoints moved out of the run's way, never deleted: those that did not
# restore, and with resume_step those newer than it.
ASIDE_DIR = "checkpoints_aside"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a refused bucket); the earlier ones are intact."""


class Checkpoints:
  def __init__(self, workdir, config: TrainConfig, *, log=print):
    self.workdir = storage.local_absolute(workdir)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_last, keep_period=config.keep_every or None, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True,
        atomicity_options=orbax_s3.atomicity_options(self.workdir))
    self.directory = self.workdir / CHECKPOINTS_DIR
    self.manager = self._open()
    _quiet_failed_save_noise()
    self._log = log
    self._saving: int | None = None  # the step of the save in flight
    self._expected_mib = 0.0  # this process's part of the state, uncompressed
    self._warned_space = False

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_iter: grain.DatasetIterator) -> None:
    """Starts an asynchronous save of `state`; the next save (or `wait`) waits for it. The data
    iterator's position is taken now, one file per process (Grain's handler), so each process of
    a pod resumes its own input streams. Arrays are stored in chunks of one layer's or expert's slot
    (`orbax_io.save_args`), so an export or a restore onto another mesh reads only what it needs."""
    self.wait()  # the previous save: its failure is reported as its own, not as this one's
    self._warn_if_short_of_space(step, state)
    self._saving = step
    self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state, save_args=orbax_io.save_args(state)),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True))

  def check(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed; cheap, called after every step."""
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()  # finished: returns at once, or raises the background thread's error

  def wait(self) -> None:
    self._guard(self.manager.wait_until_finished)
    self._saving = None

  def close(self) -> None:
    self.manager.close()

  def _guard(self, action) -> None:
    try:
      action()
    except CheckpointSaveError:
      raise
    except Exception as e:  # Orbax re-raises the background thread's error, of whatever type it was
      raise self._save_failed(e) from e

  def _save_failed(self, error: Exception) -> CheckpointSaveError:
    """The one-line error for a failed save, after removing the step's partial directory."""
    step = self._saving
    if jax.process_index() == 0 and step is not None:
      for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        partial.rmtree(missing_ok=True)
      if storage.is_url(self.directory) and step not in workdir_layout.complete_steps(self.workdir):
        (self.directory / str(step)).rmtree(missing_ok=True)  # a bucket's step is written in place
    cause = _root_cause(error)
    text = str(cause)
    if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "os_error_code='28'" in text:
      file = re.search(r'Failed writing: "([^"]+)"', text)
      why = f"{os.strerror(errno.ENOSPC)}" + (f" (writing {file.group(1)})" if file else "")
      if not storage.is_url(self.directory):
        why += (f"; it needs up to {self._expected_mib:,.1f} MiB, {_free_mib(self.directory):,.1f} MiB are free "
                "there")
      todo = "make room"
    else:
      why, todo = _one_line(cause), "fix that"
    kept = workdir_layout.complete_steps(self.workdir)
    return CheckpointSaveError(
        f"checkpoint of step {step} in {self.directory} failed: {why}. The partial step was removed; checkpoints "
        f"{kept or 'none'} are intact: {todo} and run the same command to continue")

  def _warn_if_short_of_space(self, step: int, state: dict[str, Any]) -> None:
    """One warning when the disk has less free space than this process's part of the state takes
    uncompressed (a save compresses, so it usually needs less)."""
    self._expected_mib = _state_bytes(state) / 2**20
    if storage.is_url(self.directory):
      return
    free = _free_mib(self.directory)
    short = free < self._expected_mib
    if short and not self._warned_space:
      self._log(f"warning: {free:,.0f} MiB free in {self.directory}, and the checkpoint of step {step} may take up "
                f"to {self._expected_mib:,.0f} MiB; the run stops if a save fails")
    self._warned_space = short

  def restore(self, step: int, abstract_state: dict[str, Any],
              data_iter: grain.DatasetIterator | None = None) -> dict[str, Any]:
    """The state of checkpoint `step`, on the abstract state's shardings; `data_iter` (if given) is
    moved to where that step left it."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state: dict[str, Any], data_iter: grain.DatasetIterator,
                     resume_step: int = 0) -> tuple[int, dict[str, Any]]:
    """(step, state) of the newest checkpoint that restores, or of `resume_step` if it is not 0.

    Steps newer than the one restored that failed are moved aside to <workdir>/checkpoints_aside/<step>,
    each with one line saying what failed; if none restores, nothing is moved and the error names them all.
    All processes agree on each attempt, so a pod resumes from one step.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    if resume_step:
      if resume_step not in steps:
        raise ConfigError("config.train.resume_step", f"{self.directory} has no checkpoint of step {resume_step}; "
                          f"it has {sorted(steps)}")
      failures = [(step, f"newer than resume_step {resume_step}") for step in steps if step > resume_step]
      steps = [resume_step]
    for step in steps:
      # Files checked first, by every process: a restore that fails on one process alone would leave the
      # others waiting in Orbax's collectives.
      missing = _missing_or_truncated(self.directory / str(step))
      state, error = None, None
      failed_on = distributed.processes_where_false(missing is None)  # every process calls each collective: no short-circuits
      if not failed_on:
        try:
          state = self.restore(step, abstract_state, data_iter)
        except Exception as e:  # a damaged step fails in Orbax, tensorstore or Grain, each its own way
          error = e
        failed_on = distributed.processes_where_false(error is None)
      restored = not failed_on
      why = missing or (_one_line(_root_cause(error)) if error is not None else "")
      if why and jax.process_count() > 1 and not distributed.is_main_process():  # process 0 logs the rest
        print(f"process {jax.process_index()}: checkpoint {self.directory / str(step)} does not restore: {why}",
              file=sys.stderr, flush=True)
      if not why:
        why = f"it does not restore on process {', '.join(map(str, failed_on))} (see that process's log)"
      if restored:
        for failed, why in failures:
          self._move_aside(failed, why)
        if failures:
          self.manager.close()
          self.manager = self._open()  # it listed the steps moved aside
        return step, state
      if resume_step:
        raise ConfigError("config.train.resume_step", f"checkpoint {self.directory / str(step)} does not restore: "
                          f"{why}")
      self._log(f"checkpoint {self.directory / str(step)} does not restore: {why}")
      failures.append((step, why))
    raise ConfigError("config.train.workdir", f"no checkpoint in {self.directory} restores: " + "; ".join(
        f"step {step}: {why}" for step, why in failures))

  def _move_aside(self, step: int, why: str) -> None:
    target = self.workdir / ASIDE_DIR / str(step)
    suffix = 1
    while target.exists():  # the same step moved aside before, after an earlier resume
      target, suffix = self.workdir / ASIDE_DIR / f"{step}.{suffix}", suffix + 1
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    self._log(f"moved the checkpoint of step {step} to {target} ({why}); resuming from an earlier step")


def _missing_or_truncated(step_dir) -> str | None:
  """What of checkpoint `step_dir` that this process reads is missing or shorter than its index says, or None.

  Reads only metadata: the step's and the state's metadata files, this process's data-iterator state,
  and the state's OCDBT b-tree, whose every value reference (file, offset, length) is checked against
  the data file's size.
  """
  data = step_dir / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  for file in (step_dir / "_CHECKPOINT_METADATA", step_dir / "state" / "_METADATA", data):
    if not file.exists():
      return f"{file} is missing"
    try:
      json.loads(file.read_text())
    except ValueError as e:
      return f"{file} is not valid JSON ({e})"
  state = step_dir / "state"
  try:
    store = ts.KvStore.open(storage.kvstore(str(state).rstrip("/") + "/")).result()
    manifest = ts.ocdbt.dump(store).result()
    roots = [v["root"]["location"] for v in manifest.get("versions", [])[-1:] if v.get("root", {}).get("location")]
    sizes: dict[str, int] = {}
    pending = list(roots)
    while pending:
      location = pending.pop()
      problem = _check_reference(state, location, sizes)
      if problem:
        return problem
      node = ts.ocdbt.dump(store, location).result()
      for entry in node.get("entries", []):
        reference = entry.get("indirect_value") or entry.get("node")
        if isinstance(reference, str):
          if reference.startswith("btreenode:"):
            pending.append(reference)
          else:
            problem = _check_reference(state, reference, sizes)
            if problem:
              return f"{problem} (array {entry.get('key', b'').decode(errors='replace')})"
  except ValueError as e:  # tensorstore: a node or the manifest unreadable
    return _one_line(e)
  return None


def _check_reference(state, location: str, sizes: dict[str, int]) -> str | None:
  """`kind:base/:file:offset:length` (an OCDBT value or node reference): its bytes exist in the file."""
  _, base, file, offset, length = location.split(":")[-5:]
  path = state / base / file if base else state / file
  key = str(path)
  if key not in sizes:
    sizes[key] = path.stat().length if path.exists() else -1
  if sizes[key] < 0:
    return f"{path} is missing"
  if sizes[key] < int(offset) + int(length):
    return f"{path} is truncated ({sizes[key]} bytes; the index reads up to byte {int(offset) + int(length)})"
  return None


def _state_bytes(state) -> int:
  """Bytes of the arrays this process writes: its devices' shards that no other device also writes."""
  total = 0
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
    else:
      total += np.asarray(leaf).nbytes
  return total


def _free_mib(directory) -> float:
  path = storage.as_path(directory)
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(str(path)).free / 2**20


def _quiet_failed_save_noise() -> None:
  """When a save fails, Orbax logs the background thread's traceback, the writes it cancels complete into
  closed event loops ("Event loop is closed", unraisable), and asyncio logs the errors of sibling writes
  that nobody retrieved: hundreds of lines, where the one-line CheckpointSaveError says it all. Only
  those three are dropped; every other log record and unraisable error still shows. Once per process."""
  global _NOISE_QUIETED
  if _NOISE_QUIETED:
    return
  _NOISE_QUIETED = True
  failed_save = ("_SignalingThread.run() raised an exception", "in background save thread",
                 "Save Finalize thread (save_finalize) failed")
  logging.getLogger("absl").addFilter(lambda record: not any(text in record.getMessage() for text in failed_save))
  # The other tensorstore writes of a failed save fail too; gathered, their errors go unretrieved.
  logging.getLogger("asyncio").addFilter(lambda record: not (
      "exception was never retrieved" in record.getMessage() and "Error writing" in record.getMessage()))
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook


_NOISE_QUIETED = False


def _root_cause(error: BaseException) -> BaseException:
  """The innermost error of a chain (Orbax wraps the background thread's error, asyncio wraps Orbax's)."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ or error.__context__
    if inner is None or isinstance(error, OSError):
      break
    error = inner
  return error


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0].rstrip('.') if text else ''}"[:400]



def has_checkpoints(workdir) -> bool:
  """Whether `workdir` holds a complete checkpoint (workdir.complete_steps)."""
  return bool(workdir_layout.complete_steps(workdir))


def load_init_params(path: str, abstract_params: nnx.State, *, read_window_bytes: int,
                     key: str = "config.train.init_from", log=print) -> nnx.State:
  """Parameters to start from, checked against the run's model, built directly on the abstract params'
  shardings: each process reads only the shards its devices hold (nothing is gathered). `key` names
  the setting in errors."""
  storage.check_bucket(path, key)
  kind, source = workdir_layout.checkpoint_kind(storage.local_absolute(path), key)
  try:
    if kind == "huggingface":
      params, stats = hf_import.load_hf_params(source, abstract_params, read_window_bytes=read_window_bytes,
                                               key=key)
      log(f"read {stats.bytes_read / 1e9:.3g} of the checkpoint's {stats.checkpoint_bytes / 1e9:.3g} GB on this "
          f"process in {stats.seconds:.1f} s")
      return params
    if kind == "orbax":
      return orbax_io.load_params(source, abstract_params, key=key)
  except ConversionError as e:
    raise ConfigError(key, str(e).removeprefix(f"{key}: ")) from e
  manager = ocp.CheckpointManager(source / CHECKPOINTS_DIR, item_names=("state", "data"))
  try:
    step = manager.latest_step()
    target = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
        partial_restore=True)))
  finally:
    manager.close()
  return restored["state"]["params"]


def load_init_state(path: str, abstract_state: dict[str, Any]) -> dict[str, Any]:
  """The whole train state of a run's latest checkpoint (parameters and Adam moments), for a next stage.

  The model and optimizer must be the same; batch, sequence and schedule may differ. Placed
  on the abstract state's shardings.
  """
  directory = storage.local_absolute(path) / CHECKPOINTS_DIR
  if not directory.is_dir():
    raise ConfigError("config.train.init_optimizer_state", f"needs init_from to be a training work directory; "
                      f"{path} has no {CHECKPOINTS_DIR}/")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  try:
    step = manager.latest_step()
    if step is None:
      raise ConfigError("config.train.init_from", f"{directory} holds no complete checkpoint")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError) as e:
      raise ConfigError("config.train.init_from", f"{directory}/{step} does not fit this run's model and "
                        f"optimizer: {str(e).splitlines()[0]}") from e
  finally:
    manager.close()
  return restored["state"]
