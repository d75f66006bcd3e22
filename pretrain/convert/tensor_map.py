"""One Hugging Face tensor <-> one of our parameters (or one expert's slice of a stacked one).

HF stores `nn.Linear` weights as [out, in]; ours are [in, out] with heads split out
(q_proj [D, N, H], o_proj [N, H, D]), so a linear weight is transposed and reshaped.
Everything else (embeddings, norm scales, biases [N*H] -> [N, H]) is only reshaped.
Both directions use transposes and reshapes only, so HF -> ours -> HF is bit-identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Path = tuple[str | int, ...]  # our parameter, as in nnx.to_pure_dict: ("layers", 0, "self_attn", "q_proj")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  hf_name: str
  path: Path
  hf_shape: tuple[int, ...]
  linear: bool  # HF [out, in] vs ours [in..., out...]
  expert: int | None = None  # the slot this tensor fills in a stacked [E, ...] parameter

  def to_ours(self, hf_array: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    """`our_shape` is the parameter's shape, or one expert's slice of it."""
    return (hf_array.T if self.linear else hf_array).reshape(our_shape)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    if self.linear:
      out_dim, in_dim = self.hf_shape
      return np.ascontiguousarray(ours.reshape(in_dim, out_dim).T)
    return np.ascontiguousarray(ours.reshape(self.hf_shape))


def linear(hf_name: str, path: Path, out_dim: int, in_dim: int, expert: int | None = None) -> TensorMap:
  return TensorMap(hf_name, path, (out_dim, in_dim), linear=True, expert=expert)


def same(hf_name: str, path: Path, shape: tuple[int, ...]) -> TensorMap:
  return TensorMap(hf_name, path, shape, linear=False)


def rms_norm(hf_prefix: str, path: Path, dim: int) -> TensorMap:
  return same(f"{hf_prefix}.weight", path + ("scale",), (dim,))


def swiglu(hf_prefix: str, path: Path, dim: int, hidden: int) -> list[TensorMap]:
  """layers.SwiGLU: the dense MLP of both families and DeepSeek's shared experts."""
  return [linear(f"{hf_prefix}.gate_proj.weight", path + ("gate_proj",), hidden, dim),
          linear(f"{hf_prefix}.up_proj.weight", path + ("up_proj",), hidden, dim),
          linear(f"{hf_prefix}.down_proj.weight", path + ("down_proj",), dim, hidden)]


def embed(config) -> list[TensorMap]:
  return [same("model.embed_tokens.weight", ("embed_tokens", "table"), (config.vocab_size, config.hidden_size))]


def head(config) -> list[TensorMap]:
  """The final norm, and the output projection unless it is tied to the embedding."""
  maps = [rms_norm("model.norm", ("norm",), config.hidden_size)]
  if not config.tie_word_embeddings:
    maps.append(linear("lm_head.weight", ("lm_head",), config.vocab_size, config.hidden_size))
  return maps
