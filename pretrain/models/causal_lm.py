"""What both families share at the top: embed, the blocks, norm, unembed.

The blocks live in `layers`, a list of block_stack.BlockStack: runs of consecutive
layers of one structure, each stored stacked and run as one scan.

`features` returns the final hidden states and the auxiliary outputs (MoE balance
loss, expert load); `logits` projects hidden states to the vocabulary in float32.
The trainer takes `features` and `output_weights` separately so it can compute the
loss in chunks (train/fused_cross_entropy.py) without materialising [batch, seq, vocab]
logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.models import block_stack, layers
from pretrain.models.parallelism import Parallelism

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# With no rematerialisation a scanned block still goes through jax.checkpoint: a scan saves every
# value its backward pass reads in a per-layer stacked copy, including those straight-line XLA never
# stores (a reshape or transpose is a view of its operand; an elementwise product is fused into the
# ops that read it). So layout changes and products are not saved: the backward pass redoes them
# from their saved operands, as unscanned XLA would (the step needs no more memory than unscanned).
_RECOMPUTED_OPS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "expand_dims",
                             "transpose", "copy", "mul"})


def _all_but_views_and_products(prim, *_, **__) -> bool:
  return prim.name not in _RECOMPUTED_OPS


# Rematerialisation of each block in the backward pass: what the forward pass keeps.
REMAT_POLICIES = {
    "none": _all_but_views_and_products,  # every other activation
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input; all else recomputed
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # also weight matmul outputs
}


class CausalLM(nnx.Module):
  config: Any
  embed_tokens: layers.Embedding
  layers: nnx.List
  norm: layers.RMSNorm
  lm_head: nnx.Param | None

  def init_trunk(self, config, block_cls, parallelism: Parallelism, *, rngs: nnx.Rngs):
    self.config = config
    self.remat = parallelism.remat  # a key of REMAT_POLICIES
    self.activation_sharding = parallelism.activation_sharding  # [B, S, D] hidden states between blocks
    self.dtype = DTYPES[config.dtype]
    std = config.initializer_range
    self.embed_tokens = layers.Embedding(config.vocab_size, config.hidden_size, std, rngs=rngs)
    self.layers = nnx.List([block_stack.BlockStack(config, block_cls, first, count, parallelism, rngs=rngs)
                            for first, count in block_stack.runs(config)])
    self.norm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
    self.lm_head = (None if config.tie_word_embeddings else
                    layers.param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), std))

  def features(self, input_ids_BxS: jnp.ndarray, positions_BxS: jnp.ndarray | None = None,
               segment_ids_BxS: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Final hidden states [B, S, D] and aux outputs (balance loss summed over MoE layers, their expert load)."""
    if positions_BxS is None:
      positions_BxS = jnp.broadcast_to(jnp.arange(input_ids_BxS.shape[1]), input_ids_BxS.shape)
    x_BxSxD = self._pin(self.embed_tokens(input_ids_BxS, self.dtype))
    balance_losses, expert_loads = [], []
    policy = REMAT_POLICIES[self.remat]
    for stack in self.layers:
      x_BxSxD, aux = stack(x_BxSxD, positions_BxS, segment_ids_BxS, policy=policy, pin=self._pin)
      if aux is not None:  # an MoE stack: [count] balance losses, [count, n_routed_experts] loads
        balance_losses.append(aux["balance_loss"].sum())
        expert_loads.append(aux["expert_load"])
    out = {"balance_loss": sum(balance_losses, jnp.zeros((), jnp.float32))}
    if expert_loads:
      out["expert_load"] = jnp.concatenate(expert_loads)  # [moe_layers, n_routed_experts], in layer order
    return self.norm(x_BxSxD), out

  def prefill(self, input_ids_BxS: jnp.ndarray) -> tuple[jnp.ndarray, list[tuple[jnp.ndarray, ...]]]:
    """Generation's forward pass over prompts at positions 0..S-1 -> (final hidden states [B, S, D],
    per stack its layers' decode cache entries of these tokens, [count, B, S, ...] arrays)."""
    positions_BxS = jnp.broadcast_to(jnp.arange(input_ids_BxS.shape[1]), input_ids_BxS.shape)
    x_BxSxD = self._pin(self.embed_tokens(input_ids_BxS, self.dtype))
    entries = []
    for stack in self.layers:
      x_BxSxD, stack_entries = stack.prefill(x_BxSxD, positions_BxS, pin=self._pin)
      entries.append(stack_entries)
    return self.norm(x_BxSxD), entries

  def decode(self, input_ids_Bx1: jnp.ndarray, positions_Bx1: jnp.ndarray,
             cache: list[tuple[jnp.ndarray, ...]]) -> tuple[jnp.ndarray, list[tuple[jnp.ndarray, ...]]]:
    """One token per row at its position, against the cache (per stack [count, B, T, ...] arrays, a
    row's token at position p at index p) -> (final hidden states [B, 1, D], the tokens' cache entries)."""
    x_Bx1xD = self._pin(self.embed_tokens(input_ids_Bx1, self.dtype))
    entries = []
    for stack, stack_cache in zip(self.layers, cache, strict=True):
      x_Bx1xD, stack_entries = stack.decode(x_Bx1xD, positions_Bx1, stack_cache, pin=self._pin)
      entries.append(stack_entries)
    return self.norm(x_Bx1xD), entries

  def with_layers_split(self) -> CausalLM:
    """This model with every layer a stack of its own (BlockStack.split: its parameters copied out),
    sharing every other parameter: the decode layout on XLA:CPU (generate/engine.py)."""
    model = nnx.merge(*nnx.split(self))  # new Variables over the same arrays
    model.layers = nnx.List([one for stack in model.layers for one in stack.split()])
    return model

  def _pin(self, x_BxSxD: jnp.ndarray) -> jnp.ndarray:
    if self.activation_sharding is None:
      return x_BxSxD
    return jax.lax.with_sharding_constraint(x_BxSxD, self.activation_sharding)

  def logits(self, x_BxSxD: jnp.ndarray) -> jnp.ndarray:
    """[B, S, V] float32 logits."""
    if self.lm_head is None:
      return layers.einsum("BSD,VD->BSV", x_BxSxD, self.embed_tokens.table, self.dtype, out_dtype=jnp.float32)
    return layers.einsum("BSD,DV->BSV", x_BxSxD, self.lm_head, self.dtype, out_dtype=jnp.float32)

  def output_weights(self) -> jnp.ndarray:
    """The unembedding as [D, V] in the compute dtype: lm_head, or the embedding table's transpose when tied."""
    w_DxV = self.embed_tokens.table[...].T if self.lm_head is None else self.lm_head[...]
    return w_DxV.astype(self.dtype)

  def __call__(self, input_ids_BxS: jnp.ndarray, positions_BxS: jnp.ndarray | None = None,
               segment_ids_BxS: jnp.ndarray | None = None, *, return_aux: bool = False):
    x_BxSxD, aux = self.features(input_ids_BxS, positions_BxS, segment_ids_BxS)
    logits_BxSxV = self.logits(x_BxSxD)
    return (logits_BxSxV, aux) if return_aux else logits_BxSxV
