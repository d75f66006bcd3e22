"""The chips `pretrain plan` plans for: memory per chip, bf16 dense peak, and the platform's habits."""

from __future__ import annotations

import dataclasses

from pretrain.schema import ConfigError
from pretrain.train import flops

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  memory_bytes: int  # per chip
  peak_flops: float  # bf16 dense, per chip
  platform: str  # "tpu", "gpu" or "cpu": which kernels `auto` picks and how remat is scheduled
  # The most devices a tensor-parallel group may span: its all-reduces run every block, so on GPUs it stays
  # inside one NVLink domain (an 8-GPU HGX node); a TPU slice's ICI torus connects every chip.
  max_tensor: int | None = None


# Per chip: HBM capacity from the vendors' datasheets (Cloud TPU system architecture pages: v4 32 GiB,
# v5e 16 GiB, v5p 95 GiB, v6e Trillium 32 GiB; NVIDIA A100 40/80 GB, H100 SXM 80 GB, H200 141 GB) and
# the bf16 dense peak of train/flops.py's table, the one the trainer's MFU uses.
def _chip(name: str, memory_bytes: int, platform: str, **kwargs) -> Accelerator:
  return Accelerator(name, memory_bytes, flops.datasheet_peak(name, platform), platform, **kwargs)


ACCELERATORS: dict[str, Accelerator] = {
    "v4": _chip("TPU v4", 32 * GIB, "tpu"),
    "v5e": _chip("TPU v5e", 16 * GIB, "tpu"),
    "v5p": _chip("TPU v5p", 95 * GIB, "tpu"),
    "v6e": _chip("TPU v6e", 32 * GIB, "tpu"),
    "a100-40gb": _chip("A100 40GB", 40 * GIB, "gpu", max_tensor=8),
    "a100-80gb": _chip("A100 80GB", 80 * GIB, "gpu", max_tensor=8),
    "h100": _chip("H100 SXM", 80 * GIB, "gpu", max_tensor=8),
    "h200": _chip("H200", 141 * 10**9, "gpu", max_tensor=8),
}


def accelerator(name: str) -> Accelerator:
  """The accelerator named (case-insensitive; `tpu-v5p` and `v5p` alike)."""
  key = name.lower().removeprefix("tpu-").removeprefix("tpu ")
  if key not in ACCELERATORS:
    raise ConfigError("--accelerator", f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
  return ACCELERATORS[key]

