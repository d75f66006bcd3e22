"""`pretrain plan`: a run's per-device memory, step time and MFU before it runs, and a mesh that fits.

`plan(experiment, mesh, accelerator)` adds up, per device, what one training step holds
at its peak: the float32 parameters and Adam's two moments (each split as
`TrainConfig.axis_rules` split it, with `sharding.spec_for`, on a mesh of sizes only),
the batch, the float32 gradients, and the activations of the remat policy at one
micro-batch (each family's block sizes: models/block_sizes.py). The peak is the largest of these moments:

- the end of the forward pass: every block's kept activations, and the last block's
  attention tiles or the fused cross-entropy's working set (and, with micro-batches, the
  gradient accumulator);
- the backward pass of block i, for every i: the kept activations of blocks <= i, block
  i's recomputed forward (under remat) and its backward working set, its weights and the
  next block's as the matmuls read them (all-gathered under FSDP, cast to the compute
  dtype), the gradients of blocks >= i and of the output layer;
- the update: the gradients and the optimizer's update, both the size of the parameters
  (measured: XLA's scratch at the update is twice the float32 parameters).

Remat is modelled as TPU and GPU compilers schedule it: a block's forward is recomputed
just before its backward pass. XLA:CPU hoists every recomputation ahead of the backward
pass (jax-ml/jax#19822; measured here: remat saves nothing on CPU), so for the `cpu`
platform the planner keeps every block's residuals whatever the policy.

Time is the analytic FLOPs (train/flops.py) at a stated utilisation of the chip's peak:
the hardware does the model's FLOPs plus the recomputed forwards (remat) and any work
the layout repeats (routed experts without an `expert` axis run the whole batch on
every device), so step time = hardware FLOPs / (devices x peak x utilisation) and
MFU = model FLOPs / (devices x peak x step time). Communication is estimated in bytes
per device per step (parameter all-gathers and gradient reductions over the batch axes,
tensor-parallel all-reduces, expert-group token exchange, the context ring) and used to
prefer one fitting mesh over another; it is not turned into time.

plan/mesh_search.py picks a mesh (and micro-batch count) that fits from these plans.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from pretrain import models
from pretrain.config import ExperimentConfig
from pretrain.data import batch as batch_lib
from pretrain.models.block_sizes import F32, BlockSizes, Local
from pretrain.models.config import ModelConfig, RopeScaling
from pretrain.plan import compiled
from pretrain.plan.accelerators import GIB, Accelerator
from pretrain.schema import ConfigError
from pretrain.train import flops, sharding, step, trainer
from pretrain.train import stages as stages_lib

# What a run may use of a chip's memory: the rest goes to the runtime, collectives' buffers and fragmentation.
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
  """One run (or stage) on one mesh of one accelerator. Bytes are per device, at the step's peak."""

  stage: str  # the stage's name; "" for an unstaged experiment
  accelerator: str
  mesh: dict[str, int]
  microbatches: int
  tokens_per_device: int  # one micro-batch's tokens on one device
  params: int
  optimizer: int  # Adam's float32 moments and counters
  batch: int
  grads: int  # gradients live at the peak (at the update: the gradients and the update)
  activations: int  # activations live at the peak
  peak_at: str  # which moment of the step the peak is
  capacity: int  # the usable part of the chip's memory (USABLE_FRACTION)
  model_flops: float  # per step, all devices
  hardware_flops: float  # model FLOPs plus recomputation and repeated work
  utilization: float  # assumed fraction of peak the chips sustain on the hardware FLOPs
  step_seconds: float
  mfu: float
  comm_bytes: float  # estimated bytes each device sends per step

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.batch + self.grads + self.activations

  @property
  def headroom(self) -> int:
    return self.capacity - self.total

  @property
  def fits(self) -> bool:
    return self.headroom >= 0

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(devices=self.devices, total=self.total, headroom=self.headroom, fits=self.fits)
    return out


