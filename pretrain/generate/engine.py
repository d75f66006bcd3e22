"""Batched generation: one compiled prefill, then one compiled decode loop on the device.

The prompts are right-padded into one [B, S] batch; B, S and the cache length T are rounded up to
buckets, so calls of similar sizes reuse the compilations. Each row's prompt sits at positions
0..len-1, so the prefill is the training forward pass (causal attention hides a row's padding from
its real tokens). It fills a cache of T positions (kv_cache.py) and samples each row's first new
token from its last prompt token's logits. A `jax.lax.while_loop` then feeds each row's latest
token at the row's own position len + i - 1: its cache entries overwrite the padding's there, and
attention reads only indices below the position (plus the token itself), so padding is never seen.
The loop ends when every row has stopped: at EOS, after max_new_tokens, or where it would outgrow
the model's context (max_position_embeddings tokens, prompt included).

With a mesh, the parameters are placed as the trainer places them (train/sharding.py's axis
rules, the routed experts split as in training), the rows are split over the batch axes and
Qwen2's cached kv heads over the heads' axes where they divide. Rows are never split by sequence.

On XLA:CPU the decode loop runs a copy of the model whose layers are split out of their stacks
(CausalLM.with_layers_split, one more copy of the layers' parameters while generating), with a
cache of one buffer per layer: a scan over stacked layers makes XLA:CPU copy each layer's slice of
the weights and of the cache before using it, every step, which took about 40% of a 100M model's
decode step. Accelerators slice in place, so there the stacks are scanned as in training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pretrain import models
from pretrain.generate import kv_cache
from pretrain.generate.sampling import Sampling, sample
from pretrain.models.parallelism import ONE_DEVICE
from pretrain.schema import ConfigError
from pretrain.train import sharding
from pretrain.train.config import DEFAULT_AXIS_RULES

PAD = -1  # in the output buffer: no token (after a row stopped)


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: list[list[int]]  # per prompt, without the prompt; ends with eos_id where the row stopped at EOS
  decode_steps: int  # decode loop iterations run, each one token for every row (the first token is prefill's)
  prefill_seconds: float  # the prefill, compilation included on a first call
  decode_seconds: float  # the decode loop, compilation included on a first call
  batch: int  # rows computed (the prompts, padded to the batch bucket)
  prompt_length: int  # the prefill's padded prompt length S
  cache_length: int  # the cache's positions T


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None, seed: int = 0, mesh: Mesh | None = None,
             axis_rules=DEFAULT_AXIS_RULES, split_layers: bool | None = None) -> list[list[int]]:
  """Each prompt's generated token ids (without the prompt), up to and including eos_id if drawn.

  `temperature` 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) within the
  top_k (0: all) and the top_p nucleus, reproducibly for a seed. eos_id None: rows stop only at
  max_new_tokens. `mesh` (e.g. train/sharding.make_mesh) splits the work as `axis_rules` say.
  `split_layers`: decode with the layers split out of their stacks (see above); None: on CPU.
  """
  return generate_with_stats(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, eos_id=eos_id, seed=seed, mesh=mesh, axis_rules=axis_rules,
                             split_layers=split_layers).tokens


def generate_with_stats(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None, seed: int = 0,
                        mesh: Mesh | None = None, axis_rules=DEFAULT_AXIS_RULES,
                        split_layers: bool | None = None) -> Generation:
  """`generate`, with the decode steps run and the prefill's and the decode loop's wall times."""
  sampling = Sampling(float(temperature), float(top_p), int(top_k))
  sampling.validate()
  lengths = _check(prompts, model.config, max_new_tokens)
  rules = tuple((name, () if name == "sequence" else tuple(axes)) for name, axes in axis_rules)
  graphdef, state = _placed(model, mesh, rules)
  if split_layers is None:
    split_layers = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform == "cpu"
  decode_graphdef, decode_state = (nnx.split(nnx.merge(graphdef, state).with_layers_split()) if split_layers
                                   else (graphdef, state))
  ways = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
  count, longest, context = len(prompts), max(lengths), model.config.max_position_embeddings
  batch = -(-(1 << (count - 1).bit_length()) // ways) * ways  # a power of two, split evenly over the rows' axes
  # No row outgrows the context, so neither does the cache.
  prompt_length, cache_length = bucket(longest), bucket(min(longest + max_new_tokens, context))

  tokens_BxS = np.zeros((batch, prompt_length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BxS[row, :len(prompt)] = prompt
  lengths_B = np.ones(batch, np.int32)  # padding rows: one token, nothing to generate
  lengths_B[:count] = lengths
  budgets_B = np.zeros(batch, np.int32)  # tokens each row may generate
  budgets_B[:count] = np.minimum(max_new_tokens, context - np.asarray(lengths))

  def put(a):
    return jnp.asarray(a) if mesh is None else jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim))

  seed_, eos = jnp.uint32(seed & 0xFFFFFFFF), jnp.int32(PAD if eos_id is None else eos_id)
  started = time.perf_counter()
  first_B, cache = _prefill_and_sample(graphdef, state, put(tokens_BxS), put(lengths_B), seed_,
                                       cache_length=cache_length, sampling=sampling, mesh=mesh, rules=rules,
                                       split_layers=split_layers)
  jax.block_until_ready((first_B, cache))
  prefilled = time.perf_counter()
  out_BxN, steps, _ = _decode_loop(decode_graphdef, decode_state, cache, first_B, put(lengths_B), put(budgets_B),
                                   seed_, eos, out_length=bucket(min(max_new_tokens, context)), sampling=sampling,
                                   mesh=mesh, rules=rules)
  out_BxN, steps = _to_host(out_BxN), int(_to_host(steps))
  finished = time.perf_counter()
  return Generation([[int(t) for t in row if t != PAD] for row in out_BxN[:count]], steps, prefilled - started,
                    finished - prefilled, batch, prompt_length, cache_length)


def prefill(model, tokens_BxS, lengths_B, cache_length: int) -> tuple[jnp.ndarray, kv_cache.Cache]:
  """Right-padded prompts [B, S] (row b's first lengths_B[b] tokens real) -> (each row's logits for its
  next token [B, V] float32, a cache of `cache_length` positions holding the prompts)."""
  graphdef, state = nnx.split(model)
  return _jit_prefill(graphdef, state, jnp.asarray(tokens_BxS, jnp.int32), jnp.asarray(lengths_B, jnp.int32),
                      cache_length=cache_length)


def decode_step(model, cache: kv_cache.Cache, tokens_B, positions_B) -> tuple[jnp.ndarray, kv_cache.Cache]:
  """Each row's token [B] at its position [B] (the row's cache filled below it) -> (logits [B, V] float32
  for the token after it, the cache with it written). `cache` is consumed (updated in place)."""
  graphdef, state = nnx.split(model)
  return _jit_decode_step(graphdef, state, cache, jnp.asarray(tokens_B, jnp.int32), jnp.asarray(positions_B, jnp.int32))


def bucket(n: int, minimum: int = 16) -> int:
  """n rounded up to 1, 1.25, 1.5 or 1.75 times a power of two (at least `minimum`): at most 25% more,
  and few distinct sizes to compile for."""
  if n <= minimum:
    return minimum
  step = 1 << (n.bit_length() - 3)  # a quarter of the largest power of two <= n
  return -(-n // step) * step


def _check(prompts, config, max_new_tokens: int) -> list[int]:
  """The prompts' lengths; a ConfigError for what cannot be generated from."""
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ConfigError("--max-new-tokens", f"must be a positive integer, got {max_new_tokens!r}")
  if not len(prompts):
    raise ConfigError("--prompt", "no prompts given: generation needs at least one")
  context, lengths = config.max_position_embeddings, []
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if not ids.size:
      raise ConfigError("--prompt", f"prompt {i} is empty; give it at least one token, e.g. BOS")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ConfigError("--prompt", f"prompt {i} is not a flat list of integer token ids")
    outside = ids[(ids < 0) | (ids >= config.vocab_size)]
    if outside.size:
      raise ConfigError("--prompt", f"prompt {i} holds token id {outside[0]}, outside the model's vocabulary of "
                        f"{config.vocab_size} ids")
    if len(ids) > context:
      raise ConfigError("--prompt", f"prompt {i} is {len(ids)} tokens long, longer than the model's context of "
                        f"{context} tokens (max_position_embeddings)")
    lengths.append(len(ids))
  return lengths


