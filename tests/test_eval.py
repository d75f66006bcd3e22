"""`pretrain eval niah` and `pretrain eval ppl`: prompts laid out as specified, scoring that counts
exactly the retrieved passkeys (1.0 for a model that knows the answer, 0 for one that does not),
perplexity equal to the full-logits cross-entropy, every checkpoint kind, and bad flags refused
with one line and exit 2 before anything is written."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import tiny_tokenizers
from test_train import experiment

from pretrain import cli, convert, models
from pretrain.data.config import SpecialTokens
from pretrain.data.tokenizer import load_tokenizer
from pretrain.eval import load, niah, ppl
from pretrain.schema import ConfigError
from pretrain.train import stages, trainer


class InductionOracle(nnx.Module):
  """A constructed model that knows the answer: at each position it predicts, with certainty, the token
  that followed the latest earlier occurrence of its last `context` tokens (exact-match induction),
  which is how a passkey is read back from the needle. Shaped like CausalLM for the scoring code.

  Constructed rather than trained: a tiny transformer learns this copy (induction) only after
  minutes of CPU training, far beyond a test's budget. The model that does not know the answer is
  a real one, through the real command."""

  def __init__(self, vocab_size: int, context: int = 8):  # this tokenizer is nearly one token per character
    self.vocab_size, self.context, self.dtype = vocab_size, context, jnp.float32

  def features(self, ids_BxS, positions_BxS=None, segment_ids_BxS=None):
    seq = ids_BxS.shape[1]
    match_BxSxS = jnp.ones((ids_BxS.shape[0], seq, seq), bool)
    for back in range(self.context):
      shifted_BxS = jnp.pad(ids_BxS, ((0, 0), (back, 0)), constant_values=-1)[:, :seq]  # token t - back
      match_BxSxS &= shifted_BxS[:, :, None] == shifted_BxS[:, None, :]
    t, s = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    match_BxSxS &= (s < t) & (s >= self.context - 1)
    latest_BxS = jnp.max(jnp.where(match_BxSxS, s, -1), axis=-1)
    next_BxS = jnp.take_along_axis(ids_BxS, jnp.clip(latest_BxS + 1, 0, seq - 1), axis=1)
    certain_BxSxV = 30.0 * jax.nn.one_hot(next_BxS, self.vocab_size)
    return jnp.where((latest_BxS >= 0)[..., None], certain_BxSxV, 0.0), {}

  def logits(self, h_BxSxV):
    return h_BxSxV

  def output_weights(self):
    return jnp.eye(self.vocab_size, dtype=jnp.float32)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> pathlib.Path:
  """A training work directory: the tiny DeepSeek-V2 of test_train, 12 steps on the data_dir mixture."""
  workdir = tmp_path_factory.mktemp("eval") / "run"
  trainer.train(experiment(data_dir, workdir, steps=12, checkpoint_every=12), log=lambda m: None)
  return workdir


@pytest.fixture(scope="module")
def untrained_dir(run_dir, tmp_path_factory) -> pathlib.Path:
  """The same model at its initialisation (what the run started from), as an Orbax model checkpoint."""
  source = load.resolve(str(run_dir))
  out = tmp_path_factory.mktemp("untrained") / "ckpt"
  convert.save_orbax(models.build(source.model_config, seed=0), out)
  shutil.copy(load.load_tokenizer_of(source).path, out / "tokenizer.model")
  return out


def eval_cli(*args: str) -> int:
  return cli.main(["eval", *args])


# Prompts.
def test_flags_parse_and_bad_values_name_the_flag():
  assert niah.parse_lengths("4k, 1024,300") == (300, 1024, 4096)
  assert niah.parse_depths("1,0,0.25") == (0.0, 0.25, 1.0)
  assert ppl.parse_buckets("64,1k") == (64, 1024)
  assert ppl.bucket_names((64, 1024)) == ["[0, 64)", "[64, 1K)", "[1K, inf)"]
  for parse, text, flag in ((niah.parse_lengths, "1k,x", "--lengths"), (niah.parse_lengths, "0", "--lengths"),
                            (niah.parse_lengths, "1k,1024", "--lengths"), (niah.parse_depths, "0.5,1.5", "--depths"),
                            (niah.parse_depths, "", "--depths"), (ppl.parse_buckets, "1k,64", "--buckets")):
    with pytest.raises(ConfigError, match=flag):
      parse(text)
  assert pathlib.Path(niah.BUILTIN_HAYSTACK).is_file()


@pytest.mark.slow
def test_prompts_are_exactly_the_length_with_the_needle_at_its_depth(data_dir, run_dir):
  tokenizer = load.load_tokenizer_of(load.resolve(str(run_dir)))
  haystack = niah.Haystack.from_mixture(load.load_mixture(str(data_dir / "mixture.py"), "--haystack"), tokenizer)
  depths = (0.0, 0.25, 0.5, 0.75, 1.0)
  grid = niah.trial_prompts(tokenizer, haystack, length=400, depths=depths, trials=3, seed=0)
  prefix = len(tokenizer.encode(niah.PREFIX))
  for trial in range(3):
    row = [grid[d][trial] for d in range(len(depths))]
    assert len({p.passkey for p in row}) == 1 and len(row[0].passkey) == niah.PASSKEY_DIGITS
    starts = [p.needle_start for p in row]
    assert starts == sorted(starts) and starts[0] == 1 + prefix  # depth 0: the needle right after the prefix
    for p in row:
      assert len(p.ids) == 400 and p.ids[0] == tokenizer.bos_id
      text = tokenizer.decode(p.ids)
      assert text.startswith(niah.PREFIX) and text.endswith(niah.QUESTION)
      assert niah.NEEDLE.format(passkey=p.passkey) in text
      assert tokenizer.decode(p.answer_ids) == f" {p.passkey}"
    needle = len(tokenizer.encode(niah.NEEDLE.format(passkey=row[-1].passkey)))
    question = len(tokenizer.encode(niah.QUESTION))
    assert starts[-1] + needle + question == 400  # depth 1: the needle right before the question
  assert len({grid[0][t].passkey for t in range(3)}) == 3  # trials draw different passkeys
  with pytest.raises(ConfigError, match="--lengths: 50 tokens is shorter"):
    niah.build_prompt(tokenizer, haystack, length=50, depth=0.5, passkey="12345", start=0)


# Scoring.
@pytest.mark.slow
def test_scoring_counts_a_model_that_knows_the_answer_and_only_exact_answers(data_dir, run_dir):
  tokenizer = load.load_tokenizer_of(load.resolve(str(run_dir)))
  haystack = niah.Haystack.from_mixture(load.load_mixture(str(data_dir / "mixture.py"), "--haystack"), tokenizer)
  grid = niah.build_grid(tokenizer, haystack, lengths=(320, 480), depths=(0.0, 0.5, 1.0), trials=4, seed=1)
  apply = load.jit_apply(InductionOracle(tokenizer.vocab_size), niah.answer_scores)
  accuracy_DxL, logprob_DxL = niah.score_grid(apply, grid, pad_id=tokenizer.pad_id, batch_tokens=2000,
                                              log=lambda m: None)
  np.testing.assert_array_equal(accuracy_DxL, np.ones((3, 2)))
  assert np.all(logprob_DxL > -1e-3)
  # The same model, asked for a passkey whose last digit is off by one, retrieves nothing.
  wrong = {length: [[niah.Prompt(p.ids, _last_digit_off(tokenizer, p), p.passkey, p.needle_start) for p in row]
                    for row in rows] for length, rows in grid.items()}
  accuracy_DxL, logprob_DxL = niah.score_grid(apply, wrong, pad_id=tokenizer.pad_id, batch_tokens=2000,
                                              log=lambda m: None)
  np.testing.assert_array_equal(accuracy_DxL, np.zeros((3, 2)))
  assert np.all(logprob_DxL < -20)


def _last_digit_off(tokenizer, prompt: niah.Prompt) -> np.ndarray:
  passkey = prompt.passkey[:-1] + str((int(prompt.passkey[-1]) + 1) % 10)
  return niah.answer_tokens(tokenizer, passkey)


@pytest.mark.slow
def test_eval_niah_writes_the_grid_and_heatmap_and_an_untrained_model_scores_zero(data_dir, untrained_dir,
                                                                                    tmp_path, capsys):
  out = tmp_path / "niah"
  assert eval_cli("niah", f"--checkpoint={untrained_dir}", "--lengths=320,448", "--depths=0,0.5,1", "--trials=3",
                  f"--haystack={data_dir / 'mixture.py'}", f"--out={out}") == 0
  result = json.loads((out / "niah.json").read_text())
  assert result["lengths"] == [320, 448] and result["depths"] == [0.0, 0.5, 1.0] and result["trials"] == 3
  assert result["checkpoint"] == str(untrained_dir) and result["kind"] == "orbax"
  np.testing.assert_array_equal(result["accuracy"], np.zeros((3, 2)))
  assert np.all(np.asarray(result["answer_logprob"]) < -10)  # ~6 tokens at ~log(1/512) each
  png = (out / "niah.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n")
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  assert width >= 600 and height >= 400
  assert sorted(p.name for p in out.iterdir()) == ["niah.json", "niah.png"]  # no temporary file left
  assert f"wrote {out / 'niah.json'}" in capsys.readouterr().out


# Perplexity.
@pytest.mark.slow
def test_perplexity_equals_the_full_logits_cross_entropy(run_dir):
  source = load.resolve(str(run_dir))
  model = load.load_model(source)
  rng = np.random.default_rng(0)
  documents = [ppl.Document("code", rng.integers(3, 500, n + 1).astype(np.int32), False)
               for n in (5, 40, 63, 64, 65, 100, 128)]
  nlls = ppl.score(load.jit_apply(model, ppl.token_nll), documents, pad_id=0, max_length=128, batch_tokens=256)
  # The reference: full [B, S, V] logits of all documents in one padded batch (causal: padding comes after).
  ids_BxS = np.zeros((len(documents), 129), np.int32)
  for b, doc in enumerate(documents):
    ids_BxS[b, :len(doc.tokens)] = doc.tokens
  logprobs_BxSxV = jax.nn.log_softmax(logits_of(model)(ids_BxS[:, :-1]))
  want_BxS = -np.take_along_axis(np.asarray(logprobs_BxSxV), ids_BxS[:, 1:, None], axis=-1)[..., 0]
  for b, (doc, nll_N) in enumerate(zip(documents, nlls)):
    np.testing.assert_allclose(nll_N, want_BxS[b, :len(doc.tokens) - 1], rtol=2e-5, atol=2e-5)


def logits_of(model):
  return load.jit_apply(model, lambda m, ids_BxS: m(ids_BxS))


def params_by_path(model) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


@pytest.mark.slow
def test_eval_ppl_on_a_training_run_beats_its_initialisation(data_dir, run_dir, untrained_dir, tmp_path):
  reports = {}
  for name, checkpoint in (("trained", run_dir), ("untrained", untrained_dir)):
    out = tmp_path / name
    assert eval_cli("ppl", f"--checkpoint={checkpoint}", f"--mixture={data_dir / 'mixture.py'}",
                    "--max-documents=40", "--buckets=16,32", "--max-length=64", f"--out={out}") == 0
    reports[name] = json.loads((out / "ppl.json").read_text())
  trained, untrained = reports["trained"], reports["untrained"]
  assert trained["kind"] == "workdir" and trained["step"] == 12
  assert set(trained["components"]) == {"code", "text"} and set(trained["domains"]) == {"code", "text"}
  for name in ("code", "text"):
    report = trained["components"][name]
    assert report["documents"] == 40 and report["domain"] == name
    assert report["perplexity"] == pytest.approx(np.exp(report["nll"]))
    assert 0 < report["bits_per_byte"] and report["perplexity"] < untrained["components"][name]["perplexity"]
    assert untrained["components"][name]["perplexity"] == pytest.approx(512, rel=0.5)  # ~uniform over 512 tokens
  total = sum(r["tokens"] for r in trained["components"].values())
  assert sum(r["tokens"] for r in trained["by_position"].values()) == total
  assert sum(r["tokens"] for r in trained["by_length"].values()) == total
  assert sum(r["documents"] for r in trained["by_length"].values()) == 80
  assert list(trained["by_position"]) == ["[0, 16)", "[16, 32)", "[32, inf)"]
  assert trained["truncated_documents"] > 0  # some documents are longer than 64 tokens
  assert trained["by_position"]["[32, inf)"]["documents"] < trained["by_position"]["[0, 16)"]["documents"] == 80


# Checkpoints.
@pytest.mark.slow
def test_every_checkpoint_kind_loads_the_same_model(run_dir, tmp_path):
  source = load.resolve(str(run_dir))
  assert source.kind == "workdir" and source.step == 12 and source.tokenizer_path.exists()
  model = load.load_model(source)
  want = params_by_path(model)
  convert.save_hf(model, tmp_path / "hf")
  shutil.copy(load.load_tokenizer_of(source).path, tmp_path / "hf" / "tokenizer.model")
  convert.save_orbax(model, tmp_path / "orbax")
  for directory, kind in ((tmp_path / "hf", "huggingface"), (tmp_path / "orbax", "orbax")):
    tokenizer = None if kind == "huggingface" else str(source.tokenizer_path)
    other = load.resolve(str(directory), tokenizer)
    assert other.kind == kind and other.model_config.family == "deepseek_v2"
    got = params_by_path(load.load_model(other))
    assert got.keys() == want.keys()
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    assert load.load_tokenizer_of(other).vocab_size == load.load_tokenizer_of(source).vocab_size
  assert load.default_out_dir(source) == run_dir / "eval"
  assert load.default_out_dir(load.resolve(str(tmp_path / "hf"))) == pathlib.Path("eval/hf")
  # A Hugging Face tokenizer_config.json names the special tokens; without a BOS, texts start after EOS.
  eos = {"content": "<｜end▁of▁sentence｜>", "special": True}
  (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": eos}))
  hf = load.resolve(str(tmp_path / "hf"))
  assert hf.special_tokens.bos == hf.special_tokens.eos == hf.special_tokens.pad == eos["content"]
  tokenizer = load.load_tokenizer_of(hf)
  assert tokenizer.bos_id == tokenizer.eos_id


@pytest.mark.slow
def test_a_staged_recipe_stands_for_its_latest_finished_stage(run_dir, tmp_path):
  root = tmp_path / "recipe"
  for name, done in (("0-continued", True), ("1-long", True), ("2-longer", False)):
    shutil.copytree(run_dir, root / "stages" / name)
    if done:
      (root / "stages" / name / stages.DONE_FILE).write_text("{}\n")
  assert load.resolve(str(root)).path == root / "stages" / "1-long"
  (root / "stages" / "0-continued" / stages.DONE_FILE).unlink()
  (root / "stages" / "1-long" / stages.DONE_FILE).unlink()
  with pytest.raises(ConfigError, match="--checkpoint: .* holds no finished stage"):
    load.resolve(str(root))


# Bad input.
@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["niah", "--lengths=1k"], "--checkpoint: required"),
    (["niah", "--checkpoint=/nonexistent/ckpt", "--lengths=1k"], "--checkpoint: /nonexistent/ckpt does not exist"),
    (["niah", "--checkpoint={tmp}", "--lengths=1k"], "is neither a Hugging Face directory"),
    (["niah", "--checkpoint={run}"], "--lengths: required"),
    (["niah", "--checkpoint={run}", "--lengths=1k,abc"], "--lengths: 'abc' is not a positive token count"),
    (["niah", "--checkpoint={run}", "--lengths=1k", "--depths=0,2"], "--depths: '2' is not a fraction"),
    (["niah", "--checkpoint={run}", "--lengths=64", "--haystack={data}/mixture.py"], "--lengths: 64 tokens is shorter"),
    (["niah", "--checkpoint={run}", "--lengths=1k", "--haystack=/nonexistent/mix.py"],
     "--haystack: mixture file /nonexistent/mix.py does not exist"),
    (["niah", "--checkpoint={run}", "--lengths=1k", "--trials=0"], "--trials: must be >= 1"),
    (["niah", "--checkpoint={untrained}", "--lengths=1k", "--tokenizer=/nonexistent/tok.model"],
     "--tokenizer: /nonexistent/tok.model does not exist"),
    (["ppl", "--checkpoint={run}", "--mixture=/nonexistent/mix.py"],
     "--mixture: mixture file /nonexistent/mix.py does not exist"),
    (["ppl", "--checkpoint={run}"], "--mixture: required"),
    (["ppl", "--checkpoint={run}", "--mixture={data}/mixture.py", "--buckets=1k,64"], "--buckets: '1k,64'"),
    (["ppl", "--checkpoint={run}", "--mixture={data}/mixture.py", "--max-documents=0"], "--max-documents: must be"),
    (["ppl", "--config=configs/default.py", "--checkpoint={run}", "--mixture={data}/mixture.py"], "drop --config"),
    (["humaneval", "--checkpoint={run}", "--samples=5", "--k=1,10"], "--samples: 5 samples per problem cannot "
     "estimate pass@10"),
    (["humaneval", "--checkpoint={run}", "--top-p=0"], "--top-p"),
    (["humaneval", "--checkpoint={run}", "--limit=1", "--data={data}/mixture.py"], "line 1 is not JSON"),
    (["humaneval", "--checkpoint={run}", "--limit=1", "--data={data}/code.jsonl"], "has no string field"),
    (["fim", "--checkpoint={run}", "--limit=1", "--data=/nonexistent/infilling.jsonl.gz"],
     "--data: /nonexistent/infilling.jsonl.gz: cannot read it"),
    (["fim", "--checkpoint={run}", "--tokenizer={nofim}"], "FIM needs sentinel token(s)"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(args, words, data_dir, run_dir, untrained_dir, tmp_path,
                                                          capsys):
  out = tmp_path / "out"
  values = {"run": run_dir, "untrained": untrained_dir, "data": data_dir, "tmp": tmp_path}
  if any("{nofim}" in a for a in args):
    values["nofim"] = _no_fim(tmp_path)
  assert eval_cli(*[a.format(**values) for a in args], f"--out={out}") == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("pretrain eval: error: ") and words in err, err
  assert not out.exists()


def test_a_model_directory_without_a_tokenizer_asks_for_one(untrained_dir, tmp_path):
  shutil.copytree(untrained_dir, tmp_path / "ckpt")
  (tmp_path / "ckpt" / "tokenizer.model").unlink()
  with pytest.raises(ConfigError, match="--tokenizer: .* holds no tokenizer.json and 0 \\*.model files"):
    load.resolve(str(tmp_path / "ckpt"))
  source = load.resolve(str(tmp_path / "ckpt"), str(untrained_dir / "tokenizer.model"))
  assert source.tokenizer_path == untrained_dir / "tokenizer.model"
  assert load.load_tokenizer_of(source).bos_id == load_tokenizer(untrained_dir / "tokenizer.model").bos_id


def _no_fim(tmp_path) -> pathlib.Path:
  """A tokenizer with the run's BOS/EOS/pad but none of the known FIM sentinels (its own are others)."""
  from pretrain.data import tokenizer_train

  others = SpecialTokens(fim_begin="<other_begin>", fim_hole="<other_hole>", fim_end="<other_end>")
  return tokenizer_train.train_sentencepiece(tiny_tokenizers.sample_texts(300, seed=1), tmp_path / "nofim",
                                             vocab_size=500, special_tokens=others, num_threads=2)