# --- the mesh -----------------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=64,expert=8' -> sizes by axis (unnamed axes are 1, one axis may be -1: sharding.mesh_sizes
  resolves it)."""
  sizes = {axis: 1 for axis in sharding.MESH_AXES}
  for item in filter(None, text.split(",")):
    axis, eq, value = item.partition("=")
    if axis not in sizes or not eq:
      raise ConfigError("--mesh", f"{item!r} is not AXIS=SIZE with AXIS one of {', '.join(sharding.MESH_AXES)}")
    try:
      sizes[axis] = int(value)
    except ValueError:
      raise ConfigError("--mesh", f"{item!r}: the size must be an integer") from None
  return sizes


def _mesh_text(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "1 device"


# --- parameters -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Param:
  layer: int | None  # the block it belongs to; None for the embedding, final norm and output layer
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names


@functools.lru_cache(maxsize=8)
def _params(model: ModelConfig) -> tuple[tuple[_Param, int], ...]:
  """Every distinct (block, shape, logical axes) of the model's parameters and how many share it, from
  `jax.eval_shape` of the model (nothing allocated)."""
  counts: dict[_Param, int] = {}
  abstract = models.build_abstract(model)
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = tuple(variable.shape)
    axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * len(shape))
    if path[0] != "layers":
      keys = [_Param(None, shape, axes)]
    else:  # a scanned stack's [count, ...] parameter: one layer's slice for each layer it holds
      stack = abstract.layers[int(path[1])]
      keys = [_Param(stack.first_layer + slot, shape[1:], axes[1:]) for slot in range(stack.count)]
    for key in keys:
      counts[key] = counts.get(key, 0) + 1
  return tuple(counts.items())


@dataclasses.dataclass(frozen=True)
class _ParamLayout:
  """The parameters on one mesh, per device."""

  bytes: int  # float32 parameters
  layer_bytes: tuple[int, ...]  # of each block
  # Each block's weights as its matmuls read them, where that is a new buffer: all-gathered over the
  # token-splitting axes (FSDP) and/or cast to the compute dtype.
  layer_weights: tuple[int, ...]
  # (local elements, devices of the token-splitting axes that share them out, how many such parameters)
  shards: tuple[tuple[int, int, int], ...]


def _shapes_only(model: ModelConfig) -> ModelConfig:
  """The model config less what does not change its parameters (dtype, RoPE scaling, kernels), so a
  staged recipe's stages share one cache entry."""
  neutral = {"dtype": "float32", "attention_implementation": "auto", "moe_implementation": "auto",
             "rope_scaling": RopeScaling()}
  fields = {field.name for field in dataclasses.fields(model)}
  return dataclasses.replace(model, **{name: value for name, value in neutral.items() if name in fields})


@functools.lru_cache(maxsize=4096)
def _param_layout(model: ModelConfig, mesh_items: tuple[tuple[str, int], ...], rules, taken: tuple[str, ...],
                  compute_bytes: int) -> _ParamLayout:
  mesh = dict(mesh_items)
  layer_bytes = [0] * model.num_hidden_layers
  layer_weights = [0] * model.num_hidden_layers
  total, shards, split_of = 0, [], {}
  for param, count in _params(model):
    key = (param.shape, param.axes)
    if key not in split_of:  # blocks repeat their shapes: one spec_for per distinct shape
      split_of[key] = _split(param, mesh, rules)
    split = split_of[key]
    elements = math.prod(param.shape) // math.prod(split.values())
    total += F32 * elements * count
    gathered = math.prod(s for a, s in split.items() if a in taken)
    if param.layer is not None:
      layer_bytes[param.layer] += F32 * elements * count
      if gathered > 1 or compute_bytes != F32:
        layer_weights[param.layer] += compute_bytes * elements * gathered * count
    shards.append((elements, gathered, count))
  return _ParamLayout(total, tuple(layer_bytes), tuple(layer_weights), tuple(shards))


def _split(param: _Param, mesh: Mapping[str, int], rules) -> dict[str, int]:
  """The mesh axes (and their sizes) that split this parameter."""
  return sharding.split_sizes(param.axes, param.shape, sharding.abstract_mesh(mesh), rules)


def _ways(logical: str, size: int, mesh: Mapping[str, int], rules, taken: Sequence[str]) -> int:
  """Devices an activation dimension of this logical name is split over (axes in `taken` split the tokens)."""
  free = {a: (1 if a in taken else s) for a, s in mesh.items()}
  return math.prod(_split(_Param(None, (size,), (logical,)), free, rules).values())


# --- one plan -----------------------------------------------------------------------------------


