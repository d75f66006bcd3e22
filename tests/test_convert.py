"""Hugging Face interoperability: parity with transformers, exact round trips, clear errors.

Each parity case builds a tiny random model with transformers' own classes, saves it,
loads it with `convert.load_hf` and compares logits; then `convert.save_hf`, reloads
with `AutoModelForCausalLM` (no missing or unexpected keys), compares again, and checks
that HF -> ours -> HF gives bit-identical tensors.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from pretrain import convert, models
from pretrain.convert import hf_io, parity
from pretrain.models import presets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = parity.TOLERANCE
YARN = parity.YARN
_input_ids, _hf_logits, _our_logits = parity.input_ids, parity.hf_logits, parity.our_logits
_tensors, _reload_hf = parity.read_tensors, parity.reload_hf


@pytest.mark.parametrize("case", parity.CASES)
def test_parity_and_round_trip(tmp_path, case):
  family, overrides = parity.CASES[case]
  result = parity.round_trip(parity.random_hf_model(family, **overrides), tmp_path)
  print(f"\n{case}: max |logit diff| from HF {result.from_hf:.2e}, to HF {result.to_hf:.2e} "
        f"(max |logit| {result.max_logit:.2f})")
  assert result.from_hf <= TOLERANCE and result.to_hf <= TOLERANCE
  assert result.identical_tensors


@pytest.mark.parametrize("yarn", [False, True], ids=["no_yarn", "yarn"])
def test_deepseek_v2_parity_past_original_context(tiny_deepseek_v2_hf, tmp_path, yarn):
  """Positions up to 4x original_max_position_embeddings, where YaRN's interpolation matters."""
  hf_model = tiny_deepseek_v2_hf(q_lora_rank=16, rope_scaling=YARN if yarn else None, max_position_embeddings=64)
  hf_model.save_pretrained(tmp_path)
  ids = _input_ids(hf_model.config.vocab_size, seq=64)
  diff = np.abs(_our_logits(convert.load_hf(tmp_path), ids) - _hf_logits(hf_model, ids)).max()
  print(f"\ndeepseek_v2 seq 64 {'yarn' if yarn else 'no yarn'}: max |logit diff| {diff:.2e}")
  assert diff <= TOLERANCE


def test_sharded_save_and_load(tiny_deepseek_v2_hf, tmp_path):
  hf_model = tiny_deepseek_v2_hf()
  hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # transformers' own sharding and index
  assert (tmp_path / "hf" / hf_io.INDEX_FILE).exists()
  model = convert.load_hf(tmp_path / "hf")

  out = tmp_path / "sharded"
  convert.save_hf(model, out, max_shard_bytes=64 * 1024)
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.loads((out / hf_io.INDEX_FILE).read_text())
  tensors = _tensors(out)
  assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  for shard in out.glob("*.safetensors"):
    sizes = [t.nbytes for name, t in tensors.items() if index["weight_map"][name] == shard.name]
    assert sum(sizes) <= 64 * 1024 or len(sizes) == 1

  ids = _input_ids(hf_model.config.vocab_size, 16)
  ref = _hf_logits(hf_model, ids)
  assert np.abs(_hf_logits(_reload_hf(out), ids) - ref).max() <= TOLERANCE
  assert np.abs(_our_logits(convert.load_hf(out), ids) - ref).max() <= TOLERANCE


def test_half_precision_checkpoints_upcast(tiny_qwen2_hf, tmp_path):
  hf_model = tiny_qwen2_hf().to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / "bf16")
  model = convert.load_hf(tmp_path / "bf16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  q_proj = hf_model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.layers[0].block.self_attn.q_proj[0]).reshape(q_proj.shape[1], -1),
                                q_proj.T)

  convert.save_hf(model, tmp_path / "back", dtype="bfloat16")  # bf16 -> f32 -> bf16 is exact
  before, after = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "back")
  assert sorted(before) == sorted(after)
  assert all(np.array_equal(before[k].view(np.uint16), after[k].view(np.uint16)) for k in before)
  assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_orbax_round_trip(tmp_path):
  model = models.build(presets.get("tiny-deepseek-v2", num_hidden_layers=2), seed=3)
  convert.save_orbax(model, tmp_path / "ckpt")
  restored = convert.load_orbax(tmp_path / "ckpt")
  assert restored.config == model.config
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  after = nnx.to_pure_dict(nnx.state(restored, nnx.Param))
  assert jax.tree.structure(before) == jax.tree.structure(after)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
  ids = _input_ids(model.config.vocab_size, 16)
  np.testing.assert_array_equal(_our_logits(model, ids), _our_logits(restored, ids))


