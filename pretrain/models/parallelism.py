"""How a model's computation is laid out on the devices: one immutable plan, given to `models.build`.

Built once per run from the mesh and the axis rules (`train/sharding.py`, `parallelism`); each
module takes what it needs of it when it is constructed, and nothing is set on a module
afterwards. The default is one device: nothing split, and each block's forward pass keeps what
XLA would keep (`remat="none"`).
"""

from __future__ import annotations

import dataclasses

from jax.sharding import NamedSharding

from pretrain.models.context_parallel import ContextParallel
from pretrain.models.expert_parallel import ExpertParallel


@dataclasses.dataclass(frozen=True)
class Parallelism:
  remat: str = "none"  # what each block's forward pass keeps for the backward pass (causal_lm.REMAT_POLICIES)
  activation_sharding: NamedSharding | None = None  # where [B, S, D] hidden states live between blocks
  attention: ContextParallel | None = None  # how the mesh splits attention's operands (ring attention: the sequence)
  experts: ExpertParallel | None = None  # how the routed experts are split over the devices


ONE_DEVICE = Parallelism()
