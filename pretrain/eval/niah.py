"""`pretrain eval niah`: needle-in-a-haystack passkey retrieval over context lengths x needle depths.

A prompt of context length L is exactly L tokens:

  BOS  PREFIX  haystack[:cut]  NEEDLE  haystack[cut:]  QUESTION        then the answer: " 71432"

PREFIX "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
I will quiz you about the important information there.", NEEDLE "The pass key is 71432. Remember
it. 71432 is the pass key.", QUESTION "What is the pass key? The pass key is" (the passkey format of
Landmark Attention and LongBench). The haystack is text-domain documents of a mixture (by default
the built-in corpus's English prose; at most its first 32M characters), joined by blank lines and
cut to the tokens L leaves. The needle goes at depth d: after the last sentence end at or before
haystack token round(d * n), so depth 0 puts it first and depth 1 last.

Each trial draws a 5-digit passkey and a haystack starting document from (seed, L, trial), the
same for every depth, so a row of the grid differs only in where the needle is. A trial counts as
retrieved when greedy decoding would write the passkey: every answer token is the argmax given the
prompt and the answer tokens before it. That is one forward pass over the prompt plus the answer
(teacher forcing), and only the answer positions' logits are formed. The answer's log-likelihood
is reported too.

Outputs in --out: niah.json (lengths, depths, accuracy[depth][length], the mean answer
log-likelihood in the same layout, trials, checkpoint) and niah.png, a heatmap like Figure 2 of
the DeepSeek-Coder-V2 paper: context length on x, needle depth on y, colour = accuracy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pretrain.data import sources
from pretrain.data.mixture import Mixture
from pretrain.data.tokenizer import Tokenizer
from pretrain import storage
from pretrain.atomic_file import atomic_file
from pretrain.eval import flags, load
from pretrain.schema import ConfigError

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n\n")
NEEDLE = "\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {passkey}"
PASSKEY_DIGITS = 5
HAYSTACK_CHARS = 32_000_000  # the haystack pool: the first documents up to this many characters
SENTENCE_END_WINDOW = 64  # tokens searched back from the depth's position for a sentence end
BUILTIN_HAYSTACK = str(pathlib.Path(__file__).resolve().parents[2] / "data_mixtures" / "builtin.py")


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: np.ndarray  # int32 [L]: the context, ending with QUESTION
  answer_ids: np.ndarray  # int32 [A]: the passkey as greedy decoding should write it
  passkey: str
  needle_start: int  # index of the needle's first token in `ids`


def parse_lengths(text: str) -> tuple[int, ...]:
  """'1k,2k,4096' -> (1024, 2048, 4096): context lengths in tokens, sorted."""
  lengths = flags.parse_token_counts(text, "--lengths")
  if not lengths:
    raise ConfigError("--lengths", "give at least one context length, e.g. --lengths=1k,2k,4k")
  if len(set(lengths)) != len(lengths):
    raise ConfigError("--lengths", f"{text!r} names a length twice")
  return tuple(sorted(lengths))


def parse_depths(text: str) -> tuple[float, ...]:
  """'0,0.5,1' -> (0.0, 0.5, 1.0): fractions of the haystack before the needle, sorted."""
  depths = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    try:
      depth = float(item)
    except ValueError:
      depth = math.nan
    if not 0.0 <= depth <= 1.0:
      raise ConfigError("--depths", f"{item!r} is not a fraction within [0, 1] (e.g. 0,0.25,0.5,0.75,1)")
    depths.append(depth)
  if not depths:
    raise ConfigError("--depths", "give at least one depth, e.g. --depths=0,0.5,1")
  if len(set(depths)) != len(depths):
    raise ConfigError("--depths", f"{text!r} names a depth twice")
  return tuple(sorted(depths))


class Haystack:
  """A cyclic token stream of documents; `tokens(start, n)` reads n tokens from document `start` on."""

  def __init__(self, texts: Sequence[str], tokenizer: Tokenizer):
    self._texts = [t.strip() + "\n\n" for t in texts if t.strip()]
    if not self._texts:
      raise ConfigError("--haystack", "its text-domain components hold no text")
    self._tokenizer = tokenizer
    self._ids: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._texts)

  @classmethod
  def from_mixture(cls, mixture: Mixture, tokenizer: Tokenizer) -> Haystack:
    """The documents of the mixture's text-domain components, in the order `prepare` reads them, up to
    HAYSTACK_CHARS characters."""
    indices = [i for i, c in enumerate(mixture.components) if c.domain == "text"]
    if not indices:
      raise ConfigError("--haystack", f"mixture {mixture.name!r} has no text-domain component; components: "
                        f"{', '.join(mixture.names)}")
    texts, chars = [], 0
    for index in indices:
      units, _ = sources.plan_units(mixture, index)
      for unit in units:
        for document in sources.read_unit(unit, collections.Counter(), skip_corrupt=True):
          texts.append(document.text)
          chars += len(document.text)
          if chars >= HAYSTACK_CHARS:  # ample for 128K-token prompts; a huge mixture is not read whole
            return cls(texts, tokenizer)
    return cls(texts, tokenizer)

  def tokens(self, start: int, count: int) -> np.ndarray:
    parts, total, index = [], 0, start
    while total < count:
      ids = self._document_ids(index % len(self._texts))
      parts.append(ids)
      total += len(ids)
      index += 1
    return np.concatenate(parts)[:count].astype(np.int32) if parts else np.zeros((0,), np.int32)

  def _document_ids(self, index: int) -> np.ndarray:
    if index not in self._ids:
      self._ids[index] = self._tokenizer.encode(self._texts[index])
    return self._ids[index]


def build_prompt(tokenizer: Tokenizer, haystack: Haystack, *, length: int, depth: float, passkey: str,
                 start: int) -> Prompt:
  """The `length`-token prompt with the needle at `depth`; ConfigError if `length` leaves no room."""
  prefix, needle = tokenizer.encode(PREFIX), tokenizer.encode(NEEDLE.format(passkey=passkey))
  question = tokenizer.encode(QUESTION)
  fixed = 1 + len(prefix) + len(needle) + len(question)
  if length < fixed:
    raise ConfigError("--lengths", f"{length} tokens is shorter than the prompt without any haystack "
                      f"({fixed} tokens with this tokenizer)")
  hay = haystack.tokens(start, length - fixed)
  cut = _sentence_end_at_or_before(hay, round(depth * len(hay)), tokenizer.token_bytes)
  ids = np.concatenate([[tokenizer.bos_id], prefix, hay[:cut], needle, hay[cut:], question]).astype(np.int32)
  return Prompt(ids, answer_tokens(tokenizer, passkey), passkey, needle_start=1 + len(prefix) + cut)


def answer_tokens(tokenizer: Tokenizer, passkey: str) -> np.ndarray:
  """The answer's tokens as they follow the question: the tail of encode(question + answer) when that
  extends encode(question) (no token merges across the seam), else the answer encoded alone."""
  question = tokenizer.encode(QUESTION)
  joint = tokenizer.encode(QUESTION + ANSWER.format(passkey=passkey))
  if len(joint) > len(question) and np.array_equal(joint[:len(question)], question):
    return joint[len(question):].astype(np.int32)
  return tokenizer.encode(ANSWER.format(passkey=passkey)).astype(np.int32)


def _sentence_end_at_or_before(hay: np.ndarray, cut: int, token_bytes: list[bytes]) -> int:
  """`cut` moved back to just after a sentence end ('.' or a newline), so the needle goes between
  sentences; unchanged at either end of the haystack or when none is near."""
  if cut <= 0 or cut >= len(hay):
    return cut
  for i in range(cut, max(cut - SENTENCE_END_WINDOW, 0), -1):
    if token_bytes[hay[i - 1]].rstrip(b" ").endswith((b".", b"\n")):
      return i
  return cut


def trial_prompts(tokenizer: Tokenizer, haystack: Haystack, *, length: int, depths: Sequence[float], trials: int,
                  seed: int) -> list[list[Prompt]]:
  """[depth][trial] prompts; a trial's passkey and haystack are the same at every depth."""
  out = [[] for _ in depths]
  for trial in range(trials):
    rng = np.random.default_rng([seed, length, trial])
    passkey = str(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS))
    start = int(rng.integers(len(haystack)))
    for row, depth in zip(out, depths):
      row.append(build_prompt(tokenizer, haystack, length=length, depth=depth, passkey=passkey, start=start))
  return out


