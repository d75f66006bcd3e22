"""Text in, text out: prompts encoded with the model's tokenizer, continuations decoded and cut at the
first stop string. The device loop stops early only at EOS (every row at EOS ends it); stop strings
are found in the decoded text afterwards."""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh

from pretrain.data.tokenizer import Tokenizer
from pretrain.generate import engine


def generate_text(model, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
                  seed: int = 0, add_bos: bool = True, mesh: Mesh | None = None) -> list[str]:
  """Each prompt's continuation, ending before the first of `stop` it holds (or at EOS, which is dropped)."""
  bos = [tokenizer.bos_id] if add_bos else []
  ids = [bos + tokenizer.encode(prompt).tolist() for prompt in prompts]
  new_ids = engine.generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, eos_id=tokenizer.eos_id, seed=seed, mesh=mesh)
  return [truncate(continuation(tokenizer, n), stop) for n in new_ids]


def continuation(tokenizer: Tokenizer, new_ids: list[int]) -> str:
  """The text `new_ids` add after the prompt, EOS dropped: their tokens' exact bytes, so a leading space
  or indentation is kept (decoding them alone, sentencepiece would drop a leading space)."""
  if new_ids and new_ids[-1] == tokenizer.eos_id:
    new_ids = new_ids[:-1]
  return tokenizer.bytes_of(new_ids).decode("utf-8", errors="replace")


def truncate(text: str, stop: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop string (all of it if none occurs)."""
  cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
  return text[:cut]
