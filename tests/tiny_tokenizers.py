"""Tiny tokenizers of both kinds, built from generated text, shared by the data tests.

A sentencepiece model from `train_sentencepiece`, and a byte-level BPE `tokenizer.json`
from the `tokenizers` library (whose tokens can end inside a CJK character or an
emoji), both with DeepSeek's special strings. Built once per test session.
"""

from __future__ import annotations

import random

from pretrain.data import tokenizer_train
from pretrain.data.config import SpecialTokens
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

SPECIALS = SpecialTokens()  # DeepSeek's strings
VOCAB_SIZE = 1024
KINDS = ("sentencepiece", "huggingface")

_SYLLABLES = ("ka", "to", "ri", "mu", "ne", "sa", "po", "li", "ve", "da", "qu", "ex", "an", "th", "er", "ing", "ion",
              "st", "ch", "ou", "pl", "gr")
_CJK = "数据处理模型训练代码函数变量返回结果测试文件目录中文字符串列表字典データ処理のテスト한국어"
_EMOJI = ["🙂", "👍🏽", "👨‍👩‍👧", "🚀", "🇯🇵", "✨", "🐍"]
_OTHER = ["café", "naïve", "e\u0301t\u0301e", "Привет", "мир", "مرحبا", "Ω≈ç√", "straße", "½"]


def _word(rng: random.Random) -> str:
  return "".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4)))


def _unicode(rng: random.Random) -> str:
  pick = rng.random()
  if pick < 0.4:
    return "".join(rng.choices(_CJK, k=rng.randint(2, 8)))
  if pick < 0.7:
    return rng.choice(_EMOJI)
  return rng.choice(_OTHER)


def _prose(rng: random.Random) -> str:
  sentences = []
  for _ in range(rng.randint(2, 8)):
    words = [_unicode(rng) if rng.random() < 0.15 else _word(rng) for _ in range(rng.randint(3, 14))]
    sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "  ", "...", "。"]))
  lead = rng.choice(["", " ", "   ", "\t"])
  return lead + rng.choice([" ", "  ", "\n"]).join(sentences) + rng.choice(["", "\n", "\n\n", "  \n"])


def _python(rng: random.Random) -> str:
  name, arg = _word(rng), _word(rng)
  lines = [f"def {name}_{rng.randint(0, 99)}({arg}, n={rng.randint(0, 9999)}):",
           f'    """{_prose(rng).strip()}"""']
  for _ in range(rng.randint(1, 6)):
    indent = rng.choice(["    ", "        ", "\t", "\t\t"])
    lines.append(rng.choice([
        f"{indent}if {arg} > {rng.randint(0, 10**6)}:",
        f"{indent}return {arg} * {rng.random():.4f}  # {_unicode(rng)}",
        f"{indent}{_word(rng)} = {{'{_word(rng)}': [1, 2,   3], \"{_unicode(rng)}\": None}}",
        f"{indent}print(f'{{{arg}!r}} {_unicode(rng)}')",
        "",
    ]))
  return "\n".join(lines) + "\n"


def sample_texts(count: int, seed: int) -> list[str]:
  """Python code and prose with CJK, emoji, tabs, repeated and leading spaces; never '▁'."""
  rng = random.Random(seed)
  return [_python(rng) if rng.random() < 0.5 else _prose(rng) for _ in range(count)]


def build_sentencepiece(root, special_tokens: SpecialTokens = SPECIALS):
  return tokenizer_train.train_sentencepiece(sample_texts(1500, seed=1), root / "sp", vocab_size=VOCAB_SIZE,
                                             special_tokens=special_tokens, num_threads=2)


def build_byte_level_bpe(root, special_strings=(SPECIALS.bos, SPECIALS.eos, SPECIALS.fim_begin, SPECIALS.fim_hole,
                                                SPECIALS.fim_end), name="tokenizer.json"):
  from tokenizers import Tokenizer as HfTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = HfTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(special_strings), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(sample_texts(1500, seed=1), trainer)
  root.mkdir(parents=True, exist_ok=True)
  tok.save(str(root / name))
  return root / name


_BUILT: dict[str, Tokenizer] = {}


def tiny_tokenizer(kind: str, tmp_path_factory) -> Tokenizer:
  """One tokenizer of each kind per test session, with DeepSeek's special strings."""
  if kind not in _BUILT:
    root = tmp_path_factory.mktemp(kind)
    path = build_sentencepiece(root) if kind == "sentencepiece" else build_byte_level_bpe(root)
    _BUILT[kind] = load_tokenizer(path)
  return _BUILT[kind]
