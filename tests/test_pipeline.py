"""The Grain pipeline: mixture proportions, FIM rate, special tokens, exact resume in a new
process, disjoint process shards, and the errors that name the culprit."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tiny_tokenizers import sample_texts, tiny_tokenizer

from pretrain import schema
from pretrain.data import pipeline, records
from pretrain.data.config import DataConfig
from pretrain.data.mixture import Mixture
from pretrain.schema import ConfigError

WEIGHTS = {"code": 0.6, "math": 0.1, "text": 0.3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Three prepared components (two shards each) tokenized with the tiny sentencepiece model."""
  tok = tiny_tokenizer("sentencepiece", tmp_path_factory)
  root = tmp_path_factory.mktemp("prepared")
  for seed, name in enumerate(WEIGHTS):
    docs = [records.Document(tok.encode(t), name, "mixed", f"{name}/{i}")
            for i, t in enumerate(sample_texts(400, seed=10 + seed))]
    (root / name).mkdir()
    for shard in range(2):
      records.write_shard(root / name / records.shard_name(shard, 2), docs[shard::2])
  return tok, root


def _mixture(fim_rate=0.5, weights=WEIGHTS) -> Mixture:
  components = [{"name": n, "domain": n, "weight": w, "fim_rate": fim_rate, "fim_spm_rate": 0.5}
                for n, w in weights.items()]
  return schema.parse(Mixture, {"name": "test", "components": components}, "mixture")


def _config(root, **overrides) -> DataConfig:
  values = dict(mixture="unused", prepared_dir=str(root), tokenizer="unused", seq_len=128, global_batch_size=8)
  return schema.parse(DataConfig, values | overrides, "config.data")


@pytest.mark.slow
def test_mixture_proportions_over_a_million_tokens(corpus):
  tok, root = corpus
  config = _config(root, seq_len=512, global_batch_size=32)
  it = iter(pipeline.build(config, _mixture(), tok))
  counts = np.zeros(3)
  while counts.sum() < 1_000_000:
    batch = next(it)
    np.add.at(counts, batch["component"], (batch["segment_ids"] > 0).sum(axis=1))
  np.testing.assert_allclose(counts / counts.sum(), list(WEIGHTS.values()), atol=0.01)


def test_documents_have_bos_eos_and_half_are_fill_in_the_middle(corpus):
  tok, root = corpus
  fim_ids = tok.require_fim()
  it = iter(pipeline.build(_config(root, seq_len=256, global_batch_size=16), _mixture(fim_rate=0.5), tok))
  documents = fim_documents = 0
  for _ in range(60):
    batch = next(it)
    for inputs, segments in zip(batch["inputs"], batch["segment_ids"], strict=True):
      starts = np.flatnonzero((inputs == tok.bos_id) & (segments > 0))
      for start in starts[starts + 1 < len(inputs)]:
        documents += 1
        fim_documents += inputs[start + 1] == fim_ids.begin
      # Every document ends in EOS, followed by the next document's BOS.
      eos = np.flatnonzero(inputs[:-1] == tok.eos_id)
      assert (inputs[eos + 1] == tok.bos_id).all()
  assert documents > 1000
  assert abs(fim_documents / documents - 0.5) < 0.05


def test_fim_off_means_no_sentinels(corpus):
  tok, root = corpus
  fim_ids = tok.require_fim()
  it = iter(pipeline.build(_config(root), _mixture(fim_rate=0.0), tok))
  for _ in range(20):
    inputs = next(it)["inputs"]
    assert not np.isin(inputs, [fim_ids.begin, fim_ids.hole, fim_ids.end]).any()


def test_same_seed_same_stream_other_seed_other_stream(corpus):
  tok, root = corpus
  first = [next(iter(pipeline.build(_config(root, seed=s), _mixture(), tok)))["inputs"] for s in (0, 0, 1)]
  np.testing.assert_array_equal(first[0], first[1])
  assert not np.array_equal(first[0], first[2])


RESUME_SCRIPT = textwrap.dedent("""
    import hashlib, json, pickle, sys
    sys.path.insert(0, {tests!r})
    from pretrain.data import pipeline
    config, mixture, tok_path, state, n = pickle.load(open(sys.argv[1], "rb"))
    from pretrain.data.tokenizer import load_tokenizer
    it = iter(pipeline.build(config, mixture, load_tokenizer(tok_path)))
    it.set_state(json.loads(state))
    digest = hashlib.sha256()
    for _ in range(n):
      batch = next(it)
      for key in sorted(batch):
        digest.update(key.encode()); digest.update(batch[key].tobytes())
    print(digest.hexdigest())
""")