def plan(experiment: ExperimentConfig, mesh: Mapping[str, int], accel: Accelerator, *, utilization: float = 0.4,
         stage: str = "") -> Plan:
  """Per-device memory, step time and MFU of `experiment` on `mesh` (every axis's size) of `accel` chips."""
  cfg, data, model = experiment.train, experiment.data, experiment.model
  if cfg is None or data is None:
    raise ConfigError("config.train" if cfg is None else "config.data", "planning a run needs this section")
  if not 0 < utilization <= 1:
    raise ConfigError("--utilization", f"must be in (0, 1], got {utilization}")
  mesh = {axis: int(mesh.get(axis, 1)) for axis in sharding.MESH_AXES}
  rules = cfg.axis_rules
  sizes = models.block_sizes(model)
  local, layout = _local(experiment, mesh, accel, sizes)

  # Parameters, Adam's moments and gradients: float32, split like the parameters.
  layout_params = _param_layout(_shapes_only(model), tuple(mesh.items()), tuple(map(tuple, rules)), layout["taken"],
                                local.compute_bytes)
  param_bytes, layer_grads = layout_params.bytes, list(layout_params.layer_bytes)
  head_grads = param_bytes - sum(layer_grads)  # embedding, final norm, output layer
  # mu, nu; counts; the guard's norm history and counters
  optimizer = 2 * param_bytes + 2 * F32 + (step.GRAD_NORM_WINDOW + 3) * F32
  batch = layout["rows_per_step"] * batch_lib.bytes_per_row(local.seq)

  grads, acts, where = _peak(sizes, cfg.remat, local, accel.platform, cfg.microbatches, param_bytes,
                             layer_grads, head_grads, layout_params.layer_weights)
  model_flops, hardware_flops = _flops(experiment, sizes, mesh, local)
  devices = math.prod(mesh.values())
  step_seconds = hardware_flops / (devices * accel.peak_flops * utilization)
  return Plan(
      stage=stage, accelerator=accel.name, mesh=mesh, microbatches=cfg.microbatches, tokens_per_device=local.tokens,
      params=param_bytes, optimizer=optimizer, batch=batch, grads=grads, activations=acts, peak_at=where,
      capacity=int(accel.memory_bytes * USABLE_FRACTION), model_flops=model_flops, hardware_flops=hardware_flops,
      utilization=utilization, step_seconds=step_seconds,
      mfu=model_flops / (devices * accel.peak_flops * step_seconds),
      comm_bytes=_communication(experiment, sizes, mesh, local, layout, layout_params))


def _local(experiment: ExperimentConfig, mesh: dict[str, int], accel: Accelerator,
           sizes: BlockSizes) -> tuple[Local, dict]:
  """Per-device sizes of one micro-batch (and how the batch is laid out), checked as the trainer checks them."""
  cfg, data, model = experiment.train, experiment.data, experiment.model
  rules = cfg.axis_rules
  abstract = sharding.abstract_mesh(mesh)
  trainer.check_batch_split(experiment, abstract)  # the trainer's own checks, on a mesh of sizes only
  batch_axes, seq_axes = sharding.batch_axes(abstract, rules), sharding.sequence_axes(abstract, rules)
  batch_ways = math.prod(mesh[a] for a in batch_axes)
  context = math.prod(mesh[a] for a in seq_axes)
  taken = batch_axes + seq_axes
  rows_per_step = data.global_batch_size // batch_ways
  rows, seq = rows_per_step // cfg.microbatches, data.seq_len // context

  def per_device(logical: str, size: int) -> int:
    return size // _ways(logical, size, mesh, rules, taken)

  local = Local(rows=rows, seq=seq, compute_bytes=_dtype_bytes(model.dtype),
                heads=per_device("heads", model.num_attention_heads), kv_heads=per_device("kv_heads", sizes.kv_heads),
                mlp=per_device("mlp", model.intermediate_size), vocab=per_device("vocab", model.vocab_size),
                loss_chunk=cfg.loss_chunk)
  routed = sizes.routed_experts
  if routed is not None:
    # The routed experts' split, exactly as sharding.expert_parallelism reads it.
    _, expert_axes, mlp_axes = sharding.expert_split(routed.shape, abstract, rules)
    routed_tokens = rows * seq
    if expert_axes:  # the tokens of the expert group, all-gathered (models/expert_parallel.py)
      routed_tokens *= math.prod(mesh[a] for a in expert_axes if a in taken)
    else:  # the dispatch sorts the whole micro-batch's (token, expert) pairs on every device
      routed_tokens *= batch_ways * context
    local = dataclasses.replace(
        local, shared_mlp=per_device("mlp", routed.shared_hidden) if routed.shared_hidden else 0,
        moe_mlp=routed.expert_hidden // math.prod(mesh[a] for a in mlp_axes),
        experts=routed.count // math.prod(mesh[a] for a in expert_axes), routed_tokens=routed_tokens,
        expert_parallel=bool(expert_axes),
        ragged_dot=routed.implementation == "ragged_dot" or (routed.implementation == "auto" and accel.platform == "tpu"))
  layout = {"rows_per_step": rows_per_step, "batch_ways": batch_ways, "context": context, "taken": taken}
  return local, layout


