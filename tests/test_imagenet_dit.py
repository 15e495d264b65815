"""The class-conditional DiTs of configs/imagenet_dit.py against the DiT paper (Peebles & Xie 2023).

Everything large is built from abstract shapes (`nnx.eval_shape`): no 675M-parameter allocation.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import imagenet_dit, shapes as shapes_config  # noqa: E402
from sora_jax.models import dit  # noqa: E402

# Trainable parameters of the official implementation (facebookresearch/DiT models.py @ 00d70ac,
# `DiT_<size>_<p>()`, torch 2.13 + timm 1.0.31: sum of numel over parameters with requires_grad,
# i.e. without the frozen 2D sin-cos `pos_embed`, which is not trainable there and not a parameter
# here). The totals with `pos_embed` (e.g. 675,129,632 for XL/2) are what DiT's train.py logs.
# diffusers' DiTTransformer2DModel gives the same numbers once its per-block copies of the shared
# timestep and label embedders are removed (it converts checkpoints by duplicating them).
OFFICIAL_PARAMS = {
    'S/2': 32_865_056, 'S/4': 32_920_448, 'S/8': 33_142_016,
    'B/2': 130_315_808, 'B/4': 130_426_496, 'B/8': 130_869_248,
    'L/2': 457_840_672, 'L/4': 457_988_224, 'L/8': 458_578_432,
    'XL/2': 674_834_720, 'XL/4': 675_000_704, 'XL/8': 675_664_640,
}
PAPER_PARAMS = {'S/2': 33e6, 'B/2': 130e6, 'L/2': 458e6, 'XL/2': 675e6}  # the paper's rounded figures
# The paper's Table 4 "Gflops": multiply-adds of one forward pass at 256 x 256 (a 32 x 32 x 4 latent).
PAPER_GFLOPS = {
    'S/2': 6.06, 'S/4': 1.41, 'S/8': 0.36,
    'B/2': 23.01, 'B/4': 5.56, 'B/8': 1.42,
    'L/2': 80.71, 'L/4': 19.70, 'L/8': 5.01,
    'XL/2': 118.64, 'XL/4': 29.05, 'XL/8': 7.39,
}
IDENTITY_CHANNELS = 3  # what train.py passes today (autoencoder 'identity'); model.channels=4 wins


def num_params(model_config, channels=IDENTITY_CHANNELS):
  abstract = nnx.eval_shape(lambda: dit.from_config(model_config, channels, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def formula_params(width, depth, patch, channels=4, classes=1000):
  """DiT's parameters written out: patch embedding, timestep MLP, label table (+ null class), blocks
  (qkv + out projections with biases, 4x MLP, adaLN 6d), final adaLN 2d and learned-sigma output."""
  d, values = width, patch * patch * channels
  block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
  final = (2 * d * d + 2 * d) + (d * 2 * values + 2 * values)
  return (values * d + d) + (256 * d + d + d * d + d) + (classes + 1) * d + depth * block + final


@pytest.mark.parametrize('variant', imagenet_dit.VARIANTS)
def test_trainable_parameters_equal_the_official_dit(variant):
  config = imagenet_dit.get_config(variant)
  count = num_params(config.model)
  assert count == OFFICIAL_PARAMS[variant]
  size, patch = variant.split('/')
  width, depth, _ = imagenet_dit.SIZES[size]
  assert count == formula_params(width, depth, int(patch))
  if variant in PAPER_PARAMS:
    assert abs(count / PAPER_PARAMS[variant] - 1) < 0.005


@pytest.mark.parametrize('variant', imagenet_dit.VARIANTS)
def test_forward_flops_match_the_papers_gflops_within_1_percent(variant):
  config = imagenet_dit.get_config(variant)
  d = config.data
  flops = dit.forward_flops_per_sample(config.model, (d.frames, d.height, d.width), IDENTITY_CHANNELS)
  gflops = flops / 2 / 1e9  # the paper counts multiply-adds
  assert abs(gflops / PAPER_GFLOPS[variant] - 1) < 0.01, (gflops, PAPER_GFLOPS[variant])


def small_model_config(**kw):
  config = imagenet_dit.get_config('S/2').model
  config.update(dict(width=128, depth=2, num_heads=4, num_classes=10) | kw)
  return config


def test_analytic_flops_of_the_class_model_match_xla_cost_analysis_within_10_percent():
  config = small_model_config()
  model = dit.from_config(config, IDENTITY_CHANNELS, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, 1, 16, 16, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  forward = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, labels_b=y))
  cost = forward.lower(params, x, t, labels).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = dit.forward_flops_per_sample(config, (1, 16, 16), IDENTITY_CHANNELS)
  assert 0.9 < analytic / cost['flops'] < 1.1, (analytic, cost['flops'])


def tiny_model(**kw):
  return dit.DiT(channels=4, patch=(1, 2, 2), width=32, depth=2, num_heads=2, conditioning='class',
                 num_classes=10, qk_norm=False, qkv_bias=True, rope=False, learn_sigma=True,
                 rngs=nnx.Rngs(0), **kw)


def tiny_inputs(b=2):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 1, 8, 8, 4)), jnp.float32)
  return x, jnp.linspace(0.2, 0.9, b)


def train_zero_layers(model, seed=1):
  """Gives the zero-initialised adaLN and output layers weights, as training would."""
  rng = np.random.default_rng(seed)
  for layer in [model.final.proj, model.final.modulation] + [block.modulation for block in model.blocks]:
    layer.kernel.value = jnp.asarray(rng.normal(size=layer.kernel.shape) * 0.05, jnp.float32)


def test_class_model_output_has_c_channels_and_the_label_changes_it():
  model = tiny_model()
  x, t = tiny_inputs()
  assert model.null_label == 10
  out = model(x, t, labels_b=jnp.array([3, 3]))
  assert out.shape == x.shape and out.dtype == jnp.float32  # 4 channels, not the 8 it predicts
  np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero: the final layer starts at zero
  train_zero_layers(model)
  a = model(x, t, labels_b=jnp.array([3, 3]))
  b = model(x, t, labels_b=jnp.array([5, 5]))
  null = model(x, t, labels_b=jnp.full((2,), model.null_label))
  assert not np.allclose(a, b) and not np.allclose(a, null) and not np.allclose(b, null)
  # The label only enters through the adaLN condition: a per-sample label gives per-sample outputs.
  mixed = model(x, t, labels_b=jnp.array([3, model.null_label]))
  np.testing.assert_allclose(mixed[0], a[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], null[1], atol=1e-5)


def test_learned_sigma_outputs_are_dropped_and_get_no_gradient():
  model = tiny_model()
  train_zero_layers(model)
  x, t = tiny_inputs()
  labels = jnp.array([1, 2])
  channel = np.arange(model.final.proj.kernel.shape[1]) % 8  # output values are (pt, ph, pw, 2c)
  sigma = channel >= 4
  before = model(x, t, labels_b=labels)
  kernel = model.final.proj.kernel.value
  model.final.proj.kernel.value = kernel.at[:, sigma].add(10.0)
  np.testing.assert_array_equal(model(x, t, labels_b=labels), before)

  graphdef, params = nnx.split(model)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, labels_b=labels) ** 2)
  grad = jax.grad(loss)(params)['final']['proj']['kernel'].value
  assert np.all(grad[:, sigma] == 0) and np.any(grad[:, ~sigma] != 0)


def test_positions_are_the_dit_papers_2d_sincos_table():
  """With the patch embedding at zero and the blocks at init (closed gates), the output is the
  final projection of LayerNorm(positions): compare with DiT's table (MAE's get_2d_sincos_pos_embed)."""
  model = tiny_model()
  for p in (model.patch_embed.kernel, model.patch_embed.bias):
    p.value = jnp.zeros_like(p.value)
  kernel = jnp.asarray(np.random.default_rng(2).normal(size=model.final.proj.kernel.shape), jnp.float32)
  model.final.proj.kernel.value = kernel
  x, t = tiny_inputs(1)
  out = model(x, t, labels_b=jnp.array([0]))

  def sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    angle = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

  grid = 4  # 8 x 8 latent, patch 2
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # w first
  table = np.concatenate([sincos_1d(16, gw), sincos_1d(16, gh)], axis=1)  # [16 tokens, width 32]
  normed = (table - table.mean(-1, keepdims=True)) / np.sqrt(table.var(-1, keepdims=True) + 1e-6)
  expected = dit.unpatchify(jnp.asarray(normed @ np.asarray(kernel))[None], (1, 2, 2), (1, grid, grid), 8)[..., :4]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_forward_equals_the_official_dit_on_the_same_weights():
  """A 2-block DiT (width 64, 4 heads, 10 classes, 8 x 8 x 4 input, patch 2) with every trainable
  tensor of the official implementation filled by `fill`, in its order and PyTorch layout. The
  expected values came from facebookresearch/DiT models.py @ 00d70ac (torch 2.13, timm 1.0.31)."""
  def fill(i, shape):
    return (0.1 * np.sin(np.arange(math.prod(shape)) * 0.37 + i)).reshape(shape).astype(np.float32)

  d, heads, depth, p, c = 64, 4, 2, 2, 4
  model = dit.DiT(channels=c, patch=(1, p, p), width=d, depth=depth, num_heads=heads, conditioning='class',
                  num_classes=10, qk_norm=False, qkv_bias=True, rope=False, learn_sigma=True, rngs=nnx.Rngs(0))
  index = iter(range(1000))
  official = lambda *shape: fill(next(index), shape)  # the next official tensor, in its order

  def linear(layer, d_out, d_in):  # torch Linear: weight [out, in], then bias
    layer.kernel.value = jnp.asarray(official(d_out, d_in).T)
    layer.bias.value = jnp.asarray(official(d_out))

  conv = official(d, c, p, p)  # the patch embedding is a p x p convolution with stride p
  model.patch_embed.kernel.value = jnp.asarray(conv.transpose(2, 3, 1, 0).reshape(p * p * c, d))
  model.patch_embed.bias.value = jnp.asarray(official(d))
  linear(model.time_mlp1, d, 256)
  linear(model.time_mlp2, d, d)
  model.label_embedding.value = jnp.asarray(official(11, d))
  for block in model.blocks:
    qkv_w, qkv_b = official(3 * d, d), official(3 * d)
    attn = block.self_attn
    for j, (w, b) in enumerate([(attn.wq, attn.bq), (attn.wk, attn.bk), (attn.wv, attn.bv)]):
      w.value = jnp.asarray(qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads))
      b.value = jnp.asarray(qkv_b[j * d:(j + 1) * d].reshape(heads, d // heads))
    attn.wo.value = jnp.asarray(official(d, d).T.reshape(heads, d // heads, d))
    attn.bo.value = jnp.asarray(official(d))
    linear(block.mlp.fc1, 4 * d, d)
    linear(block.mlp.fc2, d, 4 * d)
    linear(block.modulation, 6 * d, d)
  linear(model.final.proj, p * p * 2 * c, d)
  linear(model.final.modulation, 2 * d, d)
  assert next(index) == 31  # every official tensor used once
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 182_176  # the official count

  x = jnp.asarray(np.sin(np.arange(3 * 8 * 8 * 4) * 0.11).reshape(3, 1, 8, 8, 4), jnp.float32)
  out = np.asarray(model(x, jnp.array([300.0, 999.0, 10.0]) / 1000, labels_b=jnp.array([3, 10, 7]))).reshape(-1)
  # The official output's first 4 channels [b, h, w, c]: sum, sum of squares, every 97th value.
  np.testing.assert_allclose(out.astype(np.float64).sum(), 19.02198171429336, atol=2e-3)
  np.testing.assert_allclose((out.astype(np.float64) ** 2).sum(), 420.9995232483215, rtol=1e-5)
  np.testing.assert_allclose(out[::97], [0.207214, 0.205403, 0.138591, 0.077209, -0.722154, -1.244594,
                                         0.498046, 0.866741], atol=1e-4)


def test_each_model_rejects_the_other_conditioning():
  model = tiny_model()
  x, t = tiny_inputs()
  tokens, mask = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool)
  with pytest.raises(ValueError, match='labels'):
    model(x, t, tokens, mask)
  with pytest.raises(ValueError, match='channels'):
    model(x[..., :3], t, labels_b=jnp.array([0, 1]))
  text_model = dit.from_config(shapes_config.get_config('tiny').model, 3, nnx.Rngs(0))
  with pytest.raises(ValueError, match='tokens'):
    text_model(jnp.zeros((2, 8, 32, 32, 3)), t, labels_b=jnp.array([0, 1]))
  with pytest.raises(ValueError, match='no null label'):
    text_model.null_label
  with pytest.raises(ValueError, match='num_classes'):
    dit.DiT(channels=4, patch=(1, 2, 2), width=32, depth=1, num_heads=2, conditioning='class', rngs=nnx.Rngs(0))


def test_every_class_model_parameter_has_logical_names_with_sharding_rules():
  config = imagenet_dit.get_config('S/8')
  abstract = nnx.eval_shape(lambda: dit.from_config(config.model, IDENTITY_CHANNELS, nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  specs = jax.tree.leaves(nnx.get_partition_spec(params).to_pure_dict(),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(params.to_pure_dict())
  assert len(specs) == len(shapes) > 0
  ruled = {name for name, _ in config.sharding_rules}
  for spec, x in zip(specs, shapes):
    assert len(spec) == len(x.shape) and all(name in ruled for name in spec), spec
  assert params['label_embedding'].value.shape == (1001, 384)


def test_configs_pass_the_trainers_validation():
  from sora_jax import UsageError, train
  for variant in ('S/2', 'XL/2'):
    config = imagenet_dit.get_config(variant + ',mesh=fsdp')
    assert config.model.conditioning == 'class' and config.batch_size == 256
    assert (config.data.frames, config.data.height, config.data.width, config.model.channels) == (1, 32, 32, 4)
    # 4 latent channels need a VAE; until then the pixel autoencoder's 3 must be asked for.
    with pytest.raises(UsageError, match=r'config.model.channels=4 .* pass --config.model.channels=3'):
      train.validate_config(config, 8)
    config.model.channels = 3
    train.validate_config(config, 8)
  with pytest.raises(ValueError, match='unknown variant'):
    imagenet_dit.get_config('XL/3')


# The text model's figures before the class-conditional options were added (configs/shapes.py).
TEXT_MODEL_BEFORE = {'tiny': (87_648, 60, 7_059_456), '': (4_239_168, 136, 355_778_560)}


@pytest.mark.parametrize('variant', list(TEXT_MODEL_BEFORE))
def test_the_text_models_parameters_and_flops_are_unchanged(variant):
  config = shapes_config.get_config(variant)
  assert config.model.frame_conditioning  # adds one [patch t, width] table, the mark of given frames
  m = config.model
  params, count, flops = TEXT_MODEL_BEFORE[variant]
  expected = (params + m.patch[0] * m.width, count + 1, flops)
  abstract = nnx.eval_shape(lambda: dit.from_config(config.model, 3, nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  d = config.data
  flops = dit.forward_flops_per_sample(config.model, (d.frames, d.height, d.width), 3, d.max_text_len)
  assert (sum(x.size for x in leaves), len(leaves), flops) == expected
  config.model.frame_conditioning = False
  leaves = jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: dit.from_config(config.model, 3, nnx.Rngs(0))), nnx.Param))
  assert (sum(x.size for x in leaves), len(leaves)) == TEXT_MODEL_BEFORE[variant][:2]
  assert not any('label' in jax.tree_util.keystr(path) or keystr_has_bias(path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param).to_pure_dict()))


def keystr_has_bias(path):
  return jax.tree_util.keystr(path).endswith(("['bq']", "['bk']", "['bv']"))


def test_shapes_records_carry_the_class_of_their_caption(data_dir):
  import ml_collections
  from sora_jax.data import pipeline, shapes
  c = ml_collections.ConfigDict(dict(name='shapes', data_dir=data_dir, frames=8, height=32, width=32,
                                     object_size=12, num_train=64, num_validation=8, seed=0))
  source = pipeline.data_source(c, 'train')
  labels = set()
  for i in range(len(source)):
    example = pipeline.to_example(source[i], 40)
    color, shape, direction = shapes.parse_caption(source[i]['caption'].decode())
    expected = shapes.class_label(shapes.COLOR_NAMES.index(color), shapes.SHAPES.index(shape),
                                  shapes.DIRECTION_NAMES.index(direction))
    assert example['label'] == expected
    labels.add(int(example['label']))
  assert labels <= set(range(84)) and len(labels) > 20


@pytest.mark.slow
def test_a_tiny_class_conditional_dit_trains_and_samples_its_classes(data_dir, tmp_path):
  """The trainer's label path end to end: labels from the data, dropped to the null class, samples per class."""
  from sora_jax import sample, train
  config = imagenet_dit.get_config('S/8')
  config.model.update(channels=3, width=32, depth=1, num_heads=2)
  config.data.update(data_dir=data_dir, frames=8, num_train=64, num_validation=8)  # the tiny shapes clips
  config.model.patch = (2, 8, 8)
  config.update(total_steps=40, batch_size=8, log_every_steps=20, checkpoint_every_steps=40)
  config.optim.learning_rate = 1e-3
  config.sample.update(num_steps=2, labels=(0, 83))
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = [__import__('json').loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  rows, evals = [r for r in rows if 'train/loss' in r], [r for r in rows if 'eval/loss' in r]
  assert rows[-1]['train/loss'] < rows[0]['train/loss']
  assert [r['step'] for r in evals] == [40] and np.isfinite(evals[0]['eval/fvd'])  # labels sampled for FVD
  assert sorted(os.listdir(os.path.join(workdir, 'samples', '00000040'))) == [
      '00_class_0.gif', '00_class_0.mp4', '01_class_83.gif', '01_class_83.mp4']
  model = sample.load(workdir)
  videos = sample.generate(model, [5, 6], seed=0, num_steps=2)
  assert videos.shape == (2, 8, 32, 32, 3)
  np.testing.assert_array_equal(sample.generate(model, ['5'], seed=0, num_steps=2)[0], videos[0])
  with pytest.raises(Exception, match=r'class indices in \[0, 1000\)'):
    sample.generate(model, ['a red circle moving left'])
