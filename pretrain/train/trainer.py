"""`pretrain train`: continued pretraining, top to bottom.

  mesh -> data (prepared shards, Grain pipeline) -> model, optimizer, shardings ->
  state: own checkpoint, else `init_from`, else fresh init -> jitted step -> loop
  (metrics of step N-1 are read after step N is dispatched; checkpoints every N steps,
  at the end, and on SIGTERM).

Everything that can be wrong with the config (mesh, batch split, tokenizer size,
init_from, an existing run of another model or other settings) is checked before the work
directory is written to and before any compute; only the run's lock on it (run_lock.py) is
taken first, and removed again on the way out.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pretrain import models, orbax_s3, schema, storage
from pretrain.atomic_file import atomic_file
from pretrain.config import ExperimentConfig
from pretrain.convert import export, param_shapes
from pretrain.data import batch as batch_lib
from pretrain.data import global_batch, pipeline, workspace
from pretrain.models import attention, causal_lm, context_parallel
from pretrain.schema import ConfigError
from pretrain.train import checkpoint, distributed, evals, flops, metrics, optimizer, run_lock, sharding, step
from pretrain.train import workdir as workdir_layout
from pretrain.train.config import TrainConfig

EXPERIMENT_FILE = workdir_layout.EXPERIMENT_FILE
EXPORT_DIR = workdir_layout.EXPORT_DIR  # <workdir>/hf/<step>: Hugging Face exports (config.train.export_hf)


class BadStepsError(RuntimeError):
  """Too many consecutive skipped updates; the last good checkpoint is intact."""


def train(experiment: ExperimentConfig, *, log=print) -> dict[str, Any]:
  """Runs (or resumes) the experiment; returns the last logged metrics."""
  cfg, data, model_config = experiment.train, experiment.data, experiment.model
  if cfg is None or data is None:
    raise ConfigError("config.train" if cfg is None else "config.data", "training needs this section")
  workdir = storage.as_path(cfg.workdir)  # local or a bucket; a missing or refused bucket stops here
  storage.check_bucket(workdir, "config.train.workdir")
  orbax_s3.check(workdir, "config.train.workdir")
  # The signal handlers first: a SIGTERM during set-up (compile, data preparation) is kept for the loop, which
  # then saves after its first step, and the lock is released on the way out.
  stop = _StopOnSignal()
  try:
    with run_lock.hold(workdir, "config.train.workdir", log=log):  # one run per work directory, until it exits
      return _train(experiment, workdir, stop, log)
  finally:
    stop.restore()


def _train(experiment: ExperimentConfig, workdir: epath.Path, stop: _StopOnSignal, log) -> dict[str, Any]:
  """`train`, once this run holds the work directory."""
  cfg, data, model_config = experiment.train, experiment.data, experiment.model

  # 1. Mesh and batch split: checked before anything is written.
  mesh = sharding.make_mesh(cfg.mesh)
  check_batch_split(experiment, mesh)
  check_attention(model_config)
  if cfg.init_from:
    storage.check_bucket(cfg.init_from, "config.train.init_from")
    if not storage.as_path(cfg.init_from).exists():
      raise ConfigError("config.train.init_from", f"{cfg.init_from} does not exist")

  # 2. Model, optimizer and where every array lives.
  plan = plan_step(experiment, mesh)
  tx, state_shardings = plan.tx, plan.state_shardings

  # 3. Data: prepared on first use (the built-in default; by process 0, the others wait and then read
  # the finished shards), then this process's share.
  prepared = workspace.ensure_prepared(data, log=log) if distributed.is_main_process() else None
  distributed.barrier("data prepared")
  mixture, tokenizer, _ = prepared or workspace.ensure_prepared(data, log=lambda *_: None)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ConfigError("config.model.vocab_size", f"{model_config.vocab_size} is smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} tokens ({tokenizer.path})")
  evals.check(cfg, tokenizer, model_config)
  data_iter = iter(pipeline.build(data, mixture, tokenizer, process_index=jax.process_index(),
                                  process_count=jax.process_count()))

  # 4. State: own checkpoint, else init_from, else fresh. init_from is read before anything is written.
  resuming = checkpoint.has_checkpoints(workdir)
  if not resuming and cfg.init_from and cfg.init_optimizer_state:
    init_state = checkpoint.load_init_state(cfg.init_from, plan.abstract_state)
  elif not resuming and cfg.init_from:
    init_params = checkpoint.load_init_params(cfg.init_from,
                                              param_shapes.placed(plan.abstract_params, plan.param_shardings),
                                              read_window_bytes=cfg.init_read_window_mib * 2**20, log=log)
  if cfg.resume_step and not resuming:
    raise ConfigError("config.train.resume_step", f"{workdir} holds no checkpoint to resume from")
  changes = _check_workdir(workdir, experiment)  # the first write to the work directory
  checkpoints = checkpoint.Checkpoints(workdir, cfg, log=log)
  if resuming:
    latest, state = checkpoints.restore_latest(plan.abstract_state, data_iter, _resume_step(workdir, cfg, log))
    log(f"resumed from {checkpoints.directory}/{latest}")
    _record_changes(workdir, experiment, changes, latest, log)
  elif cfg.init_from and cfg.init_optimizer_state:
    state = jax.jit(step.restart_state, out_shardings=state_shardings, donate_argnums=(0,))(init_state)
    log(f"initialised parameters and optimizer moments from {cfg.init_from}")
  elif cfg.init_from:
    state = jax.jit(lambda p: step.init_state(p, tx), out_shardings=state_shardings)(init_params)
    log(f"initialised parameters from {cfg.init_from}")
  else:
    state = fresh_state(plan, experiment)

  # 5. The step, the evaluations during training, and the loop.
  train_step = jit_step(plan, cfg, len(mixture.components))

  def evaluate(step_number: int, state, writer) -> None:
    evals.run_due(cfg, step_number, evals.model_from(plan.graphdef, state["params"]), tokenizer, mesh, writer,
                  should_stop=lambda: bool(stop.requested), log=log)

  return _loop(experiment, state, train_step, data_iter, checkpoints, plan.batch_sharding,
               sharding.context_ways(mesh, cfg.axis_rules), mixture, stop, evaluate, log)


def check_attention(model_config) -> None:
  """The model's attention implementation can run on this backend with its dtype and head dims."""
  qk_dim = getattr(model_config, "qk_head_dim", None) or model_config.head_dim
  v_dim = getattr(model_config, "v_head_dim", qk_dim)
  reason = attention.unavailable_reason(model_config.attention_implementation, causal_lm.DTYPES[model_config.dtype],
                                        qk_dim, v_dim)
  if reason:
    raise ConfigError("config.model.attention_implementation",
                      f"{model_config.attention_implementation!r} cannot run here: {reason}")


