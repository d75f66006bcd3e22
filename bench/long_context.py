"""Long-context training step: peak memory and time of one step at 8K..128K tokens.

  .venv/bin/python bench/long_context.py                    # 8K, 16K, 32K, 64K, 128K (minutes)
  .venv/bin/python bench/long_context.py --lengths 8192,32768

One training step (forward, backward, AdamW update) of a tiny DeepSeek-V2-style model
(MLA + MoE, YaRN s=40) on one sequence of S tokens, one document (the worst case: no
block is skipped across documents), blockwise attention, fused chunked cross-entropy,
remat per block. Each length runs in a fresh process, so its peak RSS is its own.
Prints per length: step seconds (after compilation), the process's peak RSS, XLA's
temporary buffer size for the step, and the ratios against 32K (target: 128K at most
4.5x the 32K peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from pretrain import host_allocator

CHILD = "--child"


def one_length(seq: int, repeats: int) -> dict:
  import jax
  from step_setup import compiled_train_step

  from pretrain.models import presets
  from pretrain.models.config import RopeScaling

  config = presets.get("tiny-deepseek-v2", max_position_embeddings=163840, rope_scaling=RopeScaling(
      type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707))
  compiled, state, batch = compiled_train_step(config, seq, 1)
  temp = compiled.memory_analysis().temp_size_in_bytes
  seconds = []
  for _ in range(repeats):  # the first run also pays for touching every buffer once
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  seconds = seconds[-1]
  loss = float(metrics["loss"])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return {"seq": seq, "seconds": seconds, "peak_rss": peak, "xla_temp": temp, "loss": loss}


def main() -> None:
  if len(sys.argv) == 4 and sys.argv[1] == CHILD:
    print(json.dumps(one_length(int(sys.argv[2]), int(sys.argv[3]))))
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
  parser.add_argument("--repeats", type=int, default=1, help="steps run per length; the last is timed (default 1: "
                      "the first step after compilation, page faults included; at 128K a step takes minutes)")
  args = parser.parse_args()
  rows = []
  for seq in (int(s) for s in args.lengths.split(",")):
    out = subprocess.run([sys.executable, __file__, CHILD, str(seq), str(args.repeats)], capture_output=True, text=True)
    if out.returncode:
      print(f"{seq:>7}: failed\n{out.stderr[-2000:]}")
      continue
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"{r['seq']:>7} tokens  step {r['seconds']:8.2f} s  peak RSS {r['peak_rss'] / 2**20:8.0f} MiB  "
          f"XLA temp {r['xla_temp'] / 2**20:8.0f} MiB  loss {r['loss']:.3f}", flush=True)
  base = next((r for r in rows if r["seq"] == 32768), None)
  if base:
    for r in rows:
      print(f"{r['seq']:>7} vs 32K: peak RSS x{r['peak_rss'] / base['peak_rss']:.2f}, "
            f"XLA temp x{r['xla_temp'] / base['xla_temp']:.2f}, time x{r['seconds'] / base['seconds']:.2f}")


if __name__ == "__main__":
  host_allocator.reexec_tuned()  # as `pretrain train` runs
  main()