@functools.lru_cache(maxsize=8)
def _graphdef(config, parallelism):
  return nnx.split(models.build_abstract(config, parallelism=parallelism))[0]


def _placed(model, mesh: Mesh | None, rules):
  """The model as (graphdef, state) laid out for generation: on a mesh with the trainer's parameter
  placement and its split of the routed experts, else as the model is."""
  state = nnx.state(model)
  if mesh is None:
    return _graphdef(model.config, ONE_DEVICE), state
  graphdef = _graphdef(model.config, sharding.parallelism(model.config, mesh, rules))
  return graphdef, jax.device_put(state, sharding.param_shardings(state, mesh, rules))


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every process: rows split over several processes' devices are gathered."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _keys(seed, batch: int, step) -> jax.Array:
  """Row b's key at decode step `step`: a function of the seed, b and the step only."""
  base = jax.random.key(seed)
  return jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(base, row), step))(jnp.arange(batch))


def _prefill(model, tokens_BxS, lengths_B, cache_length: int, mesh, rules, split_layers: bool = False):
  x_BxSxD, entries = model.prefill(tokens_BxS)
  last_Bx1xD = jnp.take_along_axis(x_BxSxD, (lengths_B - 1)[:, None, None], axis=1)  # each row's last real token
  cache = kv_cache.from_prefill(entries, cache_length)
  if split_layers:
    cache = kv_cache.split_layers(cache)
  cache = kv_cache.constrain(cache, model, mesh, rules, layers_split=split_layers)
  return model.logits(last_Bx1xD)[:, 0], cache


