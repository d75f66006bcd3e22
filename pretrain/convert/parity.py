"""Parity with transformers: tiny random HF models -> ours -> HF, logits compared.

`pretrain parity` runs every case below and prints a table; the tests run the same
cases one by one. Needs the `hf` extras (torch, transformers), used only as the
reference implementation.

Each case builds a model with transformers' own class, randomises every parameter
(norm scales around 1, biases included) so a swapped or mis-transposed tensor shows in
the logits, saves it, loads it with `load_hf`, compares logits; then `save_hf`,
reloads with `AutoModelForCausalLM` (no missing or unexpected keys), compares again,
and checks HF -> ours -> HF gives bit-identical tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np

TOLERANCE = 1e-4
INIT_STD = 0.15  # large enough that logits are far from trivially small

QWEN2_TINY = dict(
    vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

# transformers 5.23 always scales routed weights by routed_scaling_factor (ignoring norm_topk_prob) and makes
# every layer >= first_k_dense_replace MoE (ignoring moe_layer_freq): parity needs norm_topk_prob=False and
# moe_layer_freq=1, which are DeepSeek's released settings too.
DEEPSEEK_V2_TINY = dict(
    vocab_size=160, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, topk_method="greedy",
    n_group=None, topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.5, first_k_dense_replace=1,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

# name -> (family, overrides of the tiny config)
CASES: dict[str, tuple[str, dict]] = {
    "qwen2 untied": ("qwen2", {}),
    "qwen2 tied": ("qwen2", dict(tie_word_embeddings=True)),
    "deepseek_v2 full_q greedy": ("deepseek_v2", {}),
    "deepseek_v2 q_lora greedy": ("deepseek_v2", dict(q_lora_rank=16)),
    "deepseek_v2 q_lora group_limited": ("deepseek_v2", dict(q_lora_rank=16, topk_method="group_limited_greedy",
                                                             n_group=4, topk_group=2)),
    "deepseek_v2 full_q yarn": ("deepseek_v2", dict(rope_scaling=YARN, max_position_embeddings=64)),
    "deepseek_v2 q_lora yarn uneven mscale": ("deepseek_v2", dict(
        q_lora_rank=16, rope_scaling=YARN | {"mscale": 1.0, "mscale_all_dim": 0.8}, max_position_embeddings=64)),
    # rms_norm_eps applies to the block norms only; the latent q/kv norms keep 1e-6 (DeepSeek's code).
    "deepseek_v2 tied large eps": ("deepseek_v2", dict(q_lora_rank=16, tie_word_embeddings=True,
                                                       rms_norm_eps=0.05)),
}


def random_hf_model(family: str, seed: int = 0, **overrides):
  """A float32 transformers *ForCausalLM in eval mode, eager attention, every parameter random."""
  import torch
  import transformers

  model_cls, config_cls, values = {
      "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", QWEN2_TINY),
      "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepseekV2Config", DEEPSEEK_V2_TINY),
  }[family]
  # transformers edits nested dicts such as rope_scaling in place: give it a copy.
  config = getattr(transformers, config_cls)(**copy.deepcopy(values | overrides), initializer_range=INIT_STD)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, INIT_STD)
  return model


def input_ids(vocab: int, seq: int, batch: int = 2) -> np.ndarray:
  return np.random.RandomState(1234).randint(0, vocab, (batch, seq)).astype(np.int32)


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids)), np.float32)


def read_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  out = {}
  for file in sorted(pathlib.Path(hf_dir).glob("*.safetensors")):
    with safe_open(str(file), framework="numpy") as f:
      out.update({name: f.get_tensor(name) for name in f.keys()})
  return out


def reload_hf(hf_dir: pathlib.Path):
  """transformers' AutoModelForCausalLM on our export; any missing/unexpected/mismatched key is an error."""
  import torch
  import transformers

  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
  bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
  if bad:
    raise AssertionError(f"transformers reloaded {hf_dir} with {bad}")
  return hf_model.eval()


@dataclasses.dataclass(frozen=True)
class ParityResult:
  from_hf: float  # max |logits(ours loaded from HF) - logits(HF)|
  to_hf: float  # max |logits(HF reloaded from our export) - logits(HF)|
  identical_tensors: bool  # HF -> ours -> HF bit for bit
  max_logit: float

  @property
  def ok(self) -> bool:
    return self.from_hf <= TOLERANCE and self.to_hf <= TOLERANCE and self.identical_tensors


def round_trip(hf_model, workdir: pathlib.Path, seq: int = 16) -> ParityResult:
  from pretrain import convert

  src, out = pathlib.Path(workdir) / "hf", pathlib.Path(workdir) / "ours_to_hf"
  hf_model.save_pretrained(src)
  ids = input_ids(hf_model.config.vocab_size, seq)
  ref = hf_logits(hf_model, ids)
  model = convert.load_hf(src)
  from_hf = float(np.abs(our_logits(model, ids) - ref).max())
  convert.save_hf(model, out)
  to_hf = float(np.abs(hf_logits(reload_hf(out), ids) - ref).max())
  before, after = read_tensors(src), read_tensors(out)
  identical = sorted(before) == sorted(after) and all(
      after[k].dtype == v.dtype and after[k].shape == v.shape and np.array_equal(after[k], v)
      for k, v in before.items())
  return ParityResult(from_hf, to_hf, identical, float(np.abs(ref).max()))


def main(workdir: str | None = None) -> None:
  """Runs every case, prints a table, raises if any case misses the tolerance."""
  import transformers

  transformers.utils.logging.set_verbosity_error()  # keep the table readable
  transformers.utils.logging.disable_progress_bar()
  print(f"parity with transformers, float32, tolerance {TOLERANCE:g} on max |logit difference|")
  print(f"{'case':<40}{'from HF':>10}{'to HF':>10}  {'tensors':<10}{'max |logit|':>12}")
  failed = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(workdir or tmp)
    for i, (name, (family, overrides)) in enumerate(CASES.items()):
      result = round_trip(random_hf_model(family, **overrides), root / f"case{i}")
      tensors = "identical" if result.identical_tensors else "DIFFER"
      print(f"{name:<40}{result.from_hf:>10.2e}{result.to_hf:>10.2e}  {tensors:<10}{result.max_logit:>12.2f}")
      if not result.ok:
        failed.append(name)
  if failed:
    raise AssertionError(f"parity failed for: {', '.join(failed)}")
  print("all cases within tolerance; HF -> ours -> HF tensors bit-identical")
