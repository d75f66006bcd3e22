"""Generation (pretrain/generate/): greedy tokens equal transformers' `generate` on tiny random models
of both families; cached decoding gives the full forward pass's logits; MLA caches only its latent
and rotary key; sampling draws from the top-k / top-p restricted softmax(logits / T), reproducibly;
a mesh generates what one device does; bad prompts are refused with the offending prompt named."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from tiny_tokenizers import tiny_tokenizer

from pretrain import convert, generate, models
from pretrain.convert import parity
from pretrain.generate import engine, kv_cache, sampling, text
from pretrain.models import block_stack, presets
from pretrain.schema import ConfigError

PROMPT_LENGTHS = (5, 11, 1, 8)
NEW_TOKENS = 20
HF_EOS = 2  # the tiny configs' eos_token_id


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [rng.randint(3, vocab, n).tolist() for n in lengths]


def _load(hf_model, tmp_path: pathlib.Path):
  hf_model.save_pretrained(tmp_path / "hf")
  return convert.load_hf(tmp_path / "hf")


@pytest.mark.parametrize("case", [
    "qwen2 untied", "deepseek_v2 full_q greedy", "deepseek_v2 q_lora group_limited", "deepseek_v2 full_q yarn",
    pytest.param("qwen2 tied", marks=pytest.mark.slow),
    pytest.param("deepseek_v2 q_lora yarn uneven mscale", marks=pytest.mark.slow),
])
def test_greedy_generation_equals_transformers(case, tmp_path):
  import torch

  family, overrides = parity.CASES[case]
  hf_model = parity.random_hf_model(family, **overrides)
  prompts = _prompts(hf_model.config.vocab_size)
  ours = generate.generate(_load(hf_model, tmp_path), prompts, max_new_tokens=NEW_TOKENS, eos_id=HF_EOS)
  for prompt, got in zip(prompts, ours, strict=True):
    # One prompt at a time, unpadded: HF's own padding handling is not what is under test.
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=HF_EOS, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name, overrides", [
    ("tiny-qwen2", {}),
    ("tiny-deepseek-v2", dict(q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
])
def test_cached_decoding_logits_equal_the_full_forward_pass(name, overrides):
  # Rows of different prompt lengths, right-padded with other tokens; then 8 tokens each fed one at a
  # time at the row's own positions (YaRN on in the DeepSeek preset, positions past its original 256
  # are not needed: the blend applies at every position).
  model = models.build(presets.get(name, **overrides))
  ids_BxS = jnp.asarray(np.random.RandomState(0).randint(0, 1000, (3, 16)), jnp.int32)
  lengths_B = np.array([3, 7, 5])
  graphdef, state = nnx.split(model)
  want_BxSxV = np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, ids_BxS))
  rows = np.arange(3)
  logits_BxV, cache = generate.prefill(model, ids_BxS[:, :7], lengths_B, cache_length=16)
  np.testing.assert_allclose(logits_BxV, want_BxSxV[rows, lengths_B - 1], atol=1e-4, rtol=0)
  for i in range(8):
    positions_B = lengths_B + i
    logits_BxV, cache = generate.decode_step(model, cache, ids_BxS[rows, positions_B], positions_B)
    np.testing.assert_allclose(logits_BxV, want_BxSxV[rows, positions_B], atol=1e-4, rtol=0, err_msg=f"step {i}")


def test_mla_cache_holds_only_the_latent_and_the_rotary_key():
  config = presets.get("tiny-deepseek-v2")
  _, cache = generate.prefill(models.build(config), jnp.ones((2, 5), jnp.int32), np.array([5, 3]), cache_length=32)
  per_token = config.kv_lora_rank + config.qk_rope_head_dim
  for (first, count), (latent, k_rope) in zip(block_stack.runs(config), cache, strict=True):
    assert latent.shape == (count, 2, 32, config.kv_lora_rank)
    assert k_rope.shape == (count, 2, 32, config.qk_rope_head_dim)
  assert kv_cache.bytes_per_token(cache) == config.num_hidden_layers * per_token * 4  # float32

  # The released shapes, abstractly (two layers: one dense, one MoE; a token's numbers per layer do not
  # depend on depth): 576 a token and layer, against N * (192 + 128) for full keys and values (16 and
  # 128 heads: 8.9 and 71 times more). bfloat16: 27 * 576 * 2 = 31,104 bytes a token for the Lite model.
  for preset in ("deepseek-coder-v2-lite", "deepseek-coder-v2"):
    config = presets.get(preset, dtype="bfloat16", num_hidden_layers=2)
    graphdef, state = nnx.split(models.build_abstract(config))
    entries = jax.eval_shape(lambda s: nnx.merge(graphdef, s).prefill(jnp.ones((1, 4), jnp.int32))[1], state)
    assert kv_cache.numbers_per_token(entries) == [576, 576]
    assert kv_cache.bytes_per_token(entries) == 2 * 576 * 2


def test_generation_stops_at_eos_and_at_the_context():
  model = models.build(presets.get("tiny-qwen2"))
  prompts = _prompts(1000, (4, 9, 2))
  free = generate.generate(model, prompts, max_new_tokens=12)
  assert [len(t) for t in free] == [12, 12, 12]
  eos = free[0][5]
  stopped = generate.generate_with_stats(model, [prompts[0]], max_new_tokens=12, eos_id=eos)
  cut = free[0].index(eos) + 1
  assert stopped.tokens == [free[0][:cut]]
  assert stopped.decode_steps == cut - 1  # the device loop ended with its only row
  # Each row stops at its own first EOS; the others run on.
  both = generate.generate(model, prompts, max_new_tokens=12, eos_id=eos)
  assert both == [row[:row.index(eos) + 1] if eos in row else row for row in free]
  # A row never outgrows the model's context, prompt included.
  short = models.build(presets.get("tiny-qwen2", max_position_embeddings=10))
  limited = generate.generate_with_stats(short, prompts, max_new_tokens=1000)
  assert [len(t) for t in limited.tokens] == [6, 1, 8] and limited.cache_length == 16


def test_calls_of_similar_sizes_reuse_the_compilations():
  assert [engine.bucket(n) for n in (1, 16, 17, 100, 128, 129, 1000, 5000)] == [16, 16, 20, 112, 128, 160, 1024, 5120]
  model = models.build(presets.get("tiny-qwen2"))
  generate.generate(model, _prompts(1000, (3, 9, 4)), max_new_tokens=10)  # batch 4, prompts 16, cache 20
  compiled = engine._prefill_and_sample._cache_size(), engine._decode_loop._cache_size()
  generate.generate(model, _prompts(1000, (12, 1, 5, 7), seed=1), max_new_tokens=6)
  assert (engine._prefill_and_sample._cache_size(), engine._decode_loop._cache_size()) == compiled


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  model = models.build(presets.get("tiny-qwen2"))  # each sampling setting compiles anew: the cheaper family
  prompts = _prompts(1000, (3, 6, 2))
  sample = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
  first = generate.generate(model, prompts, seed=7, **sample)
  assert generate.generate(model, prompts, seed=7, **sample) == first
  assert generate.generate(model, prompts, seed=8, **sample) != first
  greedy = generate.generate(model, prompts, max_new_tokens=10)
  assert generate.generate(model, prompts, max_new_tokens=10, temperature=1.0, top_k=1, seed=7) == greedy
  assert generate.generate(model, prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=7) == greedy


LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.3, -0.5, -1.0, -3.0], np.float32)


def _expected(temperature: float, top_p: float, top_k: int) -> np.ndarray:
  """softmax(logits / T) over the top-k, then the top-p nucleus of that, renormalised: written out
  independently of sampling.py."""
  order = np.argsort(-LOGITS)
  probs = np.exp(LOGITS / temperature - (LOGITS / temperature).max())
  keep = np.zeros(len(LOGITS), bool)
  keep[order[:top_k or len(LOGITS)]] = True
  probs = np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum()
  mass = 0.0
  for token in order:
    if mass >= top_p:
      keep[token] = False
    mass += probs[token]
  probs = np.where(keep, probs, 0.0)
  return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 0.8, 0), (1.3, 1.0, 3), (1.0, 0.9, 5), (0.5, 1.0, 0)])
def test_sampled_frequencies_follow_the_restricted_softmax(temperature, top_p, top_k):
  rows = 4000
  setting = sampling.Sampling(temperature, top_p, top_k)
  keys_B = jax.random.split(jax.random.key(0), rows)
  tokens_B = np.asarray(jax.jit(sampling.sample, static_argnums=2)(jnp.tile(LOGITS, (rows, 1)), keys_B, setting))
  counts = np.bincount(tokens_B, minlength=len(LOGITS))
  want = _expected(temperature, top_p, top_k)
  assert (counts[want == 0] == 0).all(), (counts, want)  # nothing outside the top-k and the nucleus
  assert want.nonzero()[0].size >= 2
  # Pearson's chi-square over the allowed tokens: under the right distribution it exceeds the 0.999
  # quantile of chi2(df) one time in a thousand (the seed is fixed, so the test is deterministic); the
  # same samples against the untempered, unrestricted softmax fail it by far (the test has power).
  allowed = want > 0
  threshold = stats.chi2.ppf(0.999, allowed.sum() - 1)
  assert ((counts[allowed] - rows * want[allowed]) ** 2 / (rows * want[allowed])).sum() < threshold
  wrong = np.exp(LOGITS) / np.exp(LOGITS).sum()
  assert ((counts - rows * wrong) ** 2 / (rows * wrong)).sum() > 10 * threshold


def test_prompts_that_cannot_be_generated_from_are_refused():
  model = models.build(presets.get("tiny-qwen2", max_position_embeddings=32))
  with pytest.raises(ConfigError, match=r"--prompt: prompt 1 is 40 tokens long, longer than the model's context "
                                        r"of 32 tokens"):
    generate.generate(model, [[5] * 3, [5] * 40], max_new_tokens=4)
  with pytest.raises(ConfigError, match="--prompt: no prompts"):
    generate.generate(model, [], max_new_tokens=4)
  with pytest.raises(ConfigError, match="--prompt: prompt 2 is empty"):
    generate.generate(model, [[5], [6], []], max_new_tokens=4)
  with pytest.raises(ConfigError, match="--prompt: prompt 0 holds token id 1024, outside the model's vocabulary"):
    generate.generate(model, [[5, 1024]], max_new_tokens=4)
  with pytest.raises(ConfigError, match="--prompt: prompt 0 is not a flat list of integer token ids"):
    generate.generate(model, [[0.5]], max_new_tokens=4)
  with pytest.raises(ConfigError, match="--max-new-tokens"):
    generate.generate(model, [[5]], max_new_tokens=0)
  with pytest.raises(ConfigError, match="--top-p"):
    generate.generate(model, [[5]], max_new_tokens=4, temperature=1.0, top_p=0.0)


def test_generate_text_cuts_at_the_first_stop_string(tmp_path_factory):
  tokenizer = tiny_tokenizer("huggingface", tmp_path_factory)
  model = models.build(presets.get("tiny-qwen2", vocab_size=tokenizer.vocab_size))
  prompts = ["def add(a, b):\n", "The quick brown"]
  full = generate.generate_text(model, tokenizer, prompts, max_new_tokens=16)
  prompt_ids = [[tokenizer.bos_id] + tokenizer.encode(p).tolist() for p in prompts]
  new_ids = generate.generate(model, prompt_ids, max_new_tokens=16, eos_id=tokenizer.eos_id)
  assert full == [text.continuation(tokenizer, n) for n in new_ids]
  stop = full[0][4:6]
  assert stop and generate.generate_text(model, tokenizer, prompts, max_new_tokens=16, stop=["\nnever", stop]) == [
      full[0][:full[0].index(stop)], text.truncate(full[1], [stop])]
  assert text.truncate("a\nb\n#c\nd", ["\n#", "\nd", "zz"]) == "a\nb"


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import numpy as np
from pretrain import generate, models
from pretrain.models import presets
from pretrain.train import sharding
from pretrain.train.config import MeshConfig

prompts = [np.random.RandomState(0).randint(3, 1000, n).tolist() for n in (5, 11, 1)]
for name, sizes in [("tiny-qwen2", dict(data=2, fsdp=2, tensor=2)), ("tiny-deepseek-v2", dict(data=2, tensor=2, expert=2))]:
  model = models.build(presets.get(name))
  mesh = sharding.make_mesh(MeshConfig(**sizes))
  for kw in [{}, dict(temperature=0.8, top_p=0.9, top_k=50, seed=3)]:
    want = generate.generate(model, prompts, max_new_tokens=12, **kw)
    got = generate.generate_with_stats(model, prompts, max_new_tokens=12, mesh=mesh, **kw)
    assert got.tokens == want, (name, kw, got.tokens, want)
    assert got.batch == 4  # 3 prompts, padded to split over data x fsdp x expert = 4
  # The stacks scanned in the decode loop too, as on accelerators (on CPU the layers are split out).
  assert generate.generate(model, prompts, max_new_tokens=12, mesh=mesh, split_layers=False, **kw) == want
  if name == "tiny-qwen2":  # the cache as generation places it: rows over the batch axes, kv heads over tensor
    _, cache = generate.engine._prefill_and_sample(
        *generate.engine._placed(model, mesh, generate.engine.DEFAULT_AXIS_RULES), np.ones((4, 16), np.int32),
        np.ones(4, np.int32), np.uint32(0), cache_length=32, sampling=generate.Sampling(), mesh=mesh,
        rules=generate.engine.DEFAULT_AXIS_RULES, split_layers=False)
    spec = cache[0][0].sharding.spec  # [layers, B, M, T, H]
    assert (tuple(spec) + (None,) * 5)[:4] == (None, ("data", "fsdp"), "tensor", None), spec
print("ok")
"""


@pytest.mark.slow
def test_generation_on_a_mesh_equals_one_device():
  result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
