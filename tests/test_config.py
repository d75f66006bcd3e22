"""Config files, command-line overrides, the typed schema, and `pretrain describe`."""

import json
import re
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
    (["--config.train.nope=1"], "config.train.nope", "axis_rules, checkpoint_every"),  # allowed keys
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


def _cli_error(capsys, *argv):
  """`pretrain ARGV` in this process: (its exit code, its stderr), the stderr one line."""
  code = cli.main(list(argv))
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  return code, err.rstrip("\n")


@pytest.mark.parametrize("sizes, devices, key, message", [
    # a -1 axis (data, by default) only takes what the others leave: the axis that was set is to blame
    (dict(data=-1, fsdp=4), 1, "config.train.mesh.fsdp", "fsdp=4 needs a multiple of 4 devices; 1 available"),
    (dict(data=-1, fsdp=2, expert=4), 12, "config.train.mesh.expert",
     "fsdp=2 x expert=4 needs a multiple of 8 devices; 12 available"),
    (dict(data=2, fsdp=4), 1, "config.train.mesh.fsdp", "data=2 x fsdp=4 needs 8 devices; 1 available"),
    (dict(data=1), 8, "config.train.mesh", "every axis at 1 needs 1 device; 8 available"),
    (dict(data=-1, fsdp=-1), 8, "config.train.mesh.fsdp", "only one axis may be -1; data, fsdp are"),
])
def test_a_mesh_that_does_not_fit_blames_the_axes_that_were_set(sizes, devices, key, message):
  from pretrain.train import sharding

  with pytest.raises(ConfigError) as e:
    sharding.mesh_sizes(sizes, devices)
  assert (e.value.key, str(e.value)) == (key, f"{key}: {message}")
  with pytest.raises(ConfigError, match=r"^--mesh\.fsdp: fsdp=4 needs"):  # plan's --mesh flag names itself
    sharding.mesh_sizes({"data": -1, "fsdp": 4}, 2, key="--mesh")
  assert sharding.mesh_sizes(dict(data=-1, fsdp=4), 8) == dict(data=2, fsdp=4, context=1, tensor=1, expert=1)


def test_cli_mesh_too_big_for_the_devices_names_the_axis_set(capsys, tmp_path):
  import jax

  fsdp = jax.device_count() + 1  # 4 on... any count: n + 1 never divides n
  code, err = _cli_error(capsys, "train", f"--config.train.mesh.fsdp={fsdp}", f"--config.train.workdir={tmp_path}")
  assert code == 2
  assert err == (f"pretrain train: error: config.train.mesh.fsdp: fsdp={fsdp} needs a multiple of {fsdp} devices; "
                 f"{jax.device_count()} available")
  assert not any(tmp_path.iterdir())  # refused before anything is written


def test_cli_config_file_with_a_syntax_error_is_one_line(capsys, tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None)\n  return ml_collections.ConfigDict()\n")
  code, err = _cli_error(capsys, "describe", f"--config={path}")
  assert code == 2
  assert err == f"pretrain describe: error: --config: {path}:3: SyntaxError: expected ':'"


@pytest.mark.parametrize("body, line, error", [
    # the innermost line in the file, also when what failed is deeper (here, presets.get)
    ("def helper(arg):\n  return {'a': 1}[arg]\n\ndef get_config(arg=None):\n  return helper(arg)\n", 2,
     "KeyError: 'b'"),
    ("from pretrain.config import model_config_dict\n\ndef get_config(arg=None):\n"
     "  return {'model': model_config_dict('tiny-llama')}\n", 4,
     "KeyError: \"unknown model preset 'tiny-llama'; known presets: deepseek-coder-v2"),
    ("import no_such_module_anywhere\n", 1, "ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    ("def get_config(arg=None):\n  raise RuntimeError('first line\\nsecond line')\n", 2, "RuntimeError: first line"),
])
def test_cli_config_file_that_raises_is_one_line_naming_file_and_line(capsys, tmp_path, body, line, error):
  path = tmp_path / "broken.py"
  path.write_text(body)
  code, err = _cli_error(capsys, "describe", f"--config={path}:b")
  assert code == 2
  assert err.startswith(f"pretrain describe: error: --config: {path}:{line}: {error}")


def test_mixture_file_errors_name_file_and_line_and_its_own_errors_pass_through(tmp_path):
  from pretrain.data import mixture as mixture_lib

  path = tmp_path / "mix.py"
  path.write_text("def get_mixture(arg=None):\n  return {'name': 'm', 'components': [] + None}\n")
  with pytest.raises(ConfigError) as e:
    mixture_lib.load(str(path))
  assert e.value.key == "mixture"
  assert str(e.value).startswith(f"mixture: {path}:2: TypeError: can only concatenate list")
  with pytest.raises(ConfigError) as e:  # the file's own ConfigError, unchanged
    mixture_lib.load(str(ROOT / "data_mixtures" / "deepseek_coder_v2.py"))
  assert e.value.key == "mixture deepseek_coder_v2" and "give the path of your code, math, text data" in str(e.value)


@pytest.mark.parametrize("variant, message", [
    ("family=llama", "config variant 'family': unknown family 'llama'; known: deepseek_v2, qwen2"),
    ("colour=red", "config variant 'colour': unknown; allowed: family"),
])
def test_cli_unknown_variant_names_the_allowed_ones(capsys, variant, message):
  code, err = _cli_error(capsys, "describe", f"--config={CONFIGS}/default.py:{variant}")
  assert code == 2
  assert err == f"pretrain describe: error: {message}"


def test_variant_values_are_checked_against_their_defaults():
  assert config_lib.parse_arg(None, family=config_lib.one_of("a", "b")).family == "a"  # the first by default
  assert config_lib.parse_arg("family=b", family=config_lib.one_of("a", "b")).family == "b"
  assert config_lib.parse_arg("runlocal", runlocal=False).runlocal is True
  assert config_lib.parse_arg("runlocal=no", runlocal=True).runlocal is False
  assert config_lib.parse_arg("seed=3,dir=x", seed=0, dir="").to_dict() == {"seed": 3, "dir": "x"}
  for arg, defaults, message in [("runlocal=maybe", dict(runlocal=False), "expected true or false, got 'maybe'"),
                                 ("seed=abc", dict(seed=0), "expected int, got 'abc'"),
                                 ("seed", dict(seed=0), "needs a value, e.g. seed=0")]:
    with pytest.raises(ConfigError, match=re.escape(message)):
      config_lib.parse_arg(arg, **defaults)