# ---- bad inputs: each error names the tensor, file or key ----


@pytest.fixture
def qwen2_dir(tiny_qwen2_hf, tmp_path) -> pathlib.Path:
  tiny_qwen2_hf(num_hidden_layers=1).save_pretrained(tmp_path / "hf")
  return tmp_path / "hf"


def _edit_tensors(hf_dir: pathlib.Path, edit) -> None:
  file = hf_dir / "model.safetensors"
  tensors = _tensors(hf_dir)
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor(qwen2_dir):
  _edit_tensors(qwen2_dir, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
  with pytest.raises(convert.ConversionError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*missing"):
    convert.load_hf(qwen2_dir)


def test_extra_tensor(qwen2_dir):
  _edit_tensors(qwen2_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(convert.ConversionError, match=r"model\.layers\.0\.self_attn\.extra\.weight.*model\.safetensors"):
    convert.load_hf(qwen2_dir)


def test_allowed_extra_tensors(tiny_qwen2_hf, tmp_path):
  tiny_qwen2_hf(num_hidden_layers=1, tie_word_embeddings=True).save_pretrained(tmp_path)
  _edit_tensors(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"],
                                              "model.rotary_emb.inv_freq": np.ones(6, np.float32)}))
  convert.load_hf(tmp_path)


def test_wrong_shape(qwen2_dir):
  wrong = {"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 48), np.float32)}
  _edit_tensors(qwen2_dir, lambda t: t.update(wrong))
  with pytest.raises(convert.ConversionError, match=r"k_proj\.weight.*model\.safetensors.*\[8, 48\].*\[24, 48\]"):
    convert.load_hf(qwen2_dir)


def test_wrong_expert_shape(tiny_deepseek_v2_hf, tmp_path):
  tiny_deepseek_v2_hf(num_hidden_layers=2).save_pretrained(tmp_path)
  wrong = {"model.layers.1.mlp.experts.5.down_proj.weight": np.zeros((48, 23), np.float32)}
  _edit_tensors(tmp_path, lambda t: t.update(wrong))
  with pytest.raises(convert.ConversionError, match=r"model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight"):
    convert.load_hf(tmp_path)


def test_unsupported_model_type(qwen2_dir):
  config = json.loads((qwen2_dir / "config.json").read_text())
  (qwen2_dir / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
  with pytest.raises(convert.ConversionError, match=r"model_type 'llama'.*deepseek_v2, qwen2"):
    convert.load_hf(qwen2_dir)


def test_truncated_safetensors(qwen2_dir):
  file = qwen2_dir / "model.safetensors"
  file.write_bytes(file.read_bytes()[:-100])
  with pytest.raises(convert.ConversionError, match=r"model\.safetensors"):
    convert.load_hf(qwen2_dir)


def test_missing_shard(tiny_qwen2_hf, tmp_path):
  tiny_qwen2_hf().save_pretrained(tmp_path, max_shard_size="40KB")
  victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  victim.unlink()
  with pytest.raises(convert.ConversionError, match=victim.name):
    convert.load_hf(tmp_path)


def test_save_hf_failing_midway_leaves_nothing(tiny_qwen2_hf, tmp_path, monkeypatch):
  model = convert.load_hf(_saved(tiny_qwen2_hf(), tmp_path / "hf"))
  real_write, written = hf_io._write_shard, []

  def write_then_fail(file, *args):
    if written:
      raise OSError("disk full")
    written.append(file)
    real_write(file, *args)

  monkeypatch.setattr(hf_io, "_write_shard", write_then_fail)
  with pytest.raises(OSError, match="disk full"):
    convert.save_hf(model, tmp_path / "out", max_shard_bytes=16 * 1024)
  assert written and not (tmp_path / "out").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial sibling left either


def test_save_hf_refuses_non_empty_dir(tiny_qwen2_hf, tmp_path):
  model = convert.load_hf(_saved(tiny_qwen2_hf(), tmp_path / "hf"))
  (tmp_path / "empty").mkdir()
  convert.save_hf(model, tmp_path / "empty")  # an existing empty directory is fine
  with pytest.raises(convert.ConversionError, match="not an empty directory"):
    convert.save_hf(model, tmp_path / "hf")


def _saved(hf_model, hf_dir: pathlib.Path) -> pathlib.Path:
  hf_model.save_pretrained(hf_dir)
  return hf_dir


# ---- config.json ----

# deepseek-ai/DeepSeek-Coder-V2-Lite-Base/config.json, as released (auto_map left out).
LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_config_released_checkpoint_style():
  assert convert.config_from_hf(LITE_CONFIG) == presets.get("deepseek-coder-v2-lite")


def test_config_transformers5_style(tiny_deepseek_v2_hf, tmp_path):
  hf_model = tiny_deepseek_v2_hf(rope_scaling=YARN, max_position_embeddings=64)
  hf_model.save_pretrained(tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in written and "rope_scaling" not in written and written["n_group"] is None
  config = convert.config_from_hf(written)
  assert config.n_group == 1 and config.topk_group == 1
  assert config.rope_scaling == models.RopeScaling(**YARN)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_config_to_hf_round_trip(name):
  config = presets.get(name)
  hf = convert.config_to_hf(config)
  assert convert.config_from_hf(json.loads(json.dumps(hf))) == config
  hf_config = transformers.AutoConfig.for_model(**hf)  # transformers reads what we write
  assert hf_config.rope_parameters["rope_theta"] == config.rope_theta
  if getattr(config, "rope_scaling", None) is not None and config.rope_scaling.type == "yarn":
    params = hf_config.rope_parameters
    assert params["rope_type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
      assert params[key] == getattr(config.rope_scaling, key), key


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, "rope scaling"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_qwen2_config_refusals(change, key):
  hf = convert.config_to_hf(presets.get("tiny-qwen2")) | change
  with pytest.raises(convert.ConversionError, match=key):
    convert.config_from_hf(hf)


def test_config_missing_shape_key():
  hf = dict(LITE_CONFIG)
  del hf["kv_lora_rank"]
  with pytest.raises(convert.ConversionError, match="kv_lora_rank"):
    convert.config_from_hf(hf)


# ---- the command line ----


def test_cli_convert_hf_to_orbax_to_hf(tiny_deepseek_v2_hf, tmp_path):
  from pretrain import cli

  hf_model = tiny_deepseek_v2_hf(q_lora_rank=16)
  hf_model.save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--to-orbax", str(tmp_path / "ckpt")]) == 0
  assert cli.main(["convert", "--from-orbax", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "back")]) == 0
  before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
  assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)


def test_cli_convert_bad_input_exits_nonzero_and_writes_nothing(qwen2_dir, tmp_path, capsys):
  from pretrain import cli

  _edit_tensors(qwen2_dir, lambda t: t.pop("model.norm.weight"))
  out = tmp_path / "ckpt"
  assert cli.main(["convert", "--from-hf", str(qwen2_dir), "--to-orbax", str(out)]) == 2
  assert "model.norm.weight" in capsys.readouterr().err
  assert not out.exists() and not list(tmp_path.glob(".ckpt*"))


def test_save_orbax_refuses_a_non_empty_directory(tmp_path):
  model = models.build(presets.get("tiny-qwen2", num_hidden_layers=1))
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "keep.txt").write_text("x")
  with pytest.raises(convert.ConversionError, match="already exists"):
    convert.save_orbax(model, tmp_path / "ckpt")
  assert (tmp_path / "ckpt" / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_deepseek_v2_yarn_logits_on_a_4k_token_input(tiny_deepseek_v2_hf, tmp_path):
  """Long-context YaRN at the recipe's settings (s 40, alpha 1, beta 32) on 4096 tokens, 1K original context."""
  yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
          "mscale": 0.707, "mscale_all_dim": 0.707}
  hf_model = tiny_deepseek_v2_hf(rope_scaling=yarn, max_position_embeddings=40960)
  hf_model.save_pretrained(tmp_path)
  ids = _input_ids(hf_model.config.vocab_size, seq=4096)[:1]
  diff = np.abs(_our_logits(convert.load_hf(tmp_path), ids) - _hf_logits(hf_model, ids)).max()
  print(f"\ndeepseek_v2 seq 4096 yarn s=40: max |logit diff| {diff:.2e}")
  assert diff <= TOLERANCE
