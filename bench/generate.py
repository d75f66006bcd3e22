"""Greedy generation speed on CPU: ours (pretrain.generate) against transformers' `generate`, same weights and prompts.

  .venv/bin/python bench/generate.py                     # ~100M Qwen2 and DeepSeek-V2, batch 1 and 16
  .venv/bin/python bench/generate.py --families qwen2 --batches 1 --new-tokens 32 --repeats 1
  taskset -c 0 .venv/bin/python bench/generate.py        # one core each: see below

Each family's random model is built with transformers' own class (convert/parity.py's
`random_hf_model`: every parameter random, so greedy tokens are well separated), saved, and
loaded back by both sides: transformers with `from_pretrained`'s defaults (sdpa attention, its
default experts kernel), ours with `convert.load_hf`; float32 both. The prompts are random token
ids of one length, so no row is padded; every row generates all `--new-tokens` tokens (no EOS).

Measured the same way on both sides, best of `--repeats` rounds (ours and HF in turn) after a
warm-up call of the same shapes (ours' first call compiles; its wall time is reported apart):
  - prefill tok/s: batch * prompt length / one forward pass over the prompts with a cache (HF: the
    model called with `use_cache=True, logits_to_keep=1`, as `generate` runs it; ours: the engine's
    prefill_seconds, its compiled prefill plus the first token's sampling);
  - decode tok/s: batch * (new tokens - 1) / the time after the prefill (HF: `generate` of N new
    tokens less `generate` of 1; ours: the engine's decode_seconds, its compiled decode loop);
  - match: the fraction of generated tokens equal between the two (reported, not asserted: float32
    rounding can flip a near-tie, after which a row's tokens differ);
  - e2e: the whole `generate` call's wall time, HF's over ours.
The issue's target: ours at least 2x transformers' decode tok/s at both batch sizes.

Both use as many threads as the process may run on (its CPU affinity). On a host shared with other
work, PyTorch's OpenMP threads wait at every op's barrier for a descheduled sibling: transformers'
decode, thousands of small ops a token, then slows by 10x or more while XLA's few large ops barely
do. `taskset -c 0` (one thread each) compares the two without that.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from pretrain import convert, generate, host_allocator
from pretrain.convert import parity
from pretrain.generate import kv_cache
from pretrain.models import param_count

# About 100M parameters each, embeddings tied (as Qwen2-0.5B's).
CONFIGS = {
    "qwen2": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                  tie_word_embeddings=True),
    # 16 routed experts of width 256 (not 512) keep the total near 100M at 8 layers.
    "deepseek_v2": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256,
                        num_hidden_layers=8, num_attention_heads=12, q_lora_rank=None, kv_lora_rank=128,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                        max_position_embeddings=4096, tie_word_embeddings=True),
}


def ours_once(model, prompts: list[list[int]], new_tokens: int) -> tuple[dict, np.ndarray]:
  started = time.perf_counter()
  out = generate.generate_with_stats(model, prompts, max_new_tokens=new_tokens, temperature=0.0, eos_id=None)
  wall = time.perf_counter() - started
  assert out.decode_steps == new_tokens - 1 and out.batch == len(prompts), out  # no row stopped early, none padded
  return dict(prefill=out.prefill_seconds, decode=out.decode_seconds, wall=wall), np.asarray(out.tokens)


def hf_once(hf_model, ids: torch.Tensor, new_tokens: int) -> tuple[dict, np.ndarray]:
  mask = torch.ones_like(ids)

  def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out

  def gen(n: int):
    return hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=0)

  with torch.inference_mode():
    prefill, _ = timed(lambda: hf_model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1))
    one, _ = timed(lambda: gen(1))
    wall, out = timed(lambda: gen(new_tokens))
  return dict(prefill=prefill, one=one, wall=wall), out[:, ids.shape[1]:].numpy()


def measure(model, hf_model, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[dict, dict, float]:
  """(ours, HF) best times and the match; the two alternate, so a shared machine's drifting load hits both alike."""
  ids = torch.tensor(prompts, dtype=torch.long)
  started = time.perf_counter()
  ours_once(model, prompts, new_tokens)  # compiles the prefill and the decode loop for these shapes
  first_call = time.perf_counter() - started
  with torch.inference_mode():
    hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                      pad_token_id=0)  # allocator, threads, kernels
  runs = [(ours_once(model, prompts, new_tokens), hf_once(hf_model, ids, new_tokens)) for _ in range(repeats)]
  (_, ours_tokens), (_, hf_tokens) = runs[0]
  assert hf_tokens.shape == ours_tokens.shape == (len(prompts), new_tokens), (hf_tokens.shape, ours_tokens.shape)
  ours = {k: min(o[k] for (o, _), _ in runs) for k in ("prefill", "decode", "wall")} | dict(first_call=first_call)
  hf = {k: min(h[k] for _, (h, _) in runs) for k in ("prefill", "one", "wall")}
  hf["decode"] = hf["wall"] - hf["one"]
  return ours, hf, float((ours_tokens == hf_tokens).mean())