def answer_scores(model, ids_BxS, answer_pos_BxA, answer_ids_BxA, answer_mask_BxA):
  """(retrieved [B] bool: every answer token is the argmax; answer log-likelihood [B] float32).

  Only the A answer positions' logits are formed, so memory does not grow with S x vocab.
  """
  h_BxSxD, _ = model.features(ids_BxS)
  h_BxAxD = jnp.take_along_axis(h_BxSxD, answer_pos_BxA[..., None], axis=1)
  logits_BxAxV = model.logits(h_BxAxD)
  logprobs_BxAxV = jax.nn.log_softmax(logits_BxAxV, axis=-1)
  answer_logprob_BxA = jnp.take_along_axis(logprobs_BxAxV, answer_ids_BxA[..., None], axis=-1)[..., 0]
  hit_BxA = jnp.argmax(logits_BxAxV, axis=-1) == answer_ids_BxA
  masked_BxA = answer_mask_BxA > 0
  return jnp.all(hit_BxA | ~masked_BxA, axis=-1), jnp.sum(jnp.where(masked_BxA, answer_logprob_BxA, 0.0), axis=-1)


def score(apply: Callable, prompts: Sequence[Prompt], *, pad_id: int,
          batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(retrieved [N] bool, answer log-likelihood [N]) of equal-length prompts, a few rows per forward pass.

  `apply` is `answer_scores` under jit (`load.jit_apply`). Every batch has the same shape (the last
  one is filled with copies of the first prompt), so each context length compiles once.
  """
  answer_len = max(len(p.answer_ids) for p in prompts)
  seq = max(len(p.ids) for p in prompts) + answer_len - 1  # the last answer token is a target only
  rows = max(1, min(len(prompts), batch_tokens // seq))
  retrieved, logprob = [], []
  for begin in range(0, len(prompts), rows):
    batch = list(prompts[begin:begin + rows])
    used = len(batch)
    batch += [prompts[0]] * (rows - used)
    ids_BxS = np.full((rows, seq), pad_id, np.int32)
    answer_pos_BxA = np.zeros((rows, answer_len), np.int32)
    answer_ids_BxA = np.zeros((rows, answer_len), np.int32)
    answer_mask_BxA = np.zeros((rows, answer_len), np.float32)
    for b, p in enumerate(batch):
      tokens = np.concatenate([p.ids, p.answer_ids[:-1]])
      ids_BxS[b, :len(tokens)] = tokens
      a = len(p.answer_ids)
      answer_pos_BxA[b, :a] = len(p.ids) - 1 + np.arange(a)  # the position whose next token is answer[j]
      answer_ids_BxA[b, :a], answer_mask_BxA[b, :a] = p.answer_ids, 1.0
    hit_B, logprob_B = jax.device_get(apply(ids_BxS, answer_pos_BxA, answer_ids_BxA, answer_mask_BxA))
    retrieved.append(np.asarray(hit_B)[:used])
    logprob.append(np.asarray(logprob_B)[:used])
  return np.concatenate(retrieved), np.concatenate(logprob)


def build_grid(tokenizer: Tokenizer, haystack: Haystack, *, lengths: Sequence[int], depths: Sequence[float],
               trials: int, seed: int) -> dict[int, list[list[Prompt]]]:
  """length -> [depth][trial] prompts."""
  return {length: trial_prompts(tokenizer, haystack, length=length, depths=depths, trials=trials, seed=seed)
          for length in lengths}


def score_grid(apply: Callable, grid: dict[int, list[list[Prompt]]], *, pad_id: int, batch_tokens: int,
               log=print) -> tuple[np.ndarray, np.ndarray]:
  """(accuracy [depths, lengths], mean answer log-likelihood [depths, lengths]) of `build_grid`'s prompts."""
  lengths = list(grid)
  depths, trials = len(grid[lengths[0]]), len(grid[lengths[0]][0])
  accuracy_DxL, logprob_DxL = np.zeros((depths, len(lengths))), np.zeros((depths, len(lengths)))
  for col, length in enumerate(lengths):
    prompts = [p for row in grid[length] for p in row]
    retrieved, logprob = score(apply, prompts, pad_id=pad_id, batch_tokens=batch_tokens)
    accuracy_DxL[:, col] = retrieved.reshape(depths, trials).mean(axis=1)
    logprob_DxL[:, col] = logprob.reshape(depths, trials).mean(axis=1)
    log(f"length {flags.token_label(length):>6}: accuracy {accuracy_DxL[:, col].mean():.2f} "
        f"(by depth {' '.join(f'{a:.2f}' for a in accuracy_DxL[:, col])})")
  return accuracy_DxL, logprob_DxL


def run(source: load.Source, *, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
        haystack: str | None = None, batch_tokens: int = 16384, log=print) -> dict:
  """The grid's results as niah.json holds them. Every prompt is built (and every length checked)
  before the parameters are read."""
  if trials < 1:
    raise ConfigError("--trials", f"must be >= 1, got {trials}")
  if batch_tokens < 1:
    raise ConfigError("--batch-tokens", f"must be >= 1, got {batch_tokens}")
  haystack = haystack or BUILTIN_HAYSTACK
  mixture = load.load_mixture(haystack, "--haystack")
  tokenizer = load.load_tokenizer_of(source)
  grid = build_grid(tokenizer, Haystack.from_mixture(mixture, tokenizer), lengths=lengths, depths=depths,
                    trials=trials, seed=seed)
  return {
      "eval": "niah", **source.describe(), "lengths": list(lengths), "depths": list(depths), "trials": trials,
      "seed": seed, **evaluate(load.load_model(source), tokenizer, grid, batch_tokens=batch_tokens, log=log),
      "layout": "accuracy[depth index][length index]", "haystack": haystack,
      "scoring": "greedy decoding of the passkey's tokens (teacher-forced argmax), exact match",
      "max_position_embeddings": source.model_config.max_position_embeddings,
  }


def evaluate(model, tokenizer: Tokenizer, grid, *, batch_tokens: int, log=print) -> dict:
  """Accuracy and answer log-probability of each cell of `grid` (build_grid) under `model`."""
  accuracy_DxL, logprob_DxL = score_grid(load.jit_apply(model, answer_scores), grid, pad_id=tokenizer.pad_id,
                                         batch_tokens=batch_tokens, log=log)
  return {"accuracy": accuracy_DxL.tolist(), "answer_logprob": logprob_DxL.tolist()}


def write(result: dict, out_dir) -> tuple[epath.Path, epath.Path]:
  """niah.json and niah.png in `out_dir`, both or neither."""
  out_dir = storage.as_path(out_dir)
  json_path, png_path = out_dir / "niah.json", out_dir / "niah.png"
  with atomic_file(json_path) as json_tmp, atomic_file(png_path) as png_tmp:
    plot(result, png_tmp)
    json_tmp.write_text(json.dumps(result, indent=2) + "\n")
  return json_path, png_path


def plot(result: dict, path) -> None:
  """The heatmap: lengths on x, depth (percent) on y, red (0) to green (1) by accuracy."""
  import matplotlib

  matplotlib.use("Agg")  # files only, no display
  from matplotlib import pyplot as plt
  from matplotlib.colors import LinearSegmentedColormap

  accuracy_DxL = np.asarray(result["accuracy"])
  cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])  # red to green, as the paper
  width = max(6.0, 0.6 * len(result["lengths"]) + 3)
  fig, ax = plt.subplots(figsize=(width, max(4.0, 0.4 * len(result["depths"]) + 2)))
  image = ax.imshow(accuracy_DxL, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
  ax.set_xticks(range(len(result["lengths"])), [flags.token_label(n) for n in result["lengths"]], rotation=45)
  ax.set_yticks(range(len(result["depths"])), [f"{100 * d:g}" for d in result["depths"]])
  ax.set_xticks(np.arange(accuracy_DxL.shape[1] + 1) - 0.5, minor=True)  # white lines between the cells
  ax.set_yticks(np.arange(accuracy_DxL.shape[0] + 1) - 0.5, minor=True)
  ax.grid(which="minor", color="white", linewidth=1)
  ax.tick_params(which="minor", length=0)
  ax.set_xlabel("Context Length (#Tokens)")
  ax.set_ylabel("Depth Percent (%)")
  ax.set_title(f"Needle In A Haystack: {pathlib.Path(result['path']).name} ({result['trials']} trials per cell)")
  fig.colorbar(image, ax=ax, label="Accuracy")
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)
  plt.close(fig)

