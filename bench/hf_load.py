"""Hugging Face import onto a mesh, and export back: bytes read, peak memory and time per process.

  .venv/bin/python bench/hf_load.py                      # builds the checkpoint once (~2 GB), then measures
  .venv/bin/python bench/hf_load.py --workdir /data/bench --no-drop-caches

Builds a synthetic DeepSeek-V2 checkpoint with transformers (~460M parameters, 1.8 GB of
float32 in 500 MB safetensors shards, 64 routed experts), then, each in fresh processes:
  - `read`: the files read once, sequentially (the disk's bandwidth, the yardstick);
  - `1x8`: one process with 8 CPU devices loads it onto `fsdp=8`;
  - `2x4`: two processes (`jax.distributed` on 127.0.0.1) with 4 devices each, `fsdp=8`;
  - `export`: the loaded parameters saved as a `pretrain convert --to-orbax` checkpoint, then
    streamed back to Hugging Face safetensors (`convert.export`), in one process.
Per process: tensor bytes read (what the loader asked for) and disk read (what the kernel read
from the block device for it, /proc/self/io: whole pages, readahead included), peak RSS above the process's baseline (measured just before
the load, the VmHWM reset through /proc/self/clear_refs), its share of the parameters (on
CPU the devices' memory is the process's), wall time and GB/s. Before each measurement the
page cache is dropped (root only; `--no-drop-caches` to skip), so reads come from the disk.
Targets (issue 13): with 2 processes each reads at most 55% of the bytes; peak RSS above
baseline at most the process's share plus the read window; load time within 1.5x of
reading the files once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
              num_hidden_layers=8, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64,
              qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
              topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=4096,
              tie_word_embeddings=False)
WINDOW = 256 * 2**20


def build_checkpoint(out: pathlib.Path) -> None:
  import torch
  import transformers

  if (out / "config.json").exists():
    return
  config = transformers.DeepseekV2Config(**CONFIG)
  torch.manual_seed(0)
  with torch.no_grad():
    model = transformers.DeepseekV2ForCausalLM(config).to(torch.float32)
  model.save_pretrained(out, max_shard_size="500MB")


def rss_bytes(field: str) -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def disk_read_bytes() -> int:
  """Bytes this process's reads took from the block device (page-cache hits excluded, readahead included)."""
  for line in pathlib.Path("/proc/self/io").read_text().splitlines():
    if line.startswith("read_bytes:"):
      return int(line.split()[1])
  raise KeyError("read_bytes")


def reset_peak() -> int:
  pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
  return rss_bytes("VmRSS")


def child_read(hf_dir: pathlib.Path) -> dict:
  started, total, disk = time.perf_counter(), 0, disk_read_bytes()
  for file in sorted(hf_dir.glob("*.safetensors")):
    with open(file, "rb", buffering=0) as f:
      while chunk := f.read(64 * 2**20):
        total += len(chunk)
  return {"bytes_read": total, "seconds": time.perf_counter() - started, "disk_read": disk_read_bytes() - disk}


def child_load(hf_dir: pathlib.Path, coordinator: str | None, process_id: int, processes: int) -> dict:
  import jax

  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, processes, process_id)
  from flax import nnx

  from pretrain import models
  from pretrain.convert import hf_import, hf_io, param_shapes
  from pretrain.train import sharding
  from pretrain.train.config import DEFAULT_AXIS_RULES, MeshConfig

  mesh = sharding.make_mesh(MeshConfig(fsdp=8))
  abstract = nnx.state(models.build_abstract(hf_io.read_config(hf_dir)), nnx.Param)
  targets = param_shapes.placed(abstract, sharding.param_shardings(abstract, mesh, DEFAULT_AXIS_RULES))
  baseline, disk = reset_peak(), disk_read_bytes()
  params, stats = hf_import.load_hf_params(hf_dir, targets, read_window_bytes=WINDOW)
  jax.block_until_ready(params)
  peak, disk = rss_bytes("VmHWM") - baseline, disk_read_bytes() - disk
  share = sum(sum(s.data.nbytes for s in {str(s.index): s for s in a.addressable_shards}.values())
              for a in jax.tree.leaves(params))
  out = {"bytes_read": stats.bytes_read, "checkpoint_bytes": stats.checkpoint_bytes, "seconds": stats.seconds,
         "peak_rss_above_baseline": peak, "share": share, "disk_read": disk}
  if processes == 1 and os.environ.get("BENCH_SAVE_ORBAX"):
    from pretrain.convert import orbax_io

    orbax_io.save_params(params, hf_io.read_config(hf_dir), os.environ["BENCH_SAVE_ORBAX"])
  return out