def _dtype_bytes(dtype: str) -> int:
  return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _peak(sizes: BlockSizes, remat: str, local: Local, platform: str, microbatches: int, param_bytes: int,
          layer_grads: list[int], head_grads: int, layer_weights: Sequence[int]) -> tuple[int, int, str]:
  """(gradients, activations, which moment) at the moment of the step where their sum peaks."""
  layers = range(sizes.config.num_hidden_layers)
  # Blocks of one kind (dense or MoE) hold the same bytes: ask once per kind.
  kinds = [sizes.is_moe_layer(i) for i in layers]
  first = {kind: kinds.index(kind) for kind in set(kinds)}
  per_kind = {kind: (sum(sizes.residuals(i, local).values()), sizes.matmul_outputs(i, local),
                     sum(sizes.backward_working_set(i, local).values()))
              for kind, i in first.items()}
  residuals = [per_kind[kind][0] for kind in kinds]
  block_input = local.tokens * sizes.config.hidden_size * local.compute_bytes
  if remat == "none" or platform == "cpu":  # XLA:CPU recomputes every block ahead of the backward pass
    kept, recomputed = residuals, [0] * len(residuals)
  elif remat == "block":
    kept = [block_input] * len(residuals)
    recomputed = [r - block_input for r in residuals]
  else:  # "dots": the weight matmuls' outputs are kept, the rest recomputed
    kept = [block_input + per_kind[kind][1] for kind in kinds]
    recomputed = [max(r - k, 0) for r, k in zip(residuals, kept)]
  accumulator = param_bytes if microbatches > 1 else 0  # the scan's running gradient sum
  attention_forward = sizes.forward_working_set(local)
  loss = sum(sizes.cross_entropy_working_set(local).values())
  moments = [(accumulator, sum(kept) + attention_forward + layer_weights[-1], "forward of the last block"),
             (accumulator, sum(kept) + loss, "end of forward")]
  grads, kept_below = accumulator + head_grads, sum(kept)
  for i in reversed(layers):
    grads += layer_grads[i]
    # This block's gathered weights, and the next one's, fetched while this one computes.
    weights = layer_weights[i] + (layer_weights[i - 1] if i else 0)
    moments.append((grads, kept_below + recomputed[i] + per_kind[kinds[i]][2] + weights, f"backward of block {i}"))
    kept_below -= kept[i]
  moments.append((2 * param_bytes, 0, "update"))  # the gradients and the optimizer's update
  return max(moments, key=lambda m: m[0] + m[1])


def _flops(experiment: ExperimentConfig, sizes: BlockSizes, mesh: dict[str, int], local: Local) -> tuple[float, float]:
  """(model FLOPs, hardware FLOPs) of one step over all devices."""
  cfg, data, model = experiment.train, experiment.data, experiment.model
  tokens = data.global_batch_size * data.seq_len
  forward = flops.flops_breakdown(model, data.seq_len)
  model_flops = 3.0 * sum(forward.values()) * tokens
  recompute = {"none": 0.0, "block": sum(v for k, v in forward.items() if k != "lm_head"),
               "dots": forward["attention_scores"]}[cfg.remat]
  hardware = model_flops + recompute * tokens
  routed = sizes.routed_experts
  if routed is not None and forward.get("routed_experts"):
    # Each device runs its experts' share of the rows it dispatches; without an expert axis that is every row.
    share = (local.experts / routed.count) * (local.moe_mlp / routed.expert_hidden)
    devices = math.prod(mesh.values())
    routed_done = devices * cfg.microbatches * local.routed_tokens * share
    hardware += 3.0 * forward["routed_experts"] * max(routed_done - tokens, 0.0)
  return model_flops, hardware


