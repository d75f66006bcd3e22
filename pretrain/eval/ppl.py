"""`pretrain eval ppl`: perplexity per mixture component and domain, and by length for long documents.

Which text. `pretrain prepare` keeps no held-out split, so this command reads raw documents
itself: `--mixture` names a mixture file (data_mixtures/ style) whose components' inputs are
read through `data/sources.py`, exactly as `prepare` would read them, but not filtered,
deduplicated or prepared. For held-out perplexity, point it at a mixture whose inputs were kept
out of training (the built-in mixture is what the default run trains on, so on it this measures
fit, not generalisation). Per component, a seeded shuffle of its input files is read in order,
documents in file order within a file, up to `--max-documents` documents.

How each document is scored. BOS + the document's tokens + EOS, as the training pipeline frames
a document, never fill-in-the-middle (FIM is a training transform, not text to measure); every
next-token pair is a target, EOS included. A document longer than `--max-length` tokens is cut
there (and counted as truncated). The cross-entropy is train/fused_cross_entropy.py's, in
float32 and in chunks, so a long document never materialises [length, vocab] logits.
Documents are padded to the next power of two (at least 64, at most `--max-length`) and batched
by that length, so each length compiles once.

What it reports (ppl.json in --out, and a table): per component and per domain, the documents,
scored tokens, mean negative log-likelihood, perplexity exp(nll) and bits per byte (the nll
over the UTF-8 bytes the scored tokens stand for, comparable across tokenizers). For long
documents, two views over the bucket edges `--buckets` (token counts): `by_length` groups
whole documents by their scored length, `by_position` groups tokens by their position in the
document, so a model that uses long context shows a falling nll at later positions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath

from pretrain.data import sources
from pretrain.data.mixture import Mixture
from pretrain.data.tokenizer import Tokenizer
from pretrain import storage
from pretrain.atomic_file import atomic_file
from pretrain.eval import flags, load
from pretrain.schema import ConfigError
from pretrain.train import loss

MIN_PADDED_LENGTH = 64
LOSS_CHUNK = 1024  # tokens per chunk of the fused cross-entropy, as TrainConfig.loss_chunk


@dataclasses.dataclass(frozen=True)
class Document:
  component: str
  tokens: np.ndarray  # int32 [n + 1]: BOS, the text's tokens, EOS (cut to max_length + 1)
  truncated: bool


@dataclasses.dataclass
class Totals:
  """Sums that a perplexity is computed from."""

  documents: int = 0
  tokens: int = 0
  nll: float = 0.0
  bytes: int = 0

  def add(self, documents: int, tokens: int, nll: float, num_bytes: int) -> None:
    self.documents += documents
    self.tokens += tokens
    self.nll += nll
    self.bytes += num_bytes

  def report(self) -> dict:
    mean = self.nll / self.tokens if self.tokens else math.nan
    return {"documents": self.documents, "tokens": self.tokens, "nll": mean, "perplexity": float(np.exp(mean)),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else math.nan}


def parse_buckets(text: str) -> tuple[int, ...]:
  """'1k,4k,16k' -> (1024, 4096, 16384): increasing bucket edges in tokens."""
  edges = flags.parse_token_counts(text, "--buckets")
  if edges != sorted(set(edges)):
    raise ConfigError("--buckets", f"{text!r}: edges must increase")
  return tuple(edges)


def bucket_names(edges: Sequence[int]) -> list[str]:
  bounds = [0, *edges]
  labels = [flags.token_label(edge) for edge in bounds]
  return [f"[{lo}, {hi})" for lo, hi in zip(labels, labels[1:])] + [f"[{labels[-1]}, inf)"]


def read_documents(mixture: Mixture, tokenizer: Tokenizer, *, max_documents: int, max_length: int,
                   seed: int) -> list[Document]:
  """Up to `max_documents` tokenized documents per component (see the module docstring for which)."""
  documents = []
  for index, component in enumerate(mixture.components):
    units, _ = sources.plan_units(mixture, index)
    order = np.random.default_rng([seed, index]).permutation(len(units))
    found = 0
    for unit_index in order:
      for raw in sources.read_unit(units[unit_index], collections.Counter(), skip_corrupt=True):
        body = tokenizer.encode(raw.text)
        if len(body) == 0:
          continue
        tokens = np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int32)
        documents.append(Document(component.name, tokens[:max_length + 1], len(tokens) > max_length + 1))
        found += 1
        if found == max_documents:
          break
      if found == max_documents:
        break
    if not found:
      raise ConfigError("--mixture", f"component {component.name!r} has no non-empty document")
  return documents


def token_nll(model, inputs_BxS, targets_BxS, mask_BxS):
  """Per-token nll [B, S] float32 (0 where masked), through the training loss's fused chunked cross-entropy."""
  h_BxSxD, _ = model.features(inputs_BxS)
  return loss.per_token_nll(model, h_BxSxD, targets_BxS, mask_BxS, LOSS_CHUNK)[1]