def full_kv_bytes_per_token(config) -> int:
  """Bytes per token of one row, all layers, of every head's own keys and values in float32."""
  key, value = (config.qk_head_dim, config.v_head_dim) if hasattr(config, "kv_lora_rank") else (config.head_dim,) * 2
  return config.num_hidden_layers * config.num_attention_heads * (key + value) * 4


def weight_read_ms(model) -> float:
  """Milliseconds to read every parameter once (best of 3): the least a batch-1 decode step of a dense
  model can take, since each new token multiplies with all of them."""
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  read = jax.jit(lambda ps: sum(jnp.sum(p) for p in ps))
  jax.block_until_ready(read(params))
  times = []
  for _ in range(3):
    started = time.perf_counter()
    jax.block_until_ready(read(params))
    times.append(time.perf_counter() - started)
  return 1e3 * min(times)


def cache_bytes_per_token(model, hf_model) -> tuple[int, int]:
  """(ours, transformers') cache bytes per token of one row, all layers, from a 16-token prefill."""
  tokens = np.ones((1, 16), np.int32)
  _, cache = generate.prefill(model, tokens, np.full(1, 16), cache_length=16)
  with torch.inference_mode():
    hf_cache = hf_model(torch.from_numpy(tokens).long(), use_cache=True, logits_to_keep=1).past_key_values
  hf_bytes = sum(t.numel() * t.element_size() for layer in hf_cache.layers for t in (layer.keys, layer.values))
  return kv_cache.bytes_per_token(cache), hf_bytes // 16


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--families", default="qwen2,deepseek_v2")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--prompt-length", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2, help="timed rounds (ours, then HF); the best of each counts")
  args = parser.parse_args()
  threads = len(os.sched_getaffinity(0))  # XLA:CPU sizes its thread pool by the affinity too
  torch.set_num_threads(threads)
  batches = [int(b) for b in args.batches.split(",")]
  print(f"CPU, {threads} threads each; prompts {args.prompt_length} tokens, {args.new_tokens} new tokens, greedy; "
        f"best of {args.repeats}")

  rows, details = [], []
  for family in args.families.split(","):
    with tempfile.TemporaryDirectory() as hf_dir:
      parity.random_hf_model(family, **CONFIGS[family]).save_pretrained(hf_dir)
      hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
      model = convert.load_hf(hf_dir)
    hf_model.generation_config.eos_token_id = None  # every row generates all tokens, as ours with eos_id=None
    counts = param_count.count(model.config)
    params = f"{counts.total / 1e6:.0f}M"
    if counts.active < counts.total:
      params += f" ({counts.active / 1e6:.0f}M act)"
    ours_cache, hf_cache = cache_bytes_per_token(model, hf_model)
    full, read_ms = full_kv_bytes_per_token(model.config), weight_read_ms(model)
    print(f"{family}: {counts.total:,} parameters ({counts.active:,} active); HF attention "
          f"{hf_model.config._attn_implementation}, experts {hf_model.config._experts_implementation}; "
          f"cache per token: ours {ours_cache:,} B, HF {hf_cache:,} B, every head's K/V {full:,} B "
          f"(x{full / ours_cache:.1f} ours); reading all parameters once {read_ms:.1f} ms: batch-1 decode "
          f"<= ~{1e3 / read_ms * counts.total / counts.active:.0f} tok/s", flush=True)
    for batch in batches:
      rng = np.random.RandomState(batch)
      prompts = rng.randint(0, model.config.vocab_size, (batch, args.prompt_length)).tolist()
      ours, hf, match = measure(model, hf_model, prompts, args.new_tokens, args.repeats)
      prefill_tokens, decode_tokens = batch * args.prompt_length, batch * (args.new_tokens - 1)
      row = (family, params, batch, prefill_tokens / ours["prefill"], prefill_tokens / hf["prefill"],
             decode_tokens / ours["decode"], decode_tokens / hf["decode"])
      rows.append(row + (row[5] / row[6], match))
      details.append((family, batch, ours["first_call"], ours["wall"], hf["wall"]))
      print(f"  batch {batch:>2}: ours prefill {ours['prefill']:.3f} s decode {ours['decode']:.3f} s; "
            f"HF prefill {hf['prefill']:.3f} s decode {hf['decode']:.3f} s", flush=True)

  header = ("family", "params", "batch", "ours prefill tok/s", "HF prefill tok/s", "ours decode tok/s",
            "HF decode tok/s", "speedup", "match")
  widths = [max(len(h), 11) for h in header]
  widths[1] = max(widths[1], max(len(r[1]) for r in rows))
  print()
  print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
  for r in rows:
    cells = (r[0], r[1], str(r[2]), *(f"{v:,.0f}" for v in r[3:7]), f"x{r[7]:.2f}", f"{r[8]:.3f}")
    print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
  print()
  print("     family  batch  ours 1st call s (compiling)  ours generate s  HF generate s      e2e")
  for family, batch, first_s, ours_wall, hf_wall in details:
    print(f"{family:>11}  {batch:>5}  {first_s:27.1f}  {ours_wall:15.2f}  {hf_wall:13.2f}  x{hf_wall / ours_wall:6.2f}")


if __name__ == "__main__":
  host_allocator.reexec_tuned()  # as `pretrain generate` runs
  main()
