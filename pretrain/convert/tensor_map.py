"""One Hugging Face tensor <-> one of our parameters, or one slot of a stacked one.

HF stores `nn.Linear` weights as [out, in]; ours are [in, out] with heads split out
(q_proj [D, N, H], o_proj [N, H, D]), so a linear weight is transposed and reshaped.
Everything else (embeddings, norm scales, biases [N*H] -> [N, H]) is only reshaped.
Both directions use transposes and reshapes only, so HF -> ours -> HF is bit-identical.

A stacked parameter holds several HF tensors along its leading axes: scanned blocks
([layers, ...]) and routed experts ([experts, ...], or [layers, experts, ...] in a
scanned MoE stack). `index` is the slot a tensor fills, one entry per leading axis.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Path = tuple[str | int, ...]  # our parameter, as in nnx.to_pure_dict: ("layers", 0, "block", "self_attn", "q_proj")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  hf_name: str
  path: Path
  hf_shape: tuple[int, ...]
  linear: bool  # HF [out, in] vs ours [in..., out...]
  index: tuple[int, ...] = ()  # the slot this tensor fills along the parameter's leading (stacked) axes

  def to_ours(self, hf_array: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    """`our_shape` is the shape of one slot: the parameter's shape less its `len(index)` leading axes."""
    return (hf_array.T if self.linear else hf_array).reshape(our_shape)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    if self.linear:
      out_dim, in_dim = self.hf_shape
      hf = np.empty(self.hf_shape, ours.dtype)
      transpose_into(hf, ours.reshape(in_dim, out_dim))
      return hf
    return np.ascontiguousarray(ours.reshape(self.hf_shape))


def transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 64) -> None:
  """dst[...] = src.T for 2-D arrays, in square tiles: a plain transpose of a large matrix misses the
  cache on every element (3-4x slower on CPU)."""
  rows, cols = src.shape
  if rows * cols <= tile * tile * 4:
    dst[...] = src.T
    return
  for r in range(0, rows, tile):
    for c in range(0, cols, tile):
      dst[c:c + tile, r:r + tile] = src[r:r + tile, c:c + tile].T


def linear(hf_name: str, path: Path, out_dim: int, in_dim: int, index: tuple[int, ...] = ()) -> TensorMap:
  return TensorMap(hf_name, path, (out_dim, in_dim), linear=True, index=index)


def same(hf_name: str, path: Path, shape: tuple[int, ...], index: tuple[int, ...] = ()) -> TensorMap:
  return TensorMap(hf_name, path, shape, linear=False, index=index)


def rms_norm(hf_prefix: str, path: Path, dim: int, index: tuple[int, ...] = ()) -> TensorMap:
  return same(f"{hf_prefix}.weight", path + ("scale",), (dim,), index)


def swiglu(hf_prefix: str, path: Path, dim: int, hidden: int, index: tuple[int, ...] = ()) -> list[TensorMap]:
  """layers.SwiGLU: the dense MLP of both families and DeepSeek's shared experts."""
  return [linear(f"{hf_prefix}.gate_proj.weight", path + ("gate_proj",), hidden, dim, index),
          linear(f"{hf_prefix}.up_proj.weight", path + ("up_proj",), hidden, dim, index),
          linear(f"{hf_prefix}.down_proj.weight", path + ("down_proj",), dim, hidden, index)]


def embed(config) -> list[TensorMap]:
  return [same("model.embed_tokens.weight", ("embed_tokens", "table"), (config.vocab_size, config.hidden_size))]


def head(config) -> list[TensorMap]:
  """The final norm, and the output projection unless it is tied to the embedding."""
  maps = [rms_norm("model.norm", ("norm",), config.hidden_size)]
  if not config.tie_word_embeddings:
    maps.append(linear("lm_head.weight", ("lm_head",), config.vocab_size, config.hidden_size))
  return maps
