"""Typed settings of a training run: optimizer and schedule, mesh and sharding, loop, checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pretrain.models.config import RopeScaling
from pretrain.schema import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """AdamW with the DeepSeek-Coder-V2 recipe's betas, decay and schedule."""

  peak_learning_rate: float = 3e-4
  warmup_steps: int = 2000  # linear from 0 to peak
  end_learning_rate_fraction: float = 0.1  # cosine decay to this fraction of peak at the last step
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  # Parameters whose '/'-joined path matches any of these regexes get no weight decay.
  no_weight_decay: tuple[str, ...] = (r".*norm.*/scale$", r".*_bias$", r".*/bias$")
  clip_global_norm: float = 1.0

  def validate(self, key: str) -> None:
    if self.peak_learning_rate <= 0:
      raise ConfigError(f"{key}.peak_learning_rate", f"must be positive, got {self.peak_learning_rate}")
    if self.warmup_steps < 0:
      raise ConfigError(f"{key}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
    if not 0.0 <= self.end_learning_rate_fraction <= 1.0:
      raise ConfigError(f"{key}.end_learning_rate_fraction", f"must be within [0, 1], got "
                        f"{self.end_learning_rate_fraction}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Device mesh axis sizes; -1 takes the devices left over (at most one axis may say -1)."""

  data: int = -1
  fsdp: int = 1
  context: int = 1  # splits each row's tokens (context parallelism, ring attention; seq_len % (2 * context) == 0)
  tensor: int = 1
  expert: int = 1


# Logical parameter/activation axis -> mesh axes. One table: changing the parallelism plan is a config change.
DEFAULT_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("sequence", ("context",)),  # the tokens of a row (activations only)
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("q_lora", ()),
    ("kv_lora", ()),
    ("norm", ()),
    ("layers", ()),  # the leading axis of scanned blocks' stacked parameters (models/block_stack.py)
)


EVAL_KINDS = ("ppl", "niah", "humaneval", "fim")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """An evaluation the trainer runs on its own parameters (train/evals.py): at every step that is a
  multiple of `every` and at the run's last step (each stage's, in a staged recipe). Each kind reads
  the fields `pretrain eval <kind>` has flags for; the others are ignored."""

  kind: Literal["ppl", "niah", "humaneval", "fim"]
  every: int = 0  # steps (0: only at the last step)
  limit: int = 0  # humaneval problems / fim tasks / ppl documents per component (0: all; ppl: 100)
  mixture: str = ""  # ppl: the held-out mixture file (required); niah: the haystack's (default: built-in)
  lengths: tuple[int, ...] = ()  # niah: context lengths in tokens (required)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # niah
  trials: int = 2  # niah: passkeys per cell
  samples: int = 1  # humaneval: completions per problem
  temperature: float = 0.0  # humaneval, fim: 0 is greedy
  top_p: float = 1.0
  max_new_tokens: int = 0  # humaneval, fim (0: 512 for humaneval, 64 for fim)
  mode: Literal["psm", "spm"] = "psm"  # fim
  batch_size: int = 16  # humaneval, fim: prompts decoded at once
  timeout_s: float = 5.0  # humaneval, fim: per test program
  seed: int = 0

  def validate(self, key: str) -> None:
    for name in ("every", "limit", "max_new_tokens"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
    for name in ("trials", "samples", "batch_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
    if self.kind == "ppl" and not self.mixture:
      raise ConfigError(f"{key}.mixture", "a ppl evaluation needs a held-out mixture file")
    if self.kind == "niah" and not self.lengths:
      raise ConfigError(f"{key}.lengths", "a niah evaluation needs context lengths")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  workdir: str = "runs/default"
  steps: int = 100
  microbatches: int = 1  # gradient accumulation: the global batch is split into this many sequential parts
  remat: Literal["none", "block", "dots"] = "none"  # per block: keep nothing / keep weight matmuls (models)
  loss_chunk: int = 1024  # tokens per chunk of the cross-entropy (logits never exist for the whole sequence)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  axis_rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_AXIS_RULES
  log_every: int = 10
  checkpoint_every: int = 100
  keep_last: int = 3
  keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
  init_from: str = ""  # a Hugging Face directory, an Orbax checkpoint or a run's work directory: its parameters
  # Host memory a Hugging Face init_from reads at a time, beyond the process's own shards.
  init_read_window_mib: int = 256
  # With init_from a run's work directory: also continue its Adam moments (the schedule starts afresh).
  init_optimizer_state: bool = False
  # Resume from this checkpoint step instead of the newest one that restores (0: the newest).
  resume_step: int = 0
  # Resuming with other data, optimizer or schedule settings than experiment.json's is refused; with this,
  # each change is recorded there ("changes", with the step it took effect) and the run goes on.
  allow_config_change: bool = False
  # Hugging Face exports in <workdir>/hf/<step>/, written by all processes from the step's checkpoint:
  export_hf: bool = False  # of the last step (each stage's, in a staged recipe)
  export_hf_every: int = 0  # and of every step that is a multiple of this (0: none)
  export_hf_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
  evals: tuple[EvalConfig, ...] = ()  # evaluations during training (train/evals.py)
  grad_spike_factor: float = 10.0  # a gradient norm above this times its running median skips the update
  max_bad_steps: int = 5  # consecutive skipped updates before the run stops

  def validate(self, key: str) -> None:
    for name in ("steps", "microbatches", "loss_chunk", "log_every", "checkpoint_every", "keep_last",
                 "max_bad_steps", "init_read_window_mib"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
    if self.resume_step < 0:
      raise ConfigError(f"{key}.resume_step", f"must be >= 0 (0: the newest checkpoint), got {self.resume_step}")
    if self.export_hf_every < 0:
      raise ConfigError(f"{key}.export_hf_every", f"must be >= 0 (0: no periodic exports), got {self.export_hf_every}")
    kinds = [e.kind for e in self.evals]
    for i, evaluation in enumerate(self.evals):
      if kinds.index(evaluation.kind) != i:
        raise ConfigError(f"{key}.evals[{i}].kind", f"a second {evaluation.kind!r} evaluation; one of each kind")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
  """One stage of a staged recipe: what changes from the experiment's settings for it.

  A stage starts from the previous stage's final parameters (the first from
  `train.init_from`), with a fresh schedule; `carry_optimizer_state` also continues the
  previous stage's Adam moments. Unset fields keep the experiment's values.
  """

  name: str
  steps: int
  seq_len: int | None = None
  global_batch_size: int | None = None
  optimizer: OptimizerConfig | None = None  # this stage's schedule (peak, warmup, end fraction)
  weights: dict[str, float] = dataclasses.field(default_factory=dict)  # mixture weights, by component name
  min_length: int | None = None  # drop shorter documents (tokens): upsamples long documents
  rope_scaling: RopeScaling | None = None  # None: the model's own
  microbatches: int | None = None
  carry_optimizer_state: bool = False

  def validate(self, key: str) -> None:
    if not self.name or "/" in self.name or self.name.startswith("."):
      raise ConfigError(f"{key}.name", f"must be a plain directory name, got {self.name!r}")
    if self.steps < 1:
      raise ConfigError(f"{key}.steps", f"must be >= 1, got {self.steps}")
