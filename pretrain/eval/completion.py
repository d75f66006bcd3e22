"""From a model and its tokenizer to completions and infills, in batches through the decoding engine
(pretrain/generate): what the code evaluations (humaneval.py, infilling.py) ask for.

A completion continues `BOS + prompt`; an infill continues the FIM layout the model was trained on
(data/fim.py `prompt`: PSM `BOS <begin> prefix <hole> suffix <end>`, or SPM), with the tokenizer's
own sentinels. The generated text is the exact bytes of the new tokens (generate/text.py
`continuation`), so a leading indentation is kept as generated. Prompts go through the engine `batch_size` at a time,
sorted by length so each batch pads little; batch i samples with seed `seed + i`, so a run is
reproducible for a seed and a batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from pretrain import generate
from pretrain.data import fim as fim_lib
from pretrain.data.tokenizer import Tokenizer
from pretrain.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How completions are drawn (the evaluations' flags)."""
  max_new_tokens: int
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  batch_size: int = 16

  def check(self) -> None:
    if self.batch_size < 1:
      raise ConfigError("--batch-size", f"must be >= 1, got {self.batch_size}")
    generate.Sampling(self.temperature, self.top_p, self.top_k).validate()
    if self.max_new_tokens < 1:
      raise ConfigError("--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")


class Completer:
  """`complete(prompts)` and `infill(pairs)` for one model, tokenizer and decoding; `mesh` splits the
  work as training does (None: one device)."""

  def __init__(self, model, tokenizer: Tokenizer, decoding: Decoding, *, mesh=None,
               log: Callable[[str], None] = lambda _: None):
    decoding.check()
    self.model, self.tokenizer, self.decoding, self.mesh, self.log = model, tokenizer, decoding, mesh, log

  def complete(self, prompts: Sequence[str], stop: Sequence[str] = ()) -> list[str]:
    """Each prompt's continuation, cut before the first of `stop` it holds (EOS dropped)."""
    bos = [self.tokenizer.bos_id]
    texts = self._generate([bos + self.tokenizer.encode(p).tolist() for p in prompts], "completions")
    return [generate.text.truncate(text, stop) for text in texts]

  def infill(self, pairs: Sequence[tuple[str, str]], *, spm: bool = False) -> list[str]:
    """The middle the model writes between each (prefix, suffix)."""
    fim = self.tokenizer.require_fim()
    bos = np.asarray([self.tokenizer.bos_id], np.int32)
    ids = [np.concatenate([bos, fim_lib.prompt(self.tokenizer.encode(prefix), self.tokenizer.encode(suffix), fim,
                                               spm=spm)]).tolist() for prefix, suffix in pairs]
    return self._generate(ids, "infills")

  def _generate(self, prompts: list[list[int]], what: str) -> list[str]:
    d = self.decoding
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for batch, start in enumerate(range(0, len(order), d.batch_size)):
      rows = order[start:start + d.batch_size]
      new_ids = generate.generate(self.model, [prompts[i] for i in rows], max_new_tokens=d.max_new_tokens,
                                  temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                                  eos_id=self.tokenizer.eos_id, seed=d.seed + batch, mesh=self.mesh)
      for i, ids in zip(rows, new_ids, strict=True):
        texts[i] = generate.text.continuation(self.tokenizer, ids)
      self.log(f"{what}: {min(start + d.batch_size, len(order))}/{len(order)}")
    return texts