def score(apply: Callable, documents: Sequence[Document], *, pad_id: int, max_length: int,
          batch_tokens: int) -> list[np.ndarray]:
  """Each document's per-target nll [n], in the order given; `apply` is `token_nll` under jit."""
  by_length: dict[int, list[int]] = collections.defaultdict(list)
  for i, doc in enumerate(documents):
    by_length[_padded_length(len(doc.tokens) - 1, max_length)].append(i)
  out: list[np.ndarray | None] = [None] * len(documents)
  for seq, indices in sorted(by_length.items()):
    rows = max(1, min(len(indices), batch_tokens // seq))
    for begin in range(0, len(indices), rows):
      chunk = indices[begin:begin + rows]
      inputs_BxS = np.full((rows, seq), pad_id, np.int32)
      targets_BxS = np.full((rows, seq), pad_id, np.int32)
      mask_BxS = np.zeros((rows, seq), np.float32)
      for b, i in enumerate(chunk):
        tokens = documents[i].tokens
        n = len(tokens) - 1
        inputs_BxS[b, :n], targets_BxS[b, :n], mask_BxS[b, :n] = tokens[:-1], tokens[1:], 1.0
      nll_BxS = np.asarray(jax.device_get(apply(inputs_BxS, targets_BxS, mask_BxS)))
      for b, i in enumerate(chunk):
        out[i] = nll_BxS[b, :len(documents[i].tokens) - 1]
  return out


def summarize(documents: Sequence[Document], nlls: Sequence[np.ndarray], mixture: Mixture, tokenizer: Tokenizer,
              edges: Sequence[int]) -> dict:
  """The report's numbers: per component, per domain, and by length and position bucket."""
  domain_of = {c.name: c.domain for c in mixture.components}
  components = {c.name: Totals() for c in mixture.components}
  domains = {domain: Totals() for domain in dict.fromkeys(domain_of.values())}
  names = bucket_names(edges)
  by_length = [Totals() for _ in names]
  by_position = [Totals() for _ in names]
  bounds = np.asarray(edges)
  for doc, nll_N in zip(documents, nlls, strict=True):
    targets = doc.tokens[1:]
    bytes_N = tokenizer.byte_lengths[targets]
    for totals in (components[doc.component], domains[domain_of[doc.component]],
                   by_length[int(np.searchsorted(bounds, len(targets), side="right"))]):
      totals.add(1, len(targets), float(nll_N.sum()), int(bytes_N.sum()))
    bucket_N = np.searchsorted(bounds, np.arange(len(targets)), side="right")
    for bucket in np.unique(bucket_N):
      inside = bucket_N == bucket
      by_position[bucket].add(1, int(inside.sum()), float(nll_N[inside].sum()), int(bytes_N[inside].sum()))
  return {
      "components": {name: {"domain": domain_of[name], **t.report()} for name, t in components.items()},
      "domains": {name: t.report() for name, t in domains.items()},
      "by_length": {name: t.report() for name, t in zip(names, by_length) if t.documents},
      "by_position": {name: t.report() for name, t in zip(names, by_position) if t.documents},
      "truncated_documents": sum(doc.truncated for doc in documents),
  }


def run(source: load.Source, *, mixture: str, max_documents: int = 100, max_length: int | None = None,
        buckets: Sequence[int] = (1024, 4096, 16384, 65536), seed: int = 0, batch_tokens: int = 16384,
        log=print) -> dict:
  """The report as ppl.json holds it. The documents are read and tokenized before the parameters."""
  if max_length is None:
    max_length = source.model_config.max_position_embeddings
  for flag, value in (("--max-documents", max_documents), ("--max-length", max_length),
                      ("--batch-tokens", batch_tokens)):
    if value < 1:
      raise ConfigError(flag, f"must be >= 1, got {value}")
  mix = load.load_mixture(mixture, "--mixture")
  tokenizer = load.load_tokenizer_of(source)
  documents = read_documents(mix, tokenizer, max_documents=max_documents, max_length=max_length, seed=seed)
  result = {"eval": "ppl", **source.describe(), "mixture": mixture, "max_documents": max_documents,
            "max_length": max_length, "buckets": list(buckets), "seed": seed,
            **evaluate(load.load_model(source), tokenizer, mix, documents, max_length=max_length, buckets=buckets,
                       batch_tokens=batch_tokens)}
  for name, report in result["components"].items():
    log(f"{name:<12} {report['domain']:<5} {report['documents']:>6} docs {report['tokens']:>10,} tokens  "
        f"ppl {report['perplexity']:10.3f}  bits/byte {report['bits_per_byte']:.3f}")
  for view in ("by_length", "by_position"):
    for name, report in result[view].items():
      log(f"{view:<12} {name:<16} {report['tokens']:>10,} tokens  ppl {report['perplexity']:10.3f}")
  return result


def evaluate(model, tokenizer: Tokenizer, mix: Mixture, documents, *, max_length: int, buckets: Sequence[int],
             batch_tokens: int) -> dict:
  """The perplexities of `documents` (read_documents) under `model`, per component, domain and length."""
  nlls = score(load.jit_apply(model, token_nll), documents, pad_id=tokenizer.pad_id, max_length=max_length,
               batch_tokens=batch_tokens)
  return summarize(documents, nlls, mix, tokenizer, buckets)


def write(result: dict, out_dir) -> epath.Path:
  path = storage.as_path(out_dir) / "ppl.json"
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps(result, indent=2) + "\n")
  return path


def _padded_length(length: int, max_length: int) -> int:
  return min(max(MIN_PADDED_LENGTH, 1 << (length - 1).bit_length()), max_length)

