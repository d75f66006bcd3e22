"""Time of one DeepSeekMoE layer, forward + backward: each dropless implementation vs all-experts dense.

The dense product (every expert on every token, masked by the routing) is the
definition the dropless path must equal and the cost it must avoid: it does
E / K times the expert FLOPs.

  .venv/bin/python bench/moe_layer.py                       # Lite-like routing, CPU-sized widths
  .venv/bin/python bench/moe_layer.py --hidden 2048 --moe-intermediate 1408 --tokens 8192   # Lite widths
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from pretrain import host_allocator
from pretrain.models import moe, presets


def timed(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--moe-intermediate", type=int, default=352)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--top-k", type=int, default=6)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--impls", nargs="+", default=["blocked", "ragged_dot"],
                      help="grouped_experts implementations to time (and always the dense reference)")
  args = parser.parse_args()

  config = presets.get("deepseek-coder-v2-lite", hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
                       n_routed_experts=args.experts, num_experts_per_tok=args.top_k)
  layer = moe.DeepseekMoE(config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.hidden))
  graphdef, params = nnx.split(layer)

  def loss(params, x, forward):
    return (forward(nnx.merge(graphdef, params), x) ** 2).mean()

  expert_flops = 2 * 3 * args.tokens * args.top_k * args.hidden * args.moe_intermediate * 3  # fwd + bwd
  print(f"device {jax.devices()[0].device_kind}; tokens {args.tokens}, hidden {args.hidden}, "
        f"{args.experts} experts top-{args.top_k}, expert width {args.moe_intermediate}; forward + backward")
  candidates = {name: lambda m, x, name=name: _with_impl(m, name)(x)[0] for name in args.impls}
  candidates["dense all-experts"] = moe.all_experts_reference
  for name, forward in candidates.items():
    step = jax.jit(jax.value_and_grad(lambda p, x, forward=forward: loss(p, x, forward)))
    seconds = timed(step, params, x, repeats=args.repeats)
    print(f"{name:<20}{seconds * 1e3:10.1f} ms/step  {expert_flops / seconds / 1e9:8.1f} GFLOP/s of routed-expert "
          "work")


def _with_impl(layer: moe.DeepseekMoE, implementation: str) -> moe.DeepseekMoE:
  layer.experts.implementation = implementation
  return layer


if __name__ == "__main__":
  host_allocator.reexec_tuned()  # as `pretrain train` runs
  main()
