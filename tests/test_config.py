"""Config files, command-line overrides, the typed schema, and `pretrain describe`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import cli
from pretrain import config as config_lib
from pretrain.models import param_count, presets
from pretrain.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _load(*flags):
  return config_lib.load(list(flags))[1]


def test_default_config_is_tiny_deepseek():
  experiment = _load()
  assert experiment.model == presets.get("tiny-deepseek-v2")
  assert experiment.seed == 0


def test_variant_and_overrides():
  experiment = _load(f"--config={CONFIGS}/default.py:family=qwen2", "--config.model.num_hidden_layers=5",
                     "--config.model.tie_word_embeddings=false", "--config.model.rope_theta=5e5",
                     "--config.seed=7")
  assert experiment.model.family == "qwen2"
  assert experiment.model.num_hidden_layers == 5
  assert experiment.model.tie_word_embeddings is False
  assert experiment.model.rope_theta == 5e5
  assert experiment.seed == 7


def test_optional_fields_can_be_set_and_cleared():
  assert _load("--config.model.q_lora_rank=16").model.q_lora_rank == 16
  big = f"--config={CONFIGS}/deepseek_coder_v2.py"
  assert _load(big).model.q_lora_rank == 1536
  assert _load(big, "--config.model.q_lora_rank=None").model.q_lora_rank is None
  assert _load("--config.model.rope_scaling.type=none").model.rope_scaling.type == "none"
  assert _load("--config.train.init_from=/ckpt/base").train.init_from == "/ckpt/base"  # None in the file


def test_overrides_of_bools_tuples_and_list_items():
  assert _load("--config.model.norm_topk_prob").model.norm_topk_prob is True
  assert _load("--noconfig.model.norm_topk_prob").model.norm_topk_prob is False
  assert _load("--config.train.optimizer.no_weight_decay=('a', 'b')").train.optimizer.no_weight_decay == ("a", "b")
  assert _load("--config.train.axis_rules=(('batch', ('data',)),)").train.axis_rules == (("batch", ("data",)),)
  local = f"--config={CONFIGS}/recipes/deepseek_coder_v2_lite.py:runlocal"
  assert [s.steps for s in _load(local, "--config.stages[0].steps=5").stages] == [5, 20, 20]
  # `--config.a.b VALUE` from the command line, a bool field's too
  flags, rest = cli._split_config_flags(["describe", "--config", f"{CONFIGS}/default.py:family=qwen2", "--json",
                                         "--config.model.tie_word_embeddings", "false"])
  assert rest == ["describe", "--json"]
  experiment = _load(*flags)
  assert experiment.model.family == "qwen2" and experiment.model.tie_word_embeddings is False


@pytest.mark.parametrize("flags, key, words", [
    (["--config.model.hidden_sise=8"], "config.model.hidden_sise", "allowed keys: attention_implementation, aux_loss_alpha"),
    (["--config.modle.x=1"], "config.modle", "allowed keys: data, model, seed"),
    (["--config.model.hidden_size=abc"], "config.model.hidden_size", "expected int"),
    (["--config.model.hidden_size=1.5"], "config.model.hidden_size", "expected int"),
    (["--config.model.norm_topk_prob=maybe"], "config.model.norm_topk_prob", "expected bool"),
    (["--config.model.topk_method=best"], "config.model.topk_method", "'greedy', 'group_limited_greedy'"),
    (["--config.model.family=llama"], "config.model.family", "'qwen2', 'deepseek_v2'"),
    (["--config.model.num_experts_per_tok=9"], "config.model.num_experts_per_tok", "1..8"),
    (["--config.model.n_group=3"], "config.model.n_group", "1, 2, 4, 8"),
    (["--config.model.n_group=4", "--config.model.topk_group=5"], "config.model.topk_group", "n_group=4"),
    (["--config.model.topk_method=group_limited_greedy", "--config.model.n_group=8",
      "--config.model.num_experts_per_tok=3"], "config.model.num_experts_per_tok", "hold only 1 experts"),
    (["--config.model.kv_lora_rank=0"], "config.model.kv_lora_rank", "positive"),
    (["--config.model.qk_rope_head_dim=7"], "config.model.qk_rope_head_dim", "even"),
    (["--config.model.rope_scaling.type=ntk"], "config.model.rope_scaling.type", "'none', 'yarn'"),
    ([f"--config={CONFIGS}/default.py:family=qwen2", "--config.model.num_key_value_heads=3"],
     "config.model.num_key_value_heads", "allowed values: 1, 2, 4"),
    ([f"--config={CONFIGS}/deepseek_coder_v2.py:runlocal"], "config variant 'runlocal'", "no variants"),
    (["--config=configs/missing.py"], "--config", "file configs/missing.py does not exist"),
    (["--config.train.nope=1"], "config.train.nope", "allowed keys: axis_rules, checkpoint_every"),
    (["--config.train.steps=abc"], "config.train.steps", "cannot set 'abc': expected int"),
    (["--config.train.optimizer.peak_learning_rate=fast"], "config.train.optimizer.peak_learning_rate",
     "expected float"),
    (["--config.stages[0].steps=1"], "config.stages", "allowed keys: data, model, seed, train"),
    ([f"--config={CONFIGS}/recipes/deepseek_coder_v2_lite.py:runlocal", "--config.stages[3].steps=1"],
     "config.stages[3]", "the list has 3"),
    (["--config.train.steps=3", f"--config={CONFIGS}/default.py"], "--config", "before a value for --config"),
    (["--config.train.steps"], "--config", "Missing value for flag --config.train.steps"),
    (["--json"], "--json", "not a config flag"),
])
def test_bad_configs_are_refused_naming_the_key(flags, key, words):
  with pytest.raises(ConfigError) as e:
    _load(*flags)
  assert e.value.key == key
  assert words in str(e.value)


def test_without_a_default_a_config_file_is_required():
  for flags in ([], ["--config.train.steps=3"]):
    with pytest.raises(ConfigError, match="no config file given") as e:
      config_lib.load(flags, default=None)
    assert e.value.key == "--config"


def test_schema_rejects_unknown_keys_in_a_config_file(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from pretrain.config import model_config_dict\n"
                  "import ml_collections\n"
                  "def get_config(arg=None):\n"
                  "  c = ml_collections.ConfigDict({'model': model_config_dict('tiny-qwen2')})\n"
                  "  c.model.sliding_window = 4\n"
                  "  return c\n")
  with pytest.raises(ConfigError, match=r"config.model.sliding_window: unknown key"):
    _load(f"--config={path}")


@pytest.mark.slow
@pytest.mark.parametrize("file, total, active", [
    ("deepseek_coder_v2_lite.py", 15_706_484_224, 2_451_435_008),
    ("deepseek_coder_v2.py", 235_741_434_880, 20_851_512_320),
    ("deepcoder_14b.py", 14_770_033_664, 13_991_465_984),
])
def test_full_size_parameter_counts_match_the_published_models(file, total, active):
  counts = param_count.count(_load(f"--config={CONFIGS}/{file}").model)
  assert (counts.total, counts.active) == (total, active)


def test_describe_prints_counts(capsys):
  assert cli.main(["describe", f"--config={CONFIGS}/deepseek_coder_v2_lite.py", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["total"] == 15_706_484_224 and 2.4e9 <= out["active"] < 2.5e9  # "2.4B active"


@pytest.mark.parametrize("flag, key", [
    ("--config.model.num_experts_per_tok=99", "config.model.num_experts_per_tok"),  # the schema's check
    ("--config.train.nope=1", "config.train.nope"),  # unknown key
    ("--config.train.steps=abc", "config.train.steps"),  # bad value
    ("--config=nope.py", "--config: file nope.py does not exist"),
])
def test_cli_bad_config_exits_nonzero_with_one_clear_line(flag, key):
  proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "describe", flag], capture_output=True, text=True,
                        cwd=ROOT)
  assert proc.returncode == 2
  assert proc.stderr.startswith(f"pretrain describe: error: {key}") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("file", ["deepseek_coder_v2_lite.py", "deepseek_coder_v2.py"])
def test_recipes_hold_the_papers_stages(file):
  from pretrain.train import stages

  _, exp = config_lib.load([f"--config={CONFIGS}/recipes/{file}:code=c,math=m,text=t,tokenizer=tok"])
  plan = [e for _, e in stages.stage_experiments(exp)]
  assert [(e.data.seq_len, e.data.global_batch_size, e.train.steps) for e in plan[1:]] == [
      (32768, 1152, 1000), (131072, 288, 1000)]
  assert all(e.model.rope_scaling.type == "yarn" and e.model.rope_scaling.factor == 40 for e in plan)
  assert plan[0].train.optimizer.warmup_steps == 2000 and plan[0].train.optimizer.end_learning_rate_fraction == 0.1
  assert [e.train.init_optimizer_state for e in plan] == [False, True, True]
  # runlocal keeps every stage, small
  _, local = config_lib.load([f"--config={CONFIGS}/recipes/{file}:runlocal"])
  assert [(s.carry_optimizer_state, s.rope_scaling is not None) for s in local.stages] == [
      (False, False), (True, True), (True, True)]
  assert [s.seq_len for s in local.stages] == sorted(s.seq_len for s in local.stages)
