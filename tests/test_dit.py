import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import dit
from sora_jax.text import byte as text


def small_dit(**kw):
  args = dict(channels=3, patch=(2, 4, 4), width=32, depth=2, num_heads=2, text_width=16,
              text_depth=1, text_heads=2, rngs=nnx.Rngs(0))
  return dit.DiT(**(args | kw))


def inputs(b=2):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 4, 8, 8, 3)), jnp.float32)
  tokens, mask = text.tokenize(['a red circle moving left', ''][:b], 16)
  return x, jnp.array([0.3, 0.9][:b]), tokens, mask


def test_output_has_the_input_shape():
  model = small_dit()
  assert model(*inputs()).shape == (2, 4, 8, 8, 3)


def test_adaln_zero_gates_start_closed_and_the_model_outputs_zero():
  model = small_dit()
  x_bsd = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 32)), jnp.float32)
  c_bd = jnp.ones((2, 32))
  pos = jnp.broadcast_to(dit.grid_positions((2, 2, 2))[None], (2, 8, 3))
  tokens, mask = text.tokenize(['a blue square', 'x'], 16)
  text_bld, text_mask = model.encode_text(tokens, mask)
  for block in model.blocks:
    # The adaLN-Zero branches (self-attention, MLP) add nothing; only the cross-attention acts.
    cross = block.cross_attn(block.cross_norm(x_bsd), context_bld=text_bld, mask_bl=text_mask)
    assert float(jnp.abs(cross).max()) > 1e-3
    np.testing.assert_allclose(block(x_bsd, c_bd, pos, text_bld, text_mask), x_bsd + cross, atol=1e-5)
    block.cross_attn.wo.value = jnp.zeros_like(block.cross_attn.wo.value)
    block.cross_attn.bo.value = jnp.zeros_like(block.cross_attn.bo.value)
    np.testing.assert_allclose(block(x_bsd, c_bd, pos, text_bld, text_mask), x_bsd, atol=1e-6)
  np.testing.assert_array_equal(model(*inputs()), 0.0)  # the final layer is zero-initialised


def test_every_parameter_has_one_logical_axis_name_per_dimension():
  abstract = nnx.eval_shape(lambda: small_dit())
  params = nnx.state(abstract, nnx.Param)
  specs = nnx.get_partition_spec(params).to_pure_dict()
  shapes = params.to_pure_dict()
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_specs) == len(flat_shapes) > 0
  for (path, spec), x in zip(flat_specs, flat_shapes):
    assert len(spec) == len(x.shape), jax.tree_util.keystr(path)
    assert all(isinstance(name, str) for name in spec), jax.tree_util.keystr(path)


def test_text_conditioning_changes_the_output_once_trained_layers_are_nonzero():
  model = small_dit()
  # Give the zero-initialised output layers weights, as training would.
  for layer in [model.final.proj, model.final.modulation]:
    layer.kernel.value = jnp.full(layer.kernel.shape, 0.05)
  x, t, _, _ = inputs()
  a = model(x, t, *text.tokenize(['a red circle', 'a red circle'], 16))
  b = model(x, t, *text.tokenize(['a blue square', 'a blue square'], 16))
  assert not np.allclose(a, b)


def test_rope_theta_and_position_scale_reach_every_self_attention_and_change_it():
  model = small_dit(rope_theta=100.0, rope_position_scale=0.5)
  assert [(b.self_attn.rope_theta, b.self_attn.rope_position_scale) for b in model.blocks] == [(100.0, 0.5)] * 2
  x_bsd = jnp.asarray(np.random.default_rng(2).normal(size=(1, 32, 32)), jnp.float32)
  pos = jnp.asarray(dit.grid_positions((2, 4, 4))[None])
  attn = model.blocks[0].self_attn
  a = attn(x_bsd, pos_bsa=pos)
  attn.rope_theta = 10000.0
  b = attn(x_bsd, pos_bsa=pos)
  attn.rope_position_scale = 1.0
  assert not np.allclose(a, b, atol=1e-4) and not np.allclose(b, attn(x_bsd, pos_bsa=pos), atol=1e-4)


def test_text_embedding_std_sets_the_byte_embeddings_initial_scale():
  for std in (0.02, 1.0):
    table = small_dit(text_width=64, text_embedding_std=std).text_encoder.embedding[...]
    assert abs(float(jnp.std(table)) - std) < 0.1 * std


def test_tokenize_pads_truncates_and_starts_with_bos():
  tokens, mask = text.tokenize(['ab', '', 'é' * 20], 6)
  assert tokens[0].tolist() == [text.BOS_ID, ord('a') + 2, ord('b') + 2, 0, 0, 0]
  assert mask[1].tolist() == [True] + [False] * 5  # the null caption keeps its BOS key
  assert mask[2].all()


def test_analytic_forward_flops_match_xla_cost_analysis_within_10_percent():
  import sys, os
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes as shapes_config
  config = shapes_config.get_config()
  model = dit.from_config(config.model, 3, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  d = config.data
  x = jax.ShapeDtypeStruct((1, d.frames, d.height, d.width, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, d.max_text_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, d.max_text_len), jnp.bool_)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  forward = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  cost = forward.lower(params, x, t, tokens, mask).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = dit.forward_flops_per_sample(config.model, (d.frames, d.height, d.width), 3, d.max_text_len)
  assert 0.9 < analytic / cost['flops'] < 1.1, (analytic, cost['flops'])


def test_the_30M_cpu_config_has_about_30M_parameters_and_is_valid():
  import math
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes as shapes_config
  from sora_jax import sample, train
  config = shapes_config.get_config('30M')
  train.validate_config(config, 8)
  params = sample.abstract_model(config)[1]
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert 27e6 < count < 33e6, count
