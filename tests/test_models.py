"""Model behaviour that parity with transformers does not cover: causality, packing,
the dropless MoE against a dense reference, routing rules, axis names, jit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain import models
from pretrain.models import block_stack, grouped_experts, moe, presets

FAMILIES = ["tiny-deepseek-v2", "tiny-qwen2"]


def _ids(batch=2, seq=12, vocab=1024, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_logits_shape_dtype_and_aux(preset):
  model = models.build(presets.get(preset))
  ids = _ids()
  logits = model(ids)
  assert logits.shape == (2, 12, 1024) and logits.dtype == jnp.float32
  logits2, aux = model(ids, return_aux=True)
  np.testing.assert_array_equal(logits, logits2)
  assert aux["balance_loss"].shape == ()
  if preset == "tiny-deepseek-v2":
    config = model.config
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    assert aux["expert_load"].shape == (moe_layers, config.n_routed_experts)
    np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert float(aux["balance_loss"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_causal_through_gradients(preset):
  """d logits[t] / d embedding[s] is zero for every s > t."""
  model = models.build(presets.get(preset))
  ids = _ids(batch=1, seq=8)
  t = 4

  def logit_at_t(x_BxSxD):
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    m.embed_tokens = _FixedEmbedding(x_BxSxD, model.embed_tokens.table)
    return m(ids)[0, t].sum()

  x = model.embed_tokens(ids, jnp.float32)
  grad = jax.grad(logit_at_t)(x)
  assert np.abs(grad[0, t + 1:]).max() == 0.0
  assert np.abs(grad[0, :t + 1]).max() > 0.0


class _FixedEmbedding(nnx.Module):
  """Feeds given embeddings (the variable we differentiate), keeps the table for tied heads."""

  def __init__(self, x, table):
    self.x = nnx.Variable(x)
    self.table = table

  def __call__(self, ids, dtype):
    return self.x[...].astype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_documents_do_not_attend_across(preset):
  """Two documents packed in one row give the logits each gives alone (positions restart)."""
  model = models.build(presets.get(preset))
  a, b = _ids(batch=1, seq=5, seed=1), _ids(batch=1, seq=7, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  logits = model(packed, positions, segments)
  np.testing.assert_allclose(logits[:, :5], model(a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], model(b), atol=1e-5)


@pytest.mark.parametrize("preset", FAMILIES)
def test_jit_matches_eager(preset):
  model = models.build(presets.get(preset))
  ids = _ids()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, ids), model(ids), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = presets.get("tiny-deepseek-v2", dtype="bfloat16")
  model = models.build(config)
  logits = model(_ids())
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  reference = models.build(dataclasses.replace(config, dtype="float32"))(_ids())
  np.testing.assert_allclose(logits, reference, atol=0.1)


@pytest.mark.parametrize("preset", FAMILIES)
def test_every_parameter_has_logical_axis_names(preset):
  model = models.build(presets.get(preset))
  known = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "q_lora", "kv_lora", "norm",
           "layers"}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata()["out_sharding"]
      assert len(axes) == var[...].ndim, path
      assert set(axes) <= known, (path, axes)


@pytest.mark.parametrize("implementation", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("overrides", [
    {},
    {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
    {"norm_topk_prob": True, "num_experts_per_tok": 3},
])
def test_dropless_moe_equals_dense_reference(overrides, implementation):
  config = presets.get("tiny-deepseek-v2", moe_implementation=implementation, **overrides)
  layer = moe.DeepseekMoE(config, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (3, 10, config.hidden_size))
  y, aux = layer(x)
  np.testing.assert_allclose(y, moe.all_experts_reference(layer, x), atol=1e-5)
  # Dropless: every token reaches exactly K experts.
  np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["blocked", "ragged_dot"])
def test_moe_gradients_match_dense_reference(implementation):
  config = presets.get("tiny-deepseek-v2", moe_implementation=implementation)
  layer = moe.DeepseekMoE(config, rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.key(6), (2, 6, config.hidden_size))
  g_ours = nnx.grad(lambda m: (m(x)[0] ** 2).sum())(layer)
  g_ref = nnx.grad(lambda m: (moe.all_experts_reference(m, x) ** 2).sum())(layer)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[40, 0, 0, 0], [0, 0, 0, 40], [1, 13, 0, 26], [10, 10, 10, 10]])
def test_blocked_experts_handle_skewed_and_empty_groups(sizes):
  """Every expert gets the rows routed to it, however unbalanced; the result equals ragged_dot. Rows
  after the last group (an expert-parallel device's assignments to other devices' experts) come out 0."""
  experts, dim, hidden, other_rows = 4, 6, 5, 7
  keys = jax.random.split(jax.random.key(8), 4)
  x = jax.random.normal(keys[0], (sum(sizes) + other_rows, dim))
  gate, up = (jax.random.normal(k, (experts, dim, hidden)) for k in keys[1:3])
  down = jax.random.normal(keys[3], (experts, hidden, dim))
  group_sizes = jnp.array(sizes, jnp.int32)
  blocked = grouped_experts.expert_swiglu(x, group_sizes, gate, up, down, "blocked")
  expert_of_row = np.repeat(np.arange(experts), sizes)
  expected = np.stack([
      np.asarray(jax.nn.silu(x[r] @ gate[e]) * (x[r] @ up[e]) @ down[e]) for r, e in enumerate(expert_of_row)]
      + [np.zeros(dim, np.float32)] * other_rows)
  np.testing.assert_allclose(blocked, expected, atol=1e-5)
  np.testing.assert_allclose(blocked, grouped_experts.expert_swiglu(x, group_sizes, gate, up, down, "ragged_dot"),
                             atol=1e-5)

  def loss(implementation, *args):  # the blocked path has a hand-written backward pass: check all of it
    return (grouped_experts.expert_swiglu(args[0], group_sizes, *args[1:], implementation) ** 2).sum()

  grads_blocked = jax.grad(loss, argnums=(1, 2, 3, 4))("blocked", x, gate, up, down)
  grads_ragged = jax.grad(loss, argnums=(1, 2, 3, 4))("ragged_dot", x, gate, up, down)
  for a, b in zip(grads_blocked, grads_ragged, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_group_limited_routing_stays_in_the_best_groups():
  config = presets.get("tiny-deepseek-v2", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                       num_experts_per_tok=3)
  scores = jax.nn.softmax(jax.random.normal(jax.random.key(7), (50, 8)), axis=-1)
  _, experts = moe.route(scores, config)
  group_best = scores.reshape(50, 4, 2).max(-1)
  allowed_groups = np.argsort(-np.asarray(group_best), axis=-1)[:, :2]
  for token in range(50):
    assert set(np.asarray(experts[token]) // 2) <= set(allowed_groups[token])


def test_balance_loss_formula():
  """alpha * mean_b sum_i f_i P_i, with f_i = count_i * E / (S * K), on a hand-built case."""
  config = presets.get("tiny-deepseek-v2", n_routed_experts=4, num_experts_per_tok=1, aux_loss_alpha=0.5)
  scores = jnp.array([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]])  # B=1, S=2
  experts = jnp.array([[[0], [1]]])
  # f = [2, 2, 0, 0]; P = [0.4, 0.4, 0.1, 0.1]; sum f*P = 1.6
  np.testing.assert_allclose(moe.balance_loss(scores, experts, config), 0.5 * 1.6, rtol=1e-6)
  uniform = presets.get("tiny-deepseek-v2", n_routed_experts=4, num_experts_per_tok=1, aux_loss_alpha=1.0,
                        seq_aux=False)
  np.testing.assert_allclose(moe.balance_loss(scores, experts, uniform), 1.6, rtol=1e-6)


def test_moe_layer_placement():
  config = presets.get("tiny-deepseek-v2", num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
  model = models.build_abstract(config)
  kinds = [type(stack.block.mlp).__name__ for stack in model.layers for _ in range(stack.count)]
  assert kinds == ["SwiGLU", "SwiGLU", "DeepseekMoE", "SwiGLU", "DeepseekMoE", "SwiGLU"]
  # Stacks are the runs of one kind; with moe_layer_freq=2 they are short.
  assert [(stack.first_layer, stack.count) for stack in model.layers] == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1)]


@pytest.mark.parametrize("preset, overrides, runs", [
    ("tiny-qwen2", {}, [(0, 5)]),
    ("tiny-deepseek-v2", {"first_k_dense_replace": 1}, [(0, 1), (1, 4)]),
])
def test_stacked_parameters_have_a_leading_layers_axis(preset, overrides, runs):
  config = presets.get(preset, num_hidden_layers=5, **overrides)
  model = models.build_abstract(config)
  assert [(stack.first_layer, stack.count) for stack in model.layers] == runs
  for i, stack in enumerate(model.layers):
    assert [block_stack.stack_slot(config, layer) for layer in range(stack.first_layer, stack.first_layer + stack.count)] \
        == [(i, slot) for slot in range(stack.count)]
    for path, var in nnx.iter_graph(stack.block):
      if isinstance(var, nnx.Param):
        assert var.shape[0] == stack.count and var.get_metadata()["out_sharding"][0] == "layers", path
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  q_proj = params["layers"][0]["block"]["self_attn"]["q_proj"]
  assert q_proj.shape == (runs[0][1], config.hidden_size, config.num_attention_heads, q_proj.shape[-1])
  if preset == "tiny-deepseek-v2":
    assert params["layers"][1]["block"]["mlp"]["experts"]["gate_proj"].shape == (
        4, config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "block"])
@pytest.mark.parametrize("preset, overrides", [
    ("tiny-qwen2", {}),
    ("tiny-qwen2", {"attention_implementation": "reference"}),
    ("tiny-deepseek-v2", {"first_k_dense_replace": 1}),
    ("tiny-deepseek-v2", {"first_k_dense_replace": 1, "moe_layer_freq": 2}),
])
def test_scanned_layers_equal_a_loop_over_each_layer(preset, overrides, remat):
  """The scan over stacked blocks computes what applying each layer's own block in turn computes."""
  config = presets.get(preset, num_hidden_layers=5, **overrides)
  model = models.build(config, parallelism=models.Parallelism(remat=remat))
  ids_BxS = _ids()
  segment_ids_BxS = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
  positions_BxS = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits_BxSxV, aux = jax.jit(lambda m: m(ids_BxS, positions_BxS, segment_ids_BxS, return_aux=True))(model)

  x_BxSxD = model.embed_tokens(ids_BxS, model.dtype)
  balance_loss, expert_loads = 0.0, []
  for layer in range(config.num_hidden_layers):
    stack, slot = block_stack.stack_slot(config, layer)
    x_BxSxD, layer_aux = model.layers[stack].layer(slot)(x_BxSxD, positions_BxS, segment_ids_BxS)
    assert (layer_aux is not None) == config.is_moe_layer(layer), layer
    if layer_aux is not None:
      balance_loss += layer_aux["balance_loss"]
      expert_loads.append(layer_aux["expert_load"])
  np.testing.assert_allclose(logits_BxSxV, model.logits(model.norm(x_BxSxD)), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux["balance_loss"], balance_loss, atol=1e-6, rtol=1e-5)
  if expert_loads:
    np.testing.assert_array_equal(aux["expert_load"], jnp.stack(expert_loads))

  # Gradients flow through the scan (and its remat) to every layer's slot.
  grads = nnx.to_pure_dict(nnx.grad(lambda m: m(ids_BxS, positions_BxS, segment_ids_BxS).std())(model))
  for stack in grads["layers"].values():
    o_proj = stack["block"]["self_attn"]["o_proj"]
    assert (jnp.abs(o_proj).reshape(len(o_proj), -1).sum(-1) > 0).all()


def test_q_lora_variant_builds_and_runs():
  model = models.build(presets.get("tiny-deepseek-v2", q_lora_rank=24))
  assert model.layers[0].layer(0).self_attn.q_b_proj.shape == (24, 4, 24)
  assert np.isfinite(model(_ids())).all()