@pytest.mark.parametrize("k", [0, 7])
def test_state_after_k_batches_restores_the_next_100_in_a_new_process(corpus, tmp_path, k):
  tok, root = corpus
  config, mixture = _config(root, seq_len=64, global_batch_size=4), _mixture()
  it = iter(pipeline.build(config, mixture, tok))
  for _ in range(k):
    next(it)
  state = json.dumps(it.get_state())  # it must survive JSON, as it does in a checkpoint
  digest = hashlib.sha256()
  for _ in range(100):
    batch = next(it)
    for key in sorted(batch):
      digest.update(key.encode())
      digest.update(batch[key].tobytes())
  args = tmp_path / "args.pkl"
  args.write_bytes(pickle.dumps((config, mixture, str(tok.path), state, 100)))
  script = RESUME_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent))
  out = subprocess.run([sys.executable, "-c", script, str(args)], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == digest.hexdigest()


def test_two_processes_read_disjoint_documents_whose_union_is_the_whole(corpus):
  tok, root = corpus
  config = _config(root, seq_len=64, global_batch_size=4)
  mixture = _mixture(fim_rate=0.0, weights={"code": 1.0})

  def tokens_of(process_index, process_count):
    batches = pipeline.build(config, mixture, tok, process_index=process_index, process_count=process_count,
                             num_epochs=1)
    rows = [(b["inputs"], b["segment_ids"]) for b in batches]
    return np.concatenate([inputs[segments > 0] for inputs, segments in rows])

  whole = tokens_of(0, 1)
  first, second = tokens_of(0, 2), tokens_of(1, 2)
  np.testing.assert_array_equal(np.sort(np.concatenate([first, second])), np.sort(whole))
  # Disjoint at the document level: each process saw its own BOS-delimited documents.
  bos = tok.bos_id
  docs = [set(map(bytes, np.split(t, np.flatnonzero(t == bos))[1:])) for t in (first, second)]
  assert docs[0].isdisjoint(docs[1]) and len(docs[0]) + len(docs[1]) == 400


def test_min_length_keeps_only_long_documents(corpus):
  tok, root = corpus
  config = _config(root, min_length=150, seq_len=64, global_batch_size=4)
  batches = pipeline.build(config, _mixture(fim_rate=0.0, weights={"text": 1.0}), tok, num_epochs=1)
  inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  lengths = np.diff(np.append(np.flatnonzero(inputs == tok.bos_id), len(inputs))) - 2  # less BOS and EOS
  assert lengths.min() >= 150
  with pytest.raises(ConfigError, match="only 0 documents have at least 100000 tokens"):
    pipeline.build(_config(root, min_length=100_000), _mixture(), tok)


def test_stage_weights_override_the_mixture(corpus):
  tok, root = corpus
  it = iter(pipeline.build(_config(root, weights={"code": 0.0, "math": 1.0, "text": 0.0}), _mixture(), tok))
  assert set(next(it)["component"].tolist()) == {1}
  with pytest.raises(ConfigError, match="no component 'cod'"):
    pipeline.build(_config(root, weights={"cod": 1.0}), _mixture(), tok)
  with pytest.raises(ConfigError, match="all weights are zero"):
    pipeline.build(_config(root, weights={"code": 0.0, "math": 0.0, "text": 0.0}), _mixture(), tok)
  with pytest.raises(ConfigError, match=r"config.data.weights.code: must be >= 0"):
    _config(root, weights={"code": -1.0})


def test_missing_shards_and_corrupt_records_are_named(corpus, tmp_path):
  tok, root = corpus
  with pytest.raises(ConfigError, match=r"no shards for component 'code' in .*empty"):
    pipeline.build(_config(tmp_path / "empty"), _mixture(), tok)

  bad = tmp_path / "bad" / "code"
  bad.mkdir(parents=True)
  good = records.encode(records.Document(tok.encode("def f():\n  return 1\n"), "code", "python", "x"))
  _write_raw(bad / records.shard_name(0, 1), [good, b"\xff\xff\xff\x7fnot a record", good])
  mixture = _mixture(fim_rate=0.0, weights={"code": 1.0})
  with pytest.raises(records.CorruptRecordError, match=r"shard-00000-of-00001.array_record\[1\]"):
    list(pipeline.build(_config(tmp_path / "bad", seq_len=8, global_batch_size=1), mixture, tok, num_epochs=1))
  batches = list(pipeline.build(_config(tmp_path / "bad", seq_len=8, global_batch_size=1, skip_corrupt_records=True),
                                mixture, tok, num_epochs=1))
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == 2 * (len(tok.encode("def f():\n  return 1\n")) + 2)

  (tmp_path / "junk" / "code").mkdir(parents=True)
  (tmp_path / "junk" / "code" / records.shard_name(0, 1)).write_bytes(b"this is not an array_record file")
  with pytest.raises(records.CorruptRecordError, match="shard-00000-of-00001"):
    list(pipeline.build(_config(tmp_path / "junk"), mixture, tok))


def _write_raw(path, payloads):
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(path), "group_size:1")
  for payload in payloads:
    writer.write(payload)
  writer.close()


def test_fim_needs_the_sentinels(corpus, tmp_path):
  from tiny_tokenizers import build_byte_level_bpe, SPECIALS

  from pretrain.data.tokenizer import load_tokenizer

  _, root = corpus
  path = build_byte_level_bpe(tmp_path, special_strings=(SPECIALS.bos, SPECIALS.eos))
  no_fim = load_tokenizer(path)
  with pytest.raises(ConfigError, match="fim"):
    pipeline.build(_config(root), _mixture(fim_rate=0.5), no_fim)
  pipeline.build(_config(root), _mixture(fim_rate=0.0), no_fim)  # fine without FIM
