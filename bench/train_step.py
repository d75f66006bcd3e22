"""Training-step throughput: ours (JAX) against the same model trained with transformers + PyTorch.

  .venv/bin/python bench/train_step.py            # both configs of the trainer issue, CPU
  .venv/bin/python bench/train_step.py --only moe --rounds 5

Same model shape, batch (4 x 512 tokens), AdamW and float32 on both sides, one process,
run as `pretrain train` runs (host_allocator.py's huge-page malloc, which helps both sides).
The two sides run in alternating rounds (3 steps each, 3 rounds by default) and each
side's best round counts, so a shared machine's drifting speed does not favour either.
Prints tokens/s for each, their ratio, our MFU against the measured matmul peak, and the
fraction of that peak the issue's ratio targets (1.2x dense, 3x MoE) would take.
Needs the `hf` extras (torch, transformers).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from step_setup import compiled_train_step

from pretrain import host_allocator
from pretrain.models import presets
from pretrain.train import flops
from pretrain.train.config import TrainConfig

BATCH, SEQ = 4, 512
CONFIGS = {
    "dense": presets.get("tiny-qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False, max_position_embeddings=4096),
    "moe": presets.get("tiny-deepseek-v2", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                       moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, kv_lora_rank=128,
                       qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                       num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1,
                       rope_scaling=presets.RopeScaling(), max_position_embeddings=4096),
}

TARGET_RATIO = {"dense": 1.2, "moe": 3.0}  # the trainer issue's targets against transformers + PyTorch


def ours(config):
  """A function running one of our training steps (compiled, warmed up) and waiting for it."""
  compiled, state, data = compiled_train_step(config, SEQ, BATCH, remat="none", loss_chunk=TrainConfig.loss_chunk)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], data)
    jax.block_until_ready(metrics)

  one_step()  # touches every buffer once
  return one_step


def pytorch(config):
  """A function running one transformers + PyTorch training step (warmed up)."""
  import torch
  import transformers

  from pretrain.convert import config_to_hf

  torch.manual_seed(0)
  hf = config_to_hf(config)
  cls = transformers.Qwen2Config if config.family == "qwen2" else transformers.DeepseekV2Config
  hf_config = cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
  hf_config._attn_implementation = "sdpa"
  model_cls = transformers.Qwen2ForCausalLM if config.family == "qwen2" else transformers.DeepseekV2ForCausalLM
  model = model_cls(hf_config).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  # Random tokens, as ours; transformers shifts the labels itself, so they are the inputs.
  inputs = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (BATCH, SEQ)))

  def one_step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  one_step()  # warm up
  return one_step


def compare(config, steps: int, rounds: int) -> tuple[float, float]:
  """(ours, PyTorch) tokens/s: the best of `rounds` alternating rounds of `steps` steps each.

  Alternating, so a machine whose speed drifts (a shared host) slows both sides alike.
  """
  runners = {"ours": ours(config), "torch": pytorch(config)}
  best = {name: 0.0 for name in runners}
  for _ in range(rounds):
    for name, one_step in runners.items():
      start = time.perf_counter()
      for _ in range(steps):
        one_step()
      best[name] = max(best[name], BATCH * SEQ * steps / (time.perf_counter() - start))
  return best["ours"], best["torch"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", choices=list(CONFIGS))
  parser.add_argument("--steps", type=int, default=3, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; the best counts")
  args = parser.parse_args()
  peak, how = flops.peak_flops_per_device()
  print(f"device {jax.devices()[0].device_kind}, peak {peak / 1e9:.1f} GFLOP/s ({how}); batch {BATCH} x {SEQ}")
  for name, config in CONFIGS.items():
    if args.only and name != args.only:
      continue
    jax_tps, torch_tps = compare(config, args.steps, args.rounds)
    flops_per_token = flops.flops_per_token(config, SEQ)
    utilisation = flops.mfu(jax_tps, flops_per_token, peak, 1)
    print(f"{name:<6} ours {jax_tps:10,.0f} tokens/s   transformers+torch {torch_tps:10,.0f} tokens/s   "
          f"ratio {jax_tps / torch_tps:5.2f}x   our MFU {utilisation:6.1%}")
    # What the ratio target asks of the hardware: the model FLOP/s it takes, against the probe.
    target = TARGET_RATIO[name]
    needed = flops.mfu(target * torch_tps, flops_per_token, peak, 1)
    print(f"{'':<6} {target:g}x PyTorch would be {target * torch_tps:,.0f} tokens/s: {needed:.0%} of the measured peak, "
          f"sustained over the whole step")


if __name__ == "__main__":
  host_allocator.reexec_tuned()  # as `pretrain train` runs
  main()