def check_batch_split(experiment: ExperimentConfig, mesh) -> None:
  """The global batch splits over the batch shards, micro-batches and processes, and a row over the context axis;
  a row fits the model's positions."""
  cfg, data = experiment.train, experiment.data
  batch_ways = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh, cfg.axis_rules)]))
  for ways, what in ((batch_ways * cfg.microbatches, f"{batch_ways} batch shards x {cfg.microbatches} microbatches"),
                     (jax.process_count(), f"{jax.process_count()} processes")):
    if data.global_batch_size % ways:
      raise ConfigError("config.data.global_batch_size", f"{data.global_batch_size} does not split into {what}")
  if data.seq_len > experiment.model.max_position_embeddings:
    raise ConfigError("config.data.seq_len", f"{data.seq_len} is longer than the model's "
                      f"{experiment.model.max_position_embeddings} positions (config.model.max_position_embeddings)")
  context_ways = sharding.context_ways(mesh, cfg.axis_rules)
  if data.seq_len % (2 * context_ways):  # zigzag: each context device holds 2 of 2n equal chunks of a row
    raise ConfigError("config.data.seq_len", f"{data.seq_len} does not split into 2 x {context_ways} equal "
                      f"chunks, as context parallelism over config.train.mesh.context={context_ways} needs")


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The model, optimizer and where every array of the step lives: what `train` and `pretrain plan --xla` share."""

  graphdef: Any
  abstract_params: Any
  param_shardings: Any
  tx: Any
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  batch_sharding: dict[str, NamedSharding]


def plan_step(experiment: ExperimentConfig, mesh) -> StepPlan:
  cfg = experiment.train
  parallelism = sharding.parallelism(experiment.model, mesh, cfg.axis_rules, cfg.remat)
  abstract_model = models.build_abstract(experiment.model, parallelism=parallelism)
  graphdef, abstract_params = nnx.split(abstract_model)
  param_shardings = sharding.param_shardings(abstract_params, mesh, cfg.axis_rules)
  tx = optimizer.make_optimizer(cfg.optimizer, cfg.steps, abstract_params)
  unplaced_state = jax.eval_shape(lambda p: step.init_state(p, tx), abstract_params)
  state_shardings = _state_shardings(tx, unplaced_state, param_shardings, mesh)
  abstract_state = param_shapes.placed(unplaced_state, state_shardings)
  batch_sharding = {field.name: sharding.batch_sharding(mesh, cfg.axis_rules, len(field.logical_axes))
                    for field in batch_lib.FIELDS}
  return StepPlan(graphdef, abstract_params, param_shardings, tx, state_shardings, abstract_state, batch_sharding)


def fresh_state(plan: StepPlan, experiment: ExperimentConfig) -> dict[str, Any]:
  """A newly initialised model's train state, made directly on the state's shardings."""
  return jax.jit(lambda: step.init_state(nnx.state(models.build(experiment.model, experiment.seed)), plan.tx),
                 out_shardings=plan.state_shardings)()


def jit_step(plan: StepPlan, cfg: TrainConfig, num_components: int):
  """The jitted train step: explicit state and batch shardings, the state donated."""
  return jax.jit(step.make_train_step(plan.graphdef, plan.tx, cfg, num_components),
                 in_shardings=(plan.state_shardings, plan.batch_sharding), out_shardings=(plan.state_shardings, None),
                 donate_argnums=(0,))


def _loop(experiment, state, train_step, data_iter, checkpoints, batch_sharding, context_ways, mixture, stop,
          evaluate, log) -> dict[str, Any]:
  cfg, data = experiment.train, experiment.data
  start = int(jax.device_get(state["step"]))
  peak, _ = flops.peak_flops_per_device()
  report = _Report(cfg, names=[c.name for c in mixture.components],
                   learning_rate=optimizer.learning_rate(cfg.optimizer, cfg.steps),
                   tokens_per_step=data.global_batch_size * data.seq_len,
                   flops_per_token=flops.flops_per_token(experiment.model, data.seq_len), peak_flops=peak)
  writer = metrics.MetricsWriter(cfg.workdir)
  progress = metrics.Progress(cfg.steps, start_step=start) if jax.process_index() == 0 else None
  pending, last, step_start = None, {}, time.perf_counter()
  failed = True
  try:
    # A resumed run first redoes the evaluations its checkpoint's step owes (killed or stopped during them).
    steps = range(start, cfg.steps) if _evaluated(evaluate, start, state, writer, log) else range(0)
    for number in steps:
      host_batch = next(data_iter)
      if context_ways > 1:  # rows in the zigzag order the attention layers expect (models/context_parallel.py)
        host_batch = context_parallel.to_zigzag(host_batch, context_ways)
      batch = global_batch.to_global(host_batch, batch_sharding)
      state, step_metrics = train_step(state, batch)
      checkpoints.check()  # a background save that failed stops the run now, not at the next save
      if pending is not None:  # the previous step's metrics, read while this one runs
        last = report(*pending, writer, progress)
      now = time.perf_counter()
      pending, step_start = (number + 1, step_metrics, now - step_start), now
      export_due, eval_due = exports_at(cfg, number + 1), bool(evals.due(cfg, number + 1))
      if ((number + 1) % cfg.checkpoint_every == 0 or number + 1 == cfg.steps or stop.requested or export_due
          or eval_due):
        checkpoints.save(number + 1, state, data_iter)
      if export_due:
        _export(cfg, number + 1, checkpoints, log)
      if eval_due and not stop.requested:
        last, pending = report(*pending, writer, progress), None  # the step's own metrics before its evaluations'
        _evaluated(evaluate, number + 1, state, writer, log)
      if stop.requested:
        log(f"{stop.requested}: saved step {number + 1}; run the same command to continue")
        break
    if pending is not None:
      last = report(*pending, writer, progress)
    failed = False
  finally:
    try:
      checkpoints.wait()
      checkpoints.close()
    except checkpoint.CheckpointSaveError:
      if not failed:  # else the loop's own error (the same failed save, say) is the one to see
        raise
    writer.close()
    if progress is not None:
      progress.close()
  if stop.requested:
    last = dict(last, stopped_early=True)
  log(f"checkpoints in {checkpoints.directory}; metrics in {storage.as_path(cfg.workdir) / 'metrics.jsonl'} and "
      f"{storage.as_path(cfg.workdir) / 'tensorboard'}")
  return last


def _evaluated(evaluate, step_number: int, state, writer, log) -> bool:
  """Runs the evaluations due at this step; False when a stop request cut them short (redone on resume)."""
  try:
    evaluate(step_number, state, writer)
  except evals.Interrupted as e:
    log(f"step {step_number}: evaluation {e} stopped; it is redone when the run resumes")
    return False
  return True


def exports_at(cfg: TrainConfig, step: int) -> bool:
  """Whether the run writes a Hugging Face export of this step (`export_hf`, `export_hf_every`)."""
  return (cfg.export_hf and step == cfg.steps) or (cfg.export_hf_every > 0 and step % cfg.export_hf_every == 0)


def _export(cfg: TrainConfig, step: int, checkpoints, log) -> None:
  """`<workdir>/hf/<step>` from the checkpoint just saved, every process writing its share of the files."""
  out = storage.as_path(cfg.workdir) / EXPORT_DIR / str(step)
  if (out / "config.json").exists():  # exports are moved into place whole: this one is complete
    log(f"step {step}: Hugging Face export {out} exists, kept")
    return
  checkpoints.wait()  # the export reads the finished checkpoint
  stats = export.export_hf(cfg.workdir, out, dtype=cfg.export_hf_dtype, step=step, key="config.train.workdir")
  log(f"step {step}: exported {out} ({cfg.export_hf_dtype}, {stats.seconds:.1f} s)")


@dataclasses.dataclass(frozen=True)
class _Report:
  """Turns a step's device metrics into logged scalars, and stops a run gone bad."""

  cfg: TrainConfig
  names: list[str]
  learning_rate: Any  # optax.Schedule
  tokens_per_step: int
  flops_per_token: float
  peak_flops: float

  def __call__(self, number: int, step_metrics, seconds: float, writer, progress) -> dict[str, Any]:
    cfg = self.cfg
    host = jax.device_get(step_metrics)
    tokens_per_second = self.tokens_per_step / max(seconds, 1e-9)
    scalars = {
        "loss": float(host["loss"]), "ce_loss": float(host["ce_loss"]), "balance_loss": float(host["balance_loss"]),
        "grad_norm": float(host["grad_norm"]), "update_skipped": float(host["update_skipped"]),
        "skipped_updates": float(host["skipped_updates"]),
        "learning_rate": float(self.learning_rate(number - 1)),
        "tokens_per_second": tokens_per_second, "step_seconds": seconds,
        "mfu": flops.mfu(tokens_per_second, self.flops_per_token, self.peak_flops, jax.device_count()),
    }
    component_tokens = np.asarray(host["component_tokens"])
    for i, name in enumerate(self.names):
      if component_tokens[i] > 0:
        scalars[f"loss/{name}"] = float(host["component_nll_sum"][i] / component_tokens[i])
    if "expert_load" in host:
      load = np.asarray(host["expert_load"])
      scalars["expert_load/max"], scalars["expert_load/min"] = float(load.max()), float(load.min())
    bad_steps = int(host["bad_steps"])
    if number % cfg.log_every == 0 or number == cfg.steps or bad_steps >= cfg.max_bad_steps:
      writer.write(number, scalars)
    if bad_steps >= cfg.max_bad_steps:
      raise BadStepsError(f"step {number}: {bad_steps} consecutive updates skipped (non-finite loss or gradient "
                          f"norm, or a gradient-norm spike over {cfg.grad_spike_factor}x its running median); "
                          "stopping. The last good checkpoint is intact.")
    if progress is not None:
      progress.update(number, loss=scalars["loss"], tokens_per_second=tokens_per_second)
    return scalars