@pytest.mark.slow
def test_eval_humaneval_completes_runs_and_scores_and_writes_both_files(run_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert eval_cli("humaneval", f"--checkpoint={run_dir}", "--limit=3", "--samples=2", "--k=1,2", "--temperature=0.8",
                  "--max-new-tokens=12", "--batch-size=4", f"--out={out}") == 0
  records = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
  summary = json.loads((out / "humaneval.json").read_text())
  assert [r["task_id"] for r in records] == [f"HumanEval/{i}" for i in range(3) for _ in range(2)]
  assert all(isinstance(r["passed"], bool) and r["status"] for r in records)
  assert summary["problems"] == 3 and summary["samples"] == 6 and 0.0 <= summary["pass@1"] <= summary["pass@2"] <= 1
  assert summary["temperature"] == 0.8 and summary["kind"] == "workdir" and summary["isolation"]
  assert "humaneval: pass@1" in capsys.readouterr().out
  # The same seed draws the same completions.
  again = tmp_path / "again"
  assert eval_cli("humaneval", f"--checkpoint={run_dir}", "--limit=3", "--samples=2", "--k=1,2", "--temperature=0.8",
                  "--max-new-tokens=12", "--batch-size=4", f"--out={again}") == 0
  assert (again / "humaneval.jsonl").read_text() == (out / "humaneval.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_eval_fim_infills_in_the_model_s_format_and_scores_each_line(run_dir, tmp_path, mode):
  out = tmp_path / "out"
  assert eval_cli("fim", f"--checkpoint={run_dir}", "--limit=6", f"--mode={mode}", "--max-new-tokens=8",
                  f"--out={out}") == 0
  records = [json.loads(line) for line in (out / "fim.jsonl").read_text().splitlines()]
  summary = json.loads((out / "fim.json").read_text())
  assert len(records) == 6 and all(r["infill"].endswith("\n") and r["infill"].count("\n") == 1 for r in records)
  assert summary["tasks"] == 6 and summary["mode"] == mode and 0.0 <= summary["exact_match"] <= 1.0


@pytest.mark.slow
def test_generate_writes_completions_and_bad_prompts_are_one_clear_error(run_dir, tmp_path, capsys):
  out = tmp_path / "completions.jsonl"
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "def add(a, b):\n"}) + "\n" + json.dumps({"prompt": "import os\n"}) + "\n")
  assert cli.main(["generate", f"--checkpoint={run_dir}", f"--prompts={prompts}", "--max-new-tokens=6",
                   f"--out={out}"]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["def add(a, b):\n", "import os\n"] and all(isinstance(r["completion"], str)
                                                                                    for r in rows)
  capsys.readouterr()
  (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
  for args, words in ((["--prompt=x", f"--prompts={prompts}"], "--prompt: give --prompt TEXT"),
                      ([f"--prompts={tmp_path / 'bad.jsonl'}"], "line 1 has no string field 'prompt'"),
                      (["--prompt=" + "x " * 2000], "--prompt: prompt 0 is"),
                      (["--prompt=x", "--top-p=0"], "--top-p")):
    target = tmp_path / "never.jsonl"
    assert cli.main(["generate", f"--checkpoint={run_dir}", *args, f"--out={target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pretrain generate: error: ") and words in err, err
    assert not target.exists()
