"""Tokenizers: special ids, byte-exact round trips, token bytes, training, and the errors that name the culprit.

Both kinds are built here from generated text: a sentencepiece model with
`train_sentencepiece` and a byte-level BPE `tokenizer.json` with the `tokenizers`
library (whose tokens can end inside a CJK character or an emoji): tiny_tokenizers.py.
"""

from __future__ import annotations

import gzip
import json
import pickle

import numpy as np
import pytest
from tiny_tokenizers import (
  KINDS,
  SPECIALS,
  VOCAB_SIZE,
  build_byte_level_bpe,
  build_sentencepiece,
  sample_texts,
  tiny_tokenizer,
)

from pretrain.data import tokenizer_train
from pretrain.data.config import SpecialTokens
from pretrain.data.tokenizer import Tokenizer, load_tokenizer
from pretrain.schema import ConfigError


@pytest.fixture(params=KINDS)
def tok(request, tmp_path_factory) -> Tokenizer:
  return tiny_tokenizer(request.param, tmp_path_factory)


def test_special_ids_found_and_distinct(tok):
  fim = tok.require_fim()
  assert tok.fim_ids == fim
  ids = [tok.bos_id, tok.eos_id, fim.begin, fim.hole, fim.end]
  assert len(set(ids)) == 5 and all(0 <= i < tok.vocab_size for i in ids)
  assert tok.pad_id == tok.eos_id  # DeepSeek pads with EOS
  assert tok.vocab_size == VOCAB_SIZE or tok.kind == "huggingface"
  assert all(tok.token_bytes[i] == b"" for i in ids)  # special tokens stand for no text
  described = tok.describe()
  assert described["kind"] == tok.kind and described["bos_id"] == tok.bos_id
  assert described["fim_ids"] == {"begin": fim.begin, "hole": fim.hole, "end": fim.end}
  json.dumps(described)  # fit for a manifest


def test_round_trip_is_byte_exact(tok):
  fim = tok.require_fim()
  for text in sample_texts(300, seed=2):
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert tok.normalize(text) == text
    assert tok.is_byte_exact(text, ids)
    assert tok.bytes_of(ids) == text.encode()
    assert int(tok.byte_lengths[ids].sum()) == len(text.encode())
    assert not np.isin(ids, [tok.bos_id, tok.eos_id, fim.begin, fim.hole, fim.end]).any()  # no BOS, no specials
  assert not tok.is_byte_exact("abc", tok.encode("abd"))
  assert not tok.is_byte_exact("abc", [tok.bos_id, *tok.encode("abc")])


def test_token_bytes_match_the_tokenizer(tok):
  assert len(tok.token_bytes) == tok.vocab_size == len(tok.byte_lengths)
  assert tok.byte_lengths.dtype == np.int32
  assert all(len(b) == n for b, n in zip(tok.token_bytes, tok.byte_lengths.tolist()))
  checked = 0
  for i, token in enumerate(tok.token_bytes):
    try:
      text = token.decode()
    except UnicodeDecodeError:
      continue  # a piece of a character: checked through whole documents above
    if token:
      assert tok.decode([i]) == text, i
      checked += 1
  assert checked > VOCAB_SIZE // 2


def test_byte_level_tokens_split_characters(tmp_path_factory):
  tok = tiny_tokenizer("huggingface", tmp_path_factory)
  text = "数据处理的模型 🙂👍🏽 👨‍👩‍👧 テスト"
  ids = tok.encode(text)
  boundaries = np.cumsum(tok.byte_lengths[ids])[:-1]
  encoded = text.encode()
  assert any((encoded[b] & 0xC0) == 0x80 for b in boundaries)  # some token ends inside a character
  assert tok.decode(ids) == text and tok.is_byte_exact(text, ids)


def test_text_that_is_not_byte_exact(tok):
  fim = tok.require_fim()
  specials = [tok.bos_id, tok.eos_id, fim.begin, fim.hole, fim.end]
  assert not tok.is_byte_exact(f"a {SPECIALS.fim_begin} b", tok.encode(f"a {SPECIALS.fim_begin} b"))
  for text in (f"x{SPECIALS.eos}", f"{SPECIALS.bos}y", f"{SPECIALS.fim_end}"):  # matched as special, or as text
    ids = tok.encode(text)
    assert not tok.is_byte_exact(text, ids) or not np.isin(ids, specials).any()
  assert not tok.is_byte_exact(SPECIALS.eos, tok.encode(SPECIALS.eos)) or tok.kind == "sentencepiece"
  if tok.kind == "sentencepiece":  # sentencepiece reads '▁' as a space, and says so
    assert tok.normalize("a▁b") == "a b" == tok.decode(tok.encode("a▁b"))
    assert tok.is_byte_exact("a▁b", tok.encode("a▁b"))


def test_pickles_by_reloading(tok):
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.describe() == tok.describe()
  assert np.array_equal(copy.encode("def f(): 🙂"), tok.encode("def f(): 🙂"))


def test_loads_from_a_directory(tok):
  again = load_tokenizer(tok.path.parent)
  assert again.path == tok.path and again.kind == tok.kind


def test_missing_path(tmp_path):
  with pytest.raises(ConfigError, match="nowhere") as e:
    load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
  assert e.value.key == "config.data.tokenizer"