def _communication(experiment: ExperimentConfig, sizes: BlockSizes, mesh: dict[str, int], local: Local,
                   layout: dict, params: _ParamLayout) -> float:
  """Bytes one device sends per step, ring collectives ((n - 1) / n of the data per device)."""
  cfg, model = experiment.train, experiment.model
  micro, c = cfg.microbatches, local.compute_bytes
  data_like = layout["batch_ways"] * layout["context"]  # devices that see different tokens
  uses = 3 if cfg.remat != "none" else 2  # forward, backward (and the recomputed forward)
  total = 0.0
  for n, gathered, count in params.shards:
    replicated = data_like // gathered
    # Gathered for each use, gradients reduce-scattered back: per micro-batch. All-reduced where replicated.
    total += count * micro * n * (gathered - 1) * (uses * c + F32)
    total += count * micro * 2 * n * F32 * (replicated - 1) / replicated
  t, d = local.tokens, model.hidden_size
  tensor = mesh.get("tensor", 1)
  if tensor > 1 and local.heads < model.num_attention_heads:  # two all-reduces of [T, D] per block and pass
    total += micro * model.num_hidden_layers * 2 * uses * 2 * t * d * c * (tensor - 1) / tensor
  routed = sizes.routed_experts
  if routed is not None and local.routed_tokens > t and local.experts < routed.count:
    group = local.routed_tokens // t  # token all-gather in, reduce-scatter out, per pass
    moe_layers = sum(sizes.is_moe_layer(i) for i in range(model.num_hidden_layers))
    total += micro * moe_layers * uses * 2 * t * d * c * (group - 1)
  context = layout["context"]
  if context > 1:  # keys and values go round the ring; their gradients come back round it
    kv = sizes.ring_kv_width(local)
    total += micro * model.num_hidden_layers * (uses + 1) * t * kv * c * (context - 1)
  return total


# --- stages, the XLA check and the table -----------------------------------------------------------


def stages(experiment: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
  """(stage name, the stage's experiment) for a staged recipe; [("", experiment)] otherwise."""
  if not experiment.stages:
    return [("", experiment)]
  return [(s.name, e) for s, (_, e) in zip(experiment.stages, stages_lib.stage_experiments(experiment))]


def compare_with_xla(experiment: ExperimentConfig, accel: Accelerator | None = None) -> tuple[Plan, int]:
  """(the plan for this process's devices, the compiled step's bytes per device), for `pretrain plan --xla`."""
  device = jax.devices()[0]
  accel = accel or Accelerator(device.device_kind, 0, flops.peak_flops_per_device(device)[0], device.platform)
  mesh = sharding.mesh_sizes(dataclasses.asdict(experiment.train.mesh), jax.device_count())
  return plan(experiment, mesh, accel), compiled.compiled_step_memory(experiment).total


def table(plans: Sequence[Plan]) -> str:
  """The plans as a Markdown table; sizes per device at the step's peak, in GiB (MiB for small runs)."""
  unit, scale = ("GiB", GIB) if max(p.total for p in plans) >= GIB else ("MiB", 2**20)

  def size(n: int) -> str:
    return f"{n / scale:,.1f}"

  header = ("stage", "devices", "mesh", "micro", "tokens/dev", f"params {unit}", f"grads {unit}",
            f"opt state {unit}", f"activations {unit}", f"total {unit}", f"usable {unit}", "fits", "step", "MFU",
            "comm/step")
  rows = [header, ("---",) * len(header)]
  for p in plans:
    rows.append((p.stage or "-", str(p.devices), _mesh_text(p.mesh), str(p.microbatches), f"{p.tokens_per_device:,}",
                 size(p.params), size(p.grads), size(p.optimizer), size(p.activations + p.batch), size(p.total),
                 size(p.capacity), "yes" if p.fits else "NO", f"{p.step_seconds:.3g} s", f"{p.mfu:.0%}",
                 f"{p.comm_bytes / 1e9:,.0f} GB"))
  return "\n".join("| " + " | ".join(row) + " |" for row in rows)