def _decode_step(model, cache, tokens_B, positions_B):
  """-> (logits [B, V] for the token after each row's, the rows' new cache entries, not yet written)."""
  x_Bx1xD, entries = model.decode(tokens_B[:, None], positions_B[:, None], cache)
  return model.logits(x_Bx1xD)[:, 0], entries


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def _jit_prefill(graphdef, state, tokens_BxS, lengths_B, *, cache_length):
  return _prefill(nnx.merge(graphdef, state), tokens_BxS, lengths_B, cache_length, None, ())


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _jit_decode_step(graphdef, state, cache, tokens_B, positions_B):
  logits_BxV, entries = _decode_step(nnx.merge(graphdef, state), cache, tokens_B, positions_B)
  return logits_BxV, kv_cache.write(cache, entries, positions_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "sampling", "mesh", "rules", "split_layers"))
def _prefill_and_sample(graphdef, state, tokens_BxS, lengths_B, seed, *, cache_length, sampling, mesh, rules,
                        split_layers):
  """-> (each row's first new token [B], the cache holding the prompts, one stack per layer if `split_layers`)."""
  logits_BxV, cache = _prefill(nnx.merge(graphdef, state), tokens_BxS, lengths_B, cache_length, mesh, rules,
                               split_layers)
  return sample(logits_BxV, _keys(seed, tokens_BxS.shape[0], 0), sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "out_length", "sampling", "mesh", "rules"),
                   donate_argnames=("cache",))
def _decode_loop(graphdef, state, cache, first_B, lengths_B, budgets_B, seed, eos_id, *, out_length, sampling, mesh,
                 rules):
  """-> (tokens [B, out_length], PAD after each row stopped; the decode steps run; the cache).

  The cache is returned only so that XLA can alias it to the donated input: the loop then updates
  the one preallocated buffer in place instead of a copy of it."""
  model = nnx.merge(graphdef, state)
  batch, cache_length = first_B.shape[0], kv_cache.length(cache)
  first_B = jnp.where(budgets_B > 0, first_B, PAD)
  out_BxN = jnp.full((batch, out_length), PAD, jnp.int32).at[:, 0].set(first_B)
  done_B = (budgets_B <= 1) | (first_B == eos_id)
  # A step's entries are written at the start of the next one, before the layers read the cache: so
  # the write comes first by data flow, and XLA updates the cache in place. Written at the end of a
  # step, nothing would order it after the reads (a layer's entries do not depend on them), and XLA
  # would copy the cache every step to keep the old one for them. The first step's "pending" entries
  # are zeros at the last index, which no token reads: a row at position p reads indices below p.
  pending = [tuple(jnp.zeros(a.shape[:-2] + (1, a.shape[-1]), a.dtype) for a in stack) for stack in cache]
  pending_positions_B = jnp.full((batch,), cache_length - 1, jnp.int32)

  def running(carry):
    step, *_, done_B = carry
    return (step < out_length) & ~done_B.all()

  def decode(carry):
    step, cache, pending, pending_positions_B, last_B, out_BxN, done_B = carry
    cache = kv_cache.constrain(kv_cache.write(cache, pending, pending_positions_B), model, mesh, rules)
    # Stopped rows still run (static shapes), fed a valid id at a position inside the cache; what they
    # draw is dropped. A running row's position is below len + budget <= the cache length.
    positions_B = jnp.minimum(lengths_B + step - 1, cache_length - 1)
    logits_BxV, entries = _decode_step(model, cache, jnp.maximum(last_B, 0), positions_B)
    next_B = jnp.where(done_B, PAD, sample(logits_BxV, _keys(seed, batch, step), sampling))
    out_BxN = out_BxN.at[:, step].set(next_B)
    done_B = done_B | (next_B == eos_id) | (step + 1 >= budgets_B)
    return step + 1, cache, entries, positions_B, next_B, out_BxN, done_B

  steps, cache, *_, out_BxN, _ = jax.lax.while_loop(
      running, decode, (jnp.int32(1), cache, pending, pending_positions_B, first_B, out_BxN, done_B))
  return out_BxN, steps - 1, cache
