"""Expert parallelism: on 8 simulated devices, with the experts split over the mesh, the MoE
layer's output and every gradient equal the unsplit layer's."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from pretrain.models import moe, presets
from pretrain.train import sharding
from pretrain.train.config import DEFAULT_AXIS_RULES, MeshConfig

mesh_sizes, batch_axes, implementation = eval(sys.argv[1]), eval(sys.argv[2]), sys.argv[3]
rules = tuple((name, batch_axes if name == "batch" else axes) for name, axes in DEFAULT_AXIS_RULES)
config = presets.get("tiny-deepseek-v2", moe_implementation=implementation, n_routed_experts=16,
                     num_experts_per_tok=4, topk_method="greedy")
layer = moe.DeepseekMoE(config, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (8, 12, config.hidden_size))

def loss(layer, x):
  y, _ = layer(x)
  return (y * jnp.cos(jnp.arange(y.size).reshape(y.shape))).sum()  # every output element weighs differently

want_loss, want_grads = nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)
mesh = sharding.make_mesh(MeshConfig(**mesh_sizes))
parallel = sharding.parallelism(config, mesh, rules).experts
assert parallel is not None and parallel.expert_axes == ("expert",), parallel
split_layer = moe.DeepseekMoE(config, rngs=nnx.Rngs(0), parallel=parallel)  # the same initial parameters
assert split_layer.experts.parallel is parallel
graphdef, state = nnx.split(split_layer)
state = jax.device_put(state, sharding.param_shardings(state, mesh, rules))
x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding.batch_axes(mesh, rules))))
got_loss, got_grads = jax.jit(jax.value_and_grad(lambda s, x: loss(nnx.merge(graphdef, s), x), argnums=(0, 1)))(
    state, x_sharded)
np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=1e-4, atol=1e-6)
want = dict(jax.tree_util.tree_leaves_with_path(nnx.state(want_grads[0])))
for path, got in jax.tree_util.tree_leaves_with_path(got_grads[0]):
  np.testing.assert_allclose(got, want[path], rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
print("ok", parallel.token_axes, parallel.expert_axes, parallel.mlp_axes)
"""


@pytest.mark.parametrize("mesh, batch_axes, implementation", [
    # tokens gathered within each expert group, experts' hidden dim split over `tensor`
    ({"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}, ("data", "fsdp", "expert"), "blocked"),
    pytest.param({"data": 1, "fsdp": 2, "tensor": 1, "expert": 4}, ("data", "fsdp", "expert"), "blocked",
                 marks=pytest.mark.slow),
    pytest.param({"data": 1, "fsdp": 1, "tensor": 1, "expert": 8}, ("data", "fsdp", "expert"), "ragged_dot",
                 marks=pytest.mark.slow),
    # tokens not split over `expert`: each device adds its experts' share
    pytest.param({"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}, ("data",), "blocked", marks=pytest.mark.slow),
])
def test_expert_parallel_layer_equals_the_unsplit_layer(mesh, batch_axes, implementation):
  result = subprocess.run([sys.executable, "-c", SCRIPT, repr(mesh), repr(batch_axes), implementation],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("ok")