def _state_shardings(tx, abstract_state, param_shardings, mesh):
  """Parameters by the axis rules; the optimizer's per-parameter leaves (Adam's moments) like their
  parameter, found from the optimizer's own state structure; everything else (counts, the guard's
  history) replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_state = optax.tree_utils.tree_map_params(tx, lambda _, sharding: sharding, abstract_state["opt_state"],
                                               param_shardings, transform_non_params=lambda _: replicated)
  return dict(jax.tree.map(lambda _: replicated, abstract_state), params=param_shardings, opt_state=opt_state)


# What a resumed run must keep to stay the run experiment.json records (beside the model): its data and
# order, and its optimizer and schedule. How it computes (mesh, remat, micro-batches, kernels), where things
# are (paths of prepared data and tokenizer), how often it saves and logs may change freely.
RESUME_KEYS = ("seed", "data.mixture", "data.train_tokenizer_vocab_size", "data.special_tokens", "data.seq_len",
               "data.global_batch_size", "data.weights", "data.min_length", "data.add_bos", "data.seed",
               "data.streams", "train.steps", "train.optimizer")


def _check_workdir(workdir: epath.Path, experiment: ExperimentConfig) -> list[dict[str, Any]]:
  """A work directory belongs to one model, and a resumed run to its recorded settings: resuming it with
  another model is refused before anything runs, and with other RESUME_KEYS settings unless
  `train.allow_config_change`. Returns those changes (key, recorded value, new value).

  Every process checks (they all see the same directory); process 0 writes, then all meet, so the
  barrier is reached on every path that does not raise.
  """
  file = workdir / EXPERIMENT_FILE
  wanted = schema.to_dict(experiment.model)
  fresh = not file.exists()
  changes = []
  if not fresh:
    record = json.loads(file.read_text())
    found = record.get("model", {})
    ignored = ("dtype", "moe_implementation", "attention_implementation")  # how it computes, not what it is
    differ = sorted(k for k in wanted if found.get(k) != wanted[k] and k not in ignored)
    if differ:
      raise ConfigError(f"config.model.{differ[0]}", f"{workdir} holds a run of another model ({differ[0]} "
                        f"{found.get(differ[0])!r} there, {wanted[differ[0]]!r} here); use another workdir")
    recorded, now = _flat(record), _flat(schema.to_dict(experiment))
    changes = [{"key": key, "from": recorded.get(key), "to": now.get(key)}
               for key in sorted(set(recorded) | set(now))
               if _resume_key(key) and recorded.get(key) != now.get(key)]
    if changes and not experiment.train.allow_config_change:
      first = changes[0]
      raise ConfigError(f"config.{first['key']}", f"{first['to']!r} here, but {workdir} was run with "
                        f"{first['from']!r} ({file}); resuming would silently make it another run. Use another "
                        "workdir, or pass --allow_config_change (config.train.allow_config_change) to resume with "
                        "the change recorded" + (f" ({len(changes)} settings differ)" if len(changes) > 1 else ""))
  if fresh and distributed.is_main_process():
    with atomic_file(file) as tmp:
      tmp.write_text(json.dumps(schema.to_dict(experiment), indent=2) + "\n")
  distributed.barrier("work directory")
  return changes


def _resume_step(workdir: epath.Path, cfg: TrainConfig, log) -> int:
  """`resume_step`, once: the same command run again after a preemption continues from its newest checkpoint
  rather than going back to that step again. experiment.json records the steps resumed from by hand."""
  if not cfg.resume_step:
    return 0
  file = workdir / EXPERIMENT_FILE
  record = json.loads(file.read_text())
  if cfg.resume_step in record.get("resumed_by_hand", []):
    log(f"resume_step {cfg.resume_step} was applied before (experiment.json); resuming from the newest checkpoint")
    return 0
  distributed.barrier("resume_step read")  # every process has read the record before process 0 rewrites it
  if distributed.is_main_process():
    record["resumed_by_hand"] = record.get("resumed_by_hand", []) + [cfg.resume_step]
    with atomic_file(file) as tmp:
      tmp.write_text(json.dumps(record, indent=2) + "\n")
  return cfg.resume_step


def _resume_key(key: str) -> bool:
  """Whether a flattened key is one of RESUME_KEYS or under one (data.seq_len, not data.seq_len_x)."""
  return any(key == k or key.startswith(k + ".") for k in RESUME_KEYS)


def _record_changes(workdir: epath.Path, experiment: ExperimentConfig, changes: list[dict[str, Any]], step: int,
                    log) -> None:
  """experiment.json takes the new settings, and its "changes" list says what changed at which step."""
  if not changes:
    return
  for change in changes:
    log(f"step {step}: config.{change['key']} changed from {change['from']!r} to {change['to']!r} "
        "(allow_config_change; recorded in experiment.json)")
  if distributed.is_main_process():
    file = workdir / EXPERIMENT_FILE
    record = json.loads(file.read_text())  # its resumed_by_hand, and earlier changes, stay
    history = record.get("changes", []) + [dict(change, step=step) for change in changes]
    record.update(schema.to_dict(experiment), changes=history)
    with atomic_file(file) as tmp:
      tmp.write_text(json.dumps(record, indent=2) + "\n")
  distributed.barrier("experiment changes recorded")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists and other leaves as they are."""
  out = {}
  for key, value in tree.items():
    if key in ("changes", "resumed_by_hand") and not prefix:
      continue
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


class _StopOnSignal:
  """A preemption notice (SIGTERM) or a first Ctrl-C (SIGINT): finish the current step, save, exit 0.
  A second Ctrl-C exits at once, as Python does by default."""

  def __init__(self):
    self.requested = ""  # the signal's name, once one came
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("\nSIGINT: saving at the end of this step, then stopping; press Ctrl-C again to stop at once",
            file=sys.stderr, flush=True)

  def restore(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