def child_export(orbax_dir: pathlib.Path, out_dir: pathlib.Path) -> dict:
  from pretrain.convert import export

  baseline = reset_peak()
  started = time.perf_counter()
  stats = export.export_hf(str(orbax_dir), str(out_dir), dtype="float32")
  return {"seconds": time.perf_counter() - started, "peak_rss_above_baseline": rss_bytes("VmHWM") - baseline,
          "bytes_written": stats.bytes_written, "largest_tensor": stats.largest_tensor_bytes}


def spawn(args: list[str], devices: int, env: dict | None = None) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             **(env or {}))
  return subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True, env=env)


def collect(processes: list[subprocess.Popen]) -> list[dict]:
  results = []
  for p in processes:
    out, _ = p.communicate()
    if p.returncode:
      raise SystemExit(f"a benchmark process failed (exit {p.returncode})")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def drop_caches(enabled: bool) -> None:
  if enabled:
    os.sync()
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("1")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/pretrain-bench-hf-load")
  parser.add_argument("--no-drop-caches", dest="drop", action="store_false")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    kind, *rest = args.child
    if kind == "read":
      result = child_read(pathlib.Path(rest[0]))
    elif kind == "load":
      result = child_load(pathlib.Path(rest[0]), rest[1] or None, int(rest[2]), int(rest[3]))
    else:
      result = child_export(pathlib.Path(rest[0]), pathlib.Path(rest[1]))
    print(json.dumps(result))
    return

  root = pathlib.Path(args.workdir)
  hf_dir = root / "hf"
  build_checkpoint(hf_dir)
  total = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
  print(f"checkpoint {hf_dir}: {total / 1e9:.2f} GB float32, {len(list(hf_dir.glob('*.safetensors')))} files; "
        f"read window {WINDOW / 2**20:.0f} MiB; page cache {'dropped' if args.drop else 'kept'} before each run")
  rows = []
  drop_caches(args.drop)
  (plain,) = collect([spawn(["read", str(hf_dir)], 1)])
  rows.append(("read the files once", 0, plain, None))
  drop_caches(args.drop)
  orbax_dir, export_dir = root / "orbax", root / "export"
  for d in (orbax_dir, export_dir):
    subprocess.run(["rm", "-rf", str(d)], check=True)
  (one,) = collect([spawn(["load", str(hf_dir), "", "0", "1"], 8, {"BENCH_SAVE_ORBAX": str(orbax_dir)})])
  rows.append(("1 process x 8 devices", 0, one, None))
  drop_caches(args.drop)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  pod = collect([spawn(["load", str(hf_dir), f"127.0.0.1:{port}", str(i), "2"], 4) for i in range(2)])
  rows += [("2 processes x 4 devices", i, r, None) for i, r in enumerate(pod)]
  drop_caches(args.drop)
  (exported,) = collect([spawn(["export", str(orbax_dir), str(export_dir)], 1)])

  print(f"{'run':<26}{'proc':>5}{'bytes read':>12}{'of ckpt':>9}{'disk read':>11}{'share':>9}{'peak RSS+':>11}{'share+win':>11}"
        f"{'seconds':>9}{'GB/s':>7}{'vs read':>9}")
  for name, process, r, _ in rows:
    share = r.get("share")
    print(f"{name:<26}{process:>5}{r['bytes_read'] / 1e9:>11.2f}G{r['bytes_read'] / total:>9.0%}"
          f"{r['disk_read'] / 1e9:>10.2f}G"
          f"{(share / 1e9 if share else 0):>8.2f}G"
          f"{(r['peak_rss_above_baseline'] / 1e9 if 'peak_rss_above_baseline' in r else 0):>10.2f}G"
          f"{((share + WINDOW) / 1e9 if share else 0):>10.2f}G"
          f"{r['seconds']:>9.1f}{r['bytes_read'] / 1e9 / r['seconds']:>7.2f}{r['seconds'] / plain['seconds']:>8.2f}x")
  print(f"export (orbax -> HF float32): {exported['bytes_written'] / 1e9:.2f} GB written in {exported['seconds']:.1f} s, "
        f"peak RSS above baseline {exported['peak_rss_above_baseline'] / 2**20:.0f} MiB "
        f"(largest tensor {exported['largest_tensor'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
  main()