def test_directory_with_neither_or_both(tmp_path, tmp_path_factory):
  (tmp_path / "README.md").write_text("no tokenizer here")
  with pytest.raises(ConfigError, match=f"{tmp_path}.*neither") as e:
    load_tokenizer(tmp_path)
  assert e.value.key == "config.data.tokenizer"
  sp = tiny_tokenizer("sentencepiece", tmp_path_factory)
  hf = tiny_tokenizer("huggingface", tmp_path_factory)
  (tmp_path / "tokenizer.model").write_bytes(sp.path.read_bytes())
  (tmp_path / "tokenizer.json").write_bytes(hf.path.read_bytes())
  with pytest.raises(ConfigError, match="more than one"):
    load_tokenizer(tmp_path)


def test_unreadable_files(tmp_path):
  (tmp_path / "broken.model").write_bytes(b"not a model")
  (tmp_path / "tokenizer.json").write_text("{not json")
  for name in ("broken.model", "tokenizer.json"):
    with pytest.raises(ConfigError, match=name) as e:
      load_tokenizer(tmp_path / name)
    assert e.value.key == "config.data.tokenizer"


def test_missing_special_tokens_are_named(tmp_path, tmp_path_factory):
  path = build_byte_level_bpe(tmp_path, special_strings=("<s>", "</s>"))
  with pytest.raises(ConfigError, match=str(path)) as e:
    load_tokenizer(path)
  assert e.value.key == "config.data.special_tokens.bos" and SPECIALS.bos in str(e.value)
  sp = tiny_tokenizer("sentencepiece", tmp_path_factory)
  with pytest.raises(ConfigError, match="<pad>") as e:
    load_tokenizer(sp.path, SpecialTokens(pad="<pad>"), key="stage")
  assert e.value.key == "stage.special_tokens.pad"


def test_require_fim_names_the_missing_sentinels(tmp_path):
  path = build_byte_level_bpe(tmp_path, special_strings=(SPECIALS.bos, SPECIALS.eos, SPECIALS.fim_hole))
  tok = load_tokenizer(path)
  assert tok.fim_ids is None and tok.describe()["fim_ids"] is None
  with pytest.raises(ConfigError, match=f"{SPECIALS.fim_begin}.*{SPECIALS.fim_end}.*{path}") as e:
    tok.require_fim()
  assert e.value.key == "config.data.special_tokens.fim_begin"


def test_train_sentencepiece_with_its_own_pad(tmp_path):
  specials = SpecialTokens(bos="<s>", eos="</s>", pad="<pad>", fim_begin="<PRE>", fim_hole="<SUF>", fim_end="<MID>")
  tok = load_tokenizer(build_sentencepiece(tmp_path, specials), specials)
  assert len({tok.bos_id, tok.eos_id, tok.pad_id, *tok.require_fim().__dict__.values()}) == 6
  assert tok.vocab_size == VOCAB_SIZE


def test_train_sentencepiece_refuses_a_used_directory(tmp_path):
  (tmp_path / "sp").mkdir()
  (tmp_path / "sp" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="sp"):
    tokenizer_train.train_sentencepiece(["x"], tmp_path / "sp", vocab_size=VOCAB_SIZE, special_tokens=SPECIALS)
  assert [p.name for p in (tmp_path / "sp").iterdir()] == ["keep.txt"]


def test_train_sentencepiece_too_little_text(tmp_path):
  with pytest.raises(ValueError, match="pieces, not the 1024"):
    tokenizer_train.train_sentencepiece(["tiny text " * 50], tmp_path / "sp", vocab_size=VOCAB_SIZE,
                                        special_tokens=SPECIALS)
  assert list(tmp_path.iterdir()) == []  # neither the model nor its temporary directory


def test_training_sentences_keep_every_byte():
  long_line = "数据🙂x" * 5000
  texts = ["short\nlines\n", long_line + "\nend", ""]
  sentences = list(tokenizer_train._sentences(texts, max_bytes=100))
  assert all(len(s.encode()) <= 100 for s in sentences)
  assert "".join(sentences) == "".join(texts)


def test_iter_texts_from_paths(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  src = tmp_path / "src"
  (src / "pkg").mkdir(parents=True)
  (src / "pkg" / "a.py").write_text("print('a')\n")
  (src / "b.md").write_text("# 数据\n")
  (src / "blob.bin").write_bytes(b"\x00\x01binary")
  (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (tmp_path / "rows.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
  with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
    f.write('{"content": "three"}\n')
  pq.write_table(pa.table({"text": ["four", None, "five"]}), tmp_path / "rows.parquet")
  texts = list(tokenizer_train.iter_texts_from_paths([src, tmp_path / "*.jsonl", tmp_path / "rows.parquet"]))
  assert texts == ["# 数据\n", "print('a')\n", "one", "two", "four", "five"]
  assert list(tokenizer_train.iter_texts_from_paths([tmp_path / "rows.jsonl.gz"], text_field="content")) == ["three"]
  with pytest.raises(ConfigError, match="missing.jsonl"):
    list(tokenizer_train.iter_texts_from_paths([tmp_path / "missing.jsonl"]))
  with pytest.raises(ConfigError, match=r"\*\.nothing"):
    list(tokenizer_train.iter_texts_from_paths([tmp_path / "*.nothing"]))
  with pytest.raises(ConfigError, match="content"):
    list(tokenizer_train.iter_texts_from_paths([tmp_path / "rows.parquet"], text_field="content"))


def test_train_sentencepiece_passes_on_input_errors(tmp_path):
  def texts():
    yield "some text\n"
    raise ConfigError("inputs", "no such file")

  with pytest.raises(ConfigError, match="no such file"):
    tokenizer_train.train_sentencepiece(texts(), tmp_path / "sp", vocab_size=VOCAB_SIZE, special_tokens=SPECIALS)
  assert list(tmp_path.iterdir()) == []
