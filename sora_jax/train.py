"""The trainer: one linear function from a config and a workdir to a trained, sampled model.

Phases: validate config -> mesh -> input -> model + optimizer (abstract) -> sharded state
(created or restored) -> jitted train step -> loop (log, checkpoint, evaluate) -> samples.
This is the only module that reads the whole experiment config.
"""

import copy
import json
import math
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx

from sora_jax import UsageError, checkpoint, ensure_writable_dir, metrics, optim, sample, sharding, video
from sora_jax.data import buckets, packing, pipeline
from sora_jax.data import shapes as shapes_data
from sora_jax.diffusion import frame_conditioning
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.eval import evaluator as evaluator_lib
from sora_jax.models import autoencoder as autoencoder_lib
from sora_jax.models import dit, layers
import sora_jax.text as text_lib
from sora_jax.text import byte as text
from sora_jax.models.axes import constrain


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps: the run stops with its last good checkpoint."""


# ------------------------------------------------------------------------------------------------
# Config validation: before any compilation, one line naming the field.
# ------------------------------------------------------------------------------------------------


def validate_config(config, num_devices: int, platform: str | None = None) -> dict[str, int]:
  """Raises UsageError for a bad config; returns the resolved mesh sizes. `platform`: the devices'
  ('tpu' when compiling for a TPU slice ahead of time), by default this process's."""
  for field in ('total_steps', 'batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'max_checkpoints_to_keep', 'max_consecutive_nonfinite', 'sample.num_steps',
                'data.frames', 'data.height', 'data.width', 'data.num_train', 'data.max_text_len',
                'model.width', 'model.depth', 'model.num_heads'):
    value = _get(config, field)
    if not isinstance(value, int) or value <= 0:
      raise UsageError(f'config.{field}={value!r}: must be a positive integer')
  for field in ('ema_decay', 'objective.caption_dropout', 'objective.high_noise_fraction',
                'sample.stochasticity'):
    if not 0 <= _get(config, field) <= 1:
      raise UsageError(f'config.{field}={_get(config, field)!r}: must be in [0, 1]')
  for field in ('reconstruction_guidance', 'extension_reconstruction_guidance'):
    if not config.sample.get(field, 0.0) >= 0:
      raise UsageError(f'config.sample.{field}={config.sample[field]!r}: must be >= 0 (0: off)')
  base = config.objective.get('shift_base_tokens') or 0
  shift = config.objective.get('time_shift', 1.0)
  if not (isinstance(base, (int, float)) and base >= 0) or not shift > 0:
    raise UsageError(f'config.objective: shift_base_tokens={base!r} must be >= 0 (0: no shift by size) and '
                     f'time_shift={shift!r} positive')
  if not config.optim.learning_rate > 0 or config.optim.warmup_steps < 0:
    raise UsageError(f'config.optim: learning_rate={config.optim.learning_rate!r} must be positive and '
                     f'warmup_steps={config.optim.warmup_steps!r} non-negative')
  try:
    sizes = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  dp = data_parallel_size(config, sizes)
  if config.batch_size % dp:
    raise UsageError(f'config.batch_size={config.batch_size} is not divisible by the data-parallel '
                     f'size {dp} (mesh axes {batch_mesh_axes(config)})')
  if config.batch_size % jax.process_count():
    raise UsageError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  d, m = config.data, config.model
  if len(m.patch) != 3:
    raise UsageError(f'config.model.patch={tuple(m.patch)}: give (t, h, w) patch sizes')
  ae = autoencoder_lib.make(config.autoencoder, load_weights=False)  # reads a VAE's config.json only
  sample.check_size(config, ae, d.frames, d.height, d.width)
  if m.width % m.num_heads:
    raise UsageError(f'config.model.width={m.width} is not divisible by config.model.num_heads={m.num_heads}')
  if config.objective.prediction not in ('x0', 'velocity'):
    raise UsageError(f'config.objective.prediction={config.objective.prediction!r}: use "x0" or "velocity"')
  if not m.get('text_embedding_std', 0.02) > 0:
    raise UsageError(f'config.model.text_embedding_std={m.text_embedding_std!r}: must be positive')
  if m.remat not in dit.REMAT_POLICIES:
    raise UsageError(f'config.model.remat={m.remat!r}: use one of {tuple(dit.REMAT_POLICIES)}')
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum <= 0 or config.batch_size % (accum * dp):
    raise UsageError(f'config.grad_accum_steps={accum!r}: must be a positive integer dividing '
                     f'config.batch_size={config.batch_size} into micro-batches divisible by the '
                     f'data-parallel size {dp}')
  if m.dtype not in ('float32', 'bfloat16'):
    raise UsageError(f'config.model.dtype={m.dtype!r}: use "float32" or "bfloat16"')
  if m.get('conditioning', 'text') not in dit.CONDITIONING:
    raise UsageError(f'config.model.conditioning={m.conditioning!r}: use one of {dit.CONDITIONING}')
  if dit.is_class_conditional(m) and not (isinstance(m.get('num_classes'), int) and m.num_classes > 0):
    raise UsageError(f'config.model.num_classes={m.get("num_classes")!r}: a class-conditional model needs '
                     f'a positive number of classes')
  channels = ae.channels
  if m.get('channels') and m.channels != channels:
    raise UsageError(f'config.model.channels={m.channels} but config.autoencoder.kind='
                     f'{config.autoencoder.kind!r} gives {channels}: pass --config.model.channels={channels}')
  if dit.is_class_conditional(m) and d.name != 'shapes':
    raise UsageError(f'config.data.name={d.name!r} has no class labels: a class-conditional model '
                     f'(config.model.conditioning="class") trains on "shapes"')
  text_lib.validate(config)
  if pipeline.is_encoded(d):
    pipeline.check_encoded(config)
  if text_lib.is_frozen(config) and dit.is_class_conditional(m):
    raise UsageError(f'config.text_encoder.kind={config.text_encoder.kind!r} with a class-conditional model: '
                     f'use config.text_encoder.kind="byte" (unused) or config.model.conditioning="text"')
  impl = m.get('attention_impl', 'xla') or 'xla'
  platform = platform or jax.default_backend()
  if impl not in layers.ATTENTION_IMPLEMENTATIONS:
    raise UsageError(f'config.model.attention_impl={impl!r}: use one of {layers.ATTENTION_IMPLEMENTATIONS}')
  if impl == 'cudnn':
    head_width = m.width // m.num_heads
    needs = [f'an NVIDIA GPU (this run has {platform} devices)'] if platform != 'gpu' else []
    needs += [f'config.model.dtype="bfloat16" (not {m.dtype!r})'] if m.dtype != 'bfloat16' else []
    capability = getattr(jax.devices()[0], 'compute_capability', '9.0')  # Hopper+: heads up to 256 wide
    widest = 256 if float(capability) >= 9.0 else 128
    needs += ([f'a head width (width / num_heads = {head_width}) that is a multiple of 8, at most {widest}']
              if head_width % 8 or head_width > widest else [])
    if needs:
      raise UsageError('config.model.attention_impl="cudnn" (flash attention) needs ' + ' and '.join(needs))
    if packing_on(config):
      layers.cudnn_packed_layout()  # its packed layout checked against XLA once, and said, before any trace
  if impl == 'splash' and platform != 'tpu':
    raise UsageError(f'config.model.attention_impl="splash" (the Pallas TPU flash kernel) needs TPU devices '
                     f'(this run has {platform} devices): use "xla" here')
  if m.get('sequence_parallel', 'all_to_all') not in layers.SEQUENCE_PARALLEL:
    raise UsageError(f'config.model.sequence_parallel={m.sequence_parallel!r}: use one of {layers.SEQUENCE_PARALLEL}')
  validate_frame_conditioning(config)
  evaluator_lib.validate(config)
  validate_packing(config)
  validate_sizes(config, ae)
  return sizes


def batch_mesh_axes(config) -> tuple[str, ...]:
  """The mesh axes the batch is split over: those of the 'act_batch' sharding rule."""
  axes = dict(sharding.rules_tuple(config.sharding_rules)).get('act_batch') or ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def data_parallel_size(config, mesh_sizes: dict[str, int]) -> int:
  """How many ways the batch is split: the product of the sizes of `batch_mesh_axes`."""
  return math.prod(mesh_sizes[a] for a in batch_mesh_axes(config))


def frame_conditioning_on(config) -> bool:
  """Whether training gives some samples some of their frames (`config.frame_conditioning`)."""
  return config.get('frame_conditioning', {}).get('probability', 0.0) > 0


def validate_frame_conditioning(config) -> None:
  fcc = config.get('frame_conditioning')
  if fcc is None:
    return
  for field in ('probability', 'keyframe_rate', 'noise_max'):
    if not 0 <= fcc.get(field, 0.0) <= 1:
      raise UsageError(f'config.frame_conditioning.{field}={fcc.get(field)!r}: must be in [0, 1]')
  if not frame_conditioning_on(config):
    return
  if not config.model.get('frame_conditioning', False):
    raise UsageError(f'config.frame_conditioning.probability={fcc.probability} needs a model that marks given '
                     'frames: set config.model.frame_conditioning=True (or the probability to 0)')
  try:
    frame_conditioning.strategy_weights(dict(fcc.strategies))
  except ValueError as e:
    raise UsageError(f'config.frame_conditioning.strategies: {e}') from None


def _get(config, dotted: str):
  for name in dotted.split('.'):
    config = config[name]
  return config


# ------------------------------------------------------------------------------------------------
# Train state: {'step', 'params', 'opt_state', 'ema'}, created sharded.
# ------------------------------------------------------------------------------------------------


def state_shardings(config, mesh, tx):
  """(graphdef, abstract state with shardings, state shardings); allocates nothing."""
  graphdef, abstract_params, _ = sample.abstract_model(config)
  logical = nnx.get_partition_spec(abstract_params).to_pure_dict()
  params = abstract_params.to_pure_dict()
  param_shardings = sharding.logical_to_shardings(logical, params, mesh, config.sharding_rules)
  abstract_opt = jax.eval_shape(tx.init, params)
  # Optimizer moments shard like their parameters; counters are replicated.
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh))
  shardings = dict(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                   ema=param_shardings)
  abstract = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=abstract_opt,
                  ema=params)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, shardings


def create_state(config, channels: int, tx, shardings):
  """Initialises parameters directly into their shards: no device holds the full model."""

  def init():
    model = dit.from_config(config.model, channels, nnx.Rngs(config.seed), text_lib.text_dim(config))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)

  return jax.jit(init, out_shardings=shardings)()


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------


def cached_text(config) -> bool:
  """Whether batches carry a frozen encoder's embeddings (`encoded` data) rather than token ids."""
  return pipeline.is_encoded(config.data) and text_lib.is_frozen(config)


def batch_ndims(config) -> dict[str, int]:
  """The input arrays a train step takes, by name, with their ranks (the leading axis is the batch):
  clips or (`encoded` data) latents, and labels, token ids or (cached) text embeddings."""
  if packing_on(config):  # packed rows (sora_jax/data/packing.py): per-slot captions
    return {'x_sp': 3, 'segment_s': 2, 'pos_s3': 3, 'tokens': 3, 'token_mask': 3, 'frames_n': 2}
  x = {'latent': 5} if pipeline.is_encoded(config.data) else {'video': 5}
  if dit.is_class_conditional(config.model):
    return {**x, 'label': 1}
  if cached_text(config):
    return {**x, 'text': 3, 'text_mask': 2}
  return {**x, 'tokens': 2, 'token_mask': 2}


def packing_on(config) -> bool:
  """Whether training packs samples of any size into rows (`config.packing.row_length` > 0)."""
  return bool(config.get('packing') and config.packing.get('row_length'))


def validate_packing(config) -> None:
  """What packed training supports so far, checked before anything is built."""
  if not packing_on(config):
    return
  p = config.packing
  if not (isinstance(p.row_length, int) and p.row_length > 0 and isinstance(p.max_segments, int)
          and p.max_segments > 0):
    raise UsageError(f'config.packing: row_length={p.row_length!r} and max_segments={p.max_segments!r} must be '
                     'positive integers')
  block = p.get('block', 0)
  if not (isinstance(block, int) and block >= 0 and (block == 0 or p.row_length % block == 0)):
    raise UsageError(f'config.packing.block={block!r}: must be 0 (attention over whole rows) or a positive '
                     f'integer dividing config.packing.row_length={p.row_length}')
  if p.get('loss_weighting', 'sample') not in ('sample', 'token'):
    raise UsageError(f'config.packing.loss_weighting={p.loss_weighting!r}: use "sample" or "token"')
  unsupported = [
      (config.data.name not in ('shapes', 'folder'), f'config.data.name={config.data.name!r} (packing reads clips: "shapes" or "folder")'),
      (config.autoencoder.kind != 'identity', f'config.autoencoder.kind={config.autoencoder.kind!r} (pixel space only)'),
      (text_lib.is_frozen(config) or dit.is_class_conditional(config.model), 'a frozen text encoder or class labels'),
      ((frame_conditioning_on(config) or p.get('curriculum_frame_conditioning'))
       and config.frame_conditioning.get('noise_max', 0) > 0,
       'config.frame_conditioning.noise_max > 0 (noised given frames)'),
      (config.grad_accum_steps != 1, f'config.grad_accum_steps={config.grad_accum_steps}'),
      (evaluator_lib.enabled(config), 'config.eval.every_steps > 0 (evaluation reads fixed-size clips)'),
  ]
  for bad, what in unsupported:
    if bad:
      raise UsageError(f'config.packing.row_length={p.row_length}: packed training does not support {what} yet')


def buckets_on(config) -> bool:
  """Whether batches group clips by size (`config.buckets.tokens_per_step` > 0; sora_jax/data/buckets.py)."""
  return bool(config.get('buckets') and config.buckets.get('tokens_per_step'))


def validate_sizes(config, autoencoder) -> None:
  """Native sizes (`config.data.sizes`) need packing or buckets, and every size must fit the patch."""
  sizes = config.data.get('sizes') or ''
  if buckets_on(config):
    n = config.buckets.tokens_per_step
    if not isinstance(n, int) or n < 0:
      raise UsageError(f'config.buckets.tokens_per_step={n!r}: must be a positive integer (0: off)')
    if packing_on(config):
      raise UsageError('config.buckets.tokens_per_step and config.packing.row_length are both set: '
                       'choose buckets or packing (set the other to 0)')
    if not sizes:
      raise UsageError(f'config.buckets.tokens_per_step={n}: buckets need clips of several sizes '
                       '(config.data.sizes, e.g. "1x32x32,8x32x56")')
    unsupported = [
        (config.data.name not in ('shapes', 'folder'), f'config.data.name={config.data.name!r}'),
        (config.autoencoder.kind != 'identity', f'config.autoencoder.kind={config.autoencoder.kind!r} (pixel space only)'),
        (evaluator_lib.enabled(config), 'config.eval.every_steps > 0 (evaluation reads fixed-size clips)'),
    ]
    for bad, what in unsupported:
      if bad:
        raise UsageError(f'config.buckets.tokens_per_step={n}: bucketed training does not support {what} yet')
  if packing_on(config) and config.packing.get('curriculum_steps'):
    steps, first = config.packing.curriculum_steps, config.packing.get('curriculum_sizes') or ''
    if not isinstance(steps, int) or steps < 0:
      raise UsageError(f'config.packing.curriculum_steps={steps!r}: must be a non-negative integer (0: off)')
    allowed = set(shapes_data.parse_sizes(sizes)) if sizes else set()
    if not first or set(shapes_data.parse_sizes(first)) - allowed:
      raise UsageError(f'config.packing.curriculum_sizes={first!r}: give some of config.data.sizes={sizes!r} '
                       f'(the sizes of the first config.packing.curriculum_steps={steps} steps)')
    length, block = config.packing.get('curriculum_row_length'), config.packing.get('block', 0)
    longest = max(packing.tokens_of(size, config.model.patch) for size in shapes_data.parse_sizes(first))
    if length is not None and not (isinstance(length, int) and length >= longest and (not block or length % block == 0)):
      raise UsageError(f'config.packing.curriculum_row_length={length!r}: must hold the largest curriculum clip '
                       f'({longest} tokens)' + (f' and be a multiple of config.packing.block={block}' if block else '')
                       + ' (None: config.packing.row_length)')
    fc = config.packing.get('curriculum_frame_conditioning')
    if fc is not None and not (isinstance(fc, (int, float)) and 0 <= fc <= 1):
      raise UsageError(f'config.packing.curriculum_frame_conditioning={fc!r}: must be in [0, 1] (or None: '
                       'config.frame_conditioning.probability)')
    if fc:
      if not config.model.get('frame_conditioning', False):
        raise UsageError(f'config.packing.curriculum_frame_conditioning={fc} needs a model that marks given '
                         'frames: set config.model.frame_conditioning=True')
      validate_frame_conditioning(curriculum_config(config))  # its strategies
  if not sizes:
    return
  if not (packing_on(config) or buckets_on(config)):
    raise UsageError(f'config.data.sizes={sizes!r}: clips of several sizes need packing '
                     '(config.packing.row_length > 0) or buckets (config.buckets.tokens_per_step > 0)')
  for size in shapes_data.parse_sizes(sizes):
    try:
      sample.check_size(config, autoencoder, *size, names=('frames', 'height', 'width'))
    except UsageError as e:
      raise UsageError(f'config.data.sizes: {"x".join(map(str, size))}: {e}') from None
    if packing_on(config) and packing.tokens_of(size, config.model.patch) > config.packing.row_length:
      raise UsageError(f'config.data.sizes: {"x".join(map(str, size))} is {packing.tokens_of(size, config.model.patch)} '
                       f'patch tokens, more than config.packing.row_length={config.packing.row_length}')


def packed_layout(config) -> tuple[int, int] | None:
  """(block, window) of packed rows for `DiT.forward_packed`: samples start at multiples of
  `config.packing.block` tokens and have at most `window` (the largest of `config.data.sizes`);
  None (block 0): attention over whole rows, masked."""
  block = config.packing.get('block', 0)
  if not block:
    return None
  d = config.data
  sizes = shapes_data.parse_sizes(d.sizes) if d.get('sizes') else [(d.frames, d.height, d.width)]
  return block, max(packing.tokens_of(size, config.model.patch) for size in sizes)


def real_tokens(config, autoencoder, local: dict) -> int:
  """The patch tokens of a process's batch that are not padding (host arrays: no device sync)."""
  if 'segment_s' in local:
    return int(np.count_nonzero(local['segment_s']))
  x = local['latent'] if 'latent' in local else local['video']
  latent_thw = x.shape[1:4] if 'latent' in local else autoencoder.latent_shape(*x.shape[1:4])
  return x.shape[0] * packing.tokens_of(latent_thw, config.model.patch)


def frozen_params(config, autoencoder, text_encoder=None) -> dict:
  """The train step's third argument: what it uses but never updates. The autoencoder's parameters
  ({} for `identity`); a frozen text encoder's parameters, or with cached embeddings only its
  embedding of the empty caption (`null_text`, `null_text_mask`: [l, d], [l])."""
  frozen = {'autoencoder': autoencoder.params}
  if text_encoder is not None and cached_text(config):
    null_text, null_mask = text_encoder.encode([''])
    frozen.update(null_text=null_text[0].astype(jnp.float32), null_text_mask=null_mask[0])
  elif text_encoder is not None:
    frozen['text'] = text_encoder.params
  return frozen


def jit_train_step(config, graphdef, tx, autoencoder, mesh, shardings, batch_shardings, text_encoder=None,
                   frozen=None):
  """The jitted train step (state, batch, frozen) -> (state, metrics): explicit shardings, the state
  donated; `frozen` is `frozen_params(config, autoencoder, text_encoder)` (computed here unless
  given): the text encoder's parameters keep the shardings they were loaded with, the rest is replicated.

  The one definition that training and `experiments/benchmark.py` (timing, AOT compiles) share.
  """
  if frozen is None:
    frozen = frozen_params(config, autoencoder, text_encoder)
  frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
  if 'text' in frozen:  # as loaded: sharded by the rules
    frozen_shardings['text'] = jax.tree.map(lambda x: x.sharding, frozen['text'])
  return jax.jit(make_train_step(config, graphdef, tx, autoencoder, text_encoder),
                 in_shardings=(shardings, batch_shardings, frozen_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_loss_and_grads(config, graphdef):
  """(params, x0, noise, t, cond, given) -> (mean loss, grads), in `config.grad_accum_steps` micro-batches.

  `cond` holds the DiT's conditioning keywords (`tokens_bl` and `token_mask_bl`, `text_bld` and
  `text_mask_bl`, or `labels_b`); `given` is None or the frame conditioning: `mask_bt` (the given
  frames) and optionally `t_b` (their noise level).
  Micro-batch i takes samples i, i + m, i + 2m, ... so that every data-parallel shard feeds every
  micro-batch; equal sizes make the mean of micro-batch means the full-batch mean.
  """
  obj, accum = config.objective, config.grad_accum_steps

  def loss_fn(params, x0, noise, t, cond, given):
    net = nnx.merge(graphdef, params)
    if given is None:
      apply = lambda x_t, t_b: net(x_t, t_b, **cond)
      return rf.loss(apply, x0, noise, t, prediction_type=obj.prediction, min_t=obj.min_t)[0]
    apply = lambda x_t, t_b: net(x_t, t_b, **cond, frame_mask_bt=given['mask_bt'])
    return rf.loss(apply, x0, noise, t, prediction_type=obj.prediction, min_t=obj.min_t,
                   given_bt=given['mask_bt'], given_t_b=given.get('t_b'))[0]

  def loss_and_grads(params, *batch):
    if accum == 1:
      return jax.value_and_grad(loss_fn)(params, *batch)

    def split(x):  # [b, ...] -> [accum, b / accum, ...]
      x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return constrain(x, (None, 'act_batch') + (None,) * (x.ndim - 2))

    def add_micro_batch(carry, micro):
      loss, grads = jax.value_and_grad(loss_fn)(params, *micro)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(add_micro_batch, zeros, jax.tree.map(split, batch))
    return jax.tree.map(lambda x: x / accum, total)

  return loss_and_grads


def make_packed_loss_and_grads(config, graphdef):
  """(params, x0 [b, s, p], noise, t [b, n], segment_s, pos_s3, tokens [b, n, l], mask) -> (loss, grads)."""
  obj, layout = config.objective, packed_layout(config)

  def loss_fn(params, x0, noise, t, segment, pos, tokens, mask, given_bsk=None):
    net = nnx.merge(graphdef, params)
    apply = lambda x_t, t_bn: net.forward_packed(x_t, t_bn, segment, pos, tokens, mask, frame_mask_bsk=given_bsk,
                                                 layout=layout)
    return rf.packed_loss(apply, x0, noise, t, segment, prediction_type=obj.prediction, min_t=obj.min_t,
                          weighting=config.packing.get('loss_weighting', 'sample'), given_bsk=given_bsk)[0]

  return jax.value_and_grad(loss_fn)


def make_train_step(config, graphdef, tx, autoencoder, text_encoder=None):
  """(state, batch, frozen) -> (state, metrics). With a frozen `text_encoder` (T5), `batch['tokens']`
  are its token ids and the step encodes them (no gradient); else the DiT's byte encoder trains."""
  obj = config.objective
  cached = cached_text(config)
  if text_encoder is not None:
    null_tokens, null_mask = text_encoder.tokenize([''])
  else:
    null_tokens, null_mask = text.tokenize([''], config.data.max_text_len)
  loss_and_grads = make_loss_and_grads(config, graphdef)
  packed_loss_and_grads = make_packed_loss_and_grads(config, graphdef) if packing_on(config) else None

  def packed_step(state, batch, r_noise, r_time, r_drop, rng):
    """Packed rows: each slot (sample) draws its own caption dropout, timestep, size shift and given frames."""
    x0, segment = batch['x_sp'].astype(jnp.float32), batch['segment_s']
    b, n = x0.shape[0], batch['tokens'].shape[1]
    drop = jax.random.uniform(r_drop, (b, n, 1)) < obj.caption_dropout
    tokens = jnp.where(drop, null_tokens, batch['tokens'])
    mask = jnp.where(drop, null_mask, batch['token_mask'])
    noise = jax.random.normal(r_noise, x0.shape)
    count_bn = jnp.sum(segment[..., None] == jnp.arange(1, n + 1), axis=1)  # each sample's tokens
    shift = rf.size_shift(obj.time_shift, jnp.maximum(count_bn, 1), obj.get('shift_base_tokens'))
    t = rf.sample_time(r_time, b * n, mean=obj.time_mean, std=obj.time_std,
                       shift=jnp.reshape(shift, (-1,)) if jnp.ndim(shift) else shift,
                       high_noise_fraction=obj.high_noise_fraction, high_noise_min=obj.high_noise_min)
    given_bsk = None
    if frame_conditioning_on(config):  # per slot, over its own frames; then per token, its patch_t frames
      fcc, pt = config.frame_conditioning, config.model.patch[0]
      sizes = config.data.get('sizes')
      longest = max(size[0] for size in shapes_data.parse_sizes(sizes)) if sizes else config.data.frames
      mask_xt = frame_conditioning.sample_masks(
          jax.random.fold_in(rng, 1), b * n, longest, probability=fcc.probability, weights=dict(fcc.strategies),
          keyframe_rate=fcc.keyframe_rate, frames_b=batch['frames_n'].reshape(-1))
      given_bsk = frame_conditioning.packed_token_mask(mask_xt.reshape(b, n, longest), segment, batch['pos_s3'], pt)
    return packed_loss_and_grads(state['params'], x0, noise, t.reshape(b, n), segment, batch['pos_s3'], tokens, mask,
                                 given_bsk)

  def train_step(state, batch, frozen):
    rng = jax.random.fold_in(jax.random.key(config.seed), state['step'])  # no RNG state to save
    r_noise, r_time, r_drop = jax.random.split(rng, 3)
    if 'segment_s' in batch:
      return update(state, *packed_step(state, batch, r_noise, r_time, r_drop, rng))
    if 'latent' in batch:  # precomputed by sora_jax.encode
      x0 = batch['latent'].astype(jnp.float32)
    else:
      x0 = autoencoder.encode(frozen['autoencoder'], batch['video'].astype(jnp.float32) / 127.5 - 1.0)
    clip_frames = x0.shape[1]  # an image (1) is never given frames; it trains as a still clip:
    x0 = dit.repeat_stills(x0, config.model.patch[0])
    b = x0.shape[0]
    drop = jax.random.uniform(r_drop, (b, 1)) < obj.caption_dropout  # the unconditional share
    if dit.is_class_conditional(config.model):  # dropped labels become the null class
      cond = dict(labels_b=jnp.where(drop[:, 0], config.model.num_classes, batch['label']))
    elif cached:  # dropped captions become the empty caption's embedding, as in sampling
      cond = dict(text_bld=jnp.where(drop[..., None], frozen['null_text'], batch['text'].astype(jnp.float32)),
                  text_mask_bl=jnp.where(drop, frozen['null_text_mask'], batch['text_mask']))
    else:  # dropped captions become the empty caption, exactly what sampling's null branch sees
      tokens_bl = jnp.where(drop, null_tokens, batch['tokens'])
      token_mask_bl = jnp.where(drop, null_mask, batch['token_mask'])
      if text_encoder is not None:
        text_bld, text_mask_bl = text_encoder.apply(frozen['text'], tokens_bl, token_mask_bl)
        cond = dict(text_bld=jax.lax.stop_gradient(text_bld), text_mask_bl=text_mask_bl)
      else:
        cond = dict(tokens_bl=tokens_bl, token_mask_bl=token_mask_bl)
    noise = jax.random.normal(r_noise, x0.shape)
    tokens = packing.tokens_of(x0.shape[1:4], config.model.patch)
    shift = rf.size_shift(obj.time_shift, tokens, obj.get('shift_base_tokens'))
    t = rf.sample_time(r_time, b, mean=obj.time_mean, std=obj.time_std, shift=shift,
                       high_noise_fraction=obj.high_noise_fraction, high_noise_min=obj.high_noise_min)
    given = None
    if frame_conditioning_on(config):  # its own stream: the other draws stay those of plain training
      fcc = config.frame_conditioning
      r_mask, r_level = jax.random.split(jax.random.fold_in(rng, 1))
      mask_bt = frame_conditioning.sample_masks(r_mask, b, clip_frames, probability=fcc.probability,
                                                weights=dict(fcc.strategies), keyframe_rate=fcc.keyframe_rate)
      given = dict(mask_bt=jnp.broadcast_to(mask_bt, (b, x0.shape[1])))  # a still's: all False
      if fcc.noise_max > 0:  # lightly noised given frames: robust to imperfect (e.g. decoded) inputs
        given['t_b'] = jax.random.uniform(r_level, (b,), maxval=fcc.noise_max)
    return update(state, *loss_and_grads(state['params'], x0, noise, t, cond, given))

  def update(state, loss, grads):
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = optim.ema_update(state['ema'], params, config.ema_decay, state['step'])
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient skips the step: parameters, moments and EMA stay. (A finite
    # norm means every gradient is finite; clipped to it, Adam's update is finite too.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(step=state['step'] + 1, params=keep(params, state['params']),
                     opt_state=keep(opt_state, state['opt_state']), ema=keep(ema, state['ema']))
    step_metrics = {'train/loss': loss, 'train/grad_norm': grad_norm,
                    'train/param_norm': optax.global_norm(params),
                    'train/skipped_nonfinite': 1.0 - finite.astype(jnp.float32)}
    return new_state, step_metrics

  return train_step


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def sample_prompts(config) -> list:
  """What `write_samples` samples: `config.sample.prompts` (text) or `config.sample.labels` (classes)."""
  if dit.is_class_conditional(config.model):
    return list(config.sample.get('labels', ()))
  return list(config.sample.prompts)


def write_samples(config, graphdef, params, autoencoder, step: int, workdir: str, writer,
                  text_encoder=None) -> list[str]:
  """Samples `sample_prompts(config)` with the EMA parameters into WORKDIR/samples/STEP/."""
  model = sample.Model(config, graphdef, params, autoencoder, step, text_encoder)
  prompts = sample_prompts(config)
  videos = sample.generate(model, prompts, seed=config.seed)
  paths = []
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'samples', f'{step:08d}')
    names = [f'{i:02d}_' + (f'class_{p}' if isinstance(p, int) else p.replace(' ', '_')) for i, p in enumerate(prompts)]
    for name, v in zip(names, videos):
      for suffix in ('.mp4', '.gif'):
        paths.append(video.write(os.path.join(out_dir, name + suffix), v, fps=config.sample.fps))
    writer.videos(step, {f'samples/{name}': v for name, v in zip(names, videos)}, fps=config.sample.fps)
  return paths


RUN_FILES = ('checkpoints', 'samples', 'metrics.jsonl', 'config.json')  # + TensorBoard events


def prepare_workdir(workdir: str, overwrite: bool) -> None:
  """Creates `workdir`; with `overwrite`, deletes what an earlier run wrote there (nothing else)."""
  ensure_writable_dir(workdir, f'--workdir={workdir}')
  if overwrite and jax.process_index() == 0:
    for name in os.listdir(workdir):
      path = os.path.join(workdir, name)
      if name in RUN_FILES or name.startswith('events.out.tfevents.'):
        logging.warning('--overwrite: deleting %s', path)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('prepare_workdir')


# Fields that change neither the parameters nor the data: a run may resume with other values.
# A text encoder's `path` may move (a renamed copy); its width is checked when the DiT restores.
RESUMABLE_CHANGES = ('data_dir', 'worker_count', 'remat', 'attention_impl', 'sequence_parallel', 'dtype', 'path')


def check_workdir(config, workdir: str, has_checkpoint: bool) -> None:
  """Refuses to resume a run whose model, autoencoder, data or batching differ from this config's."""
  path = os.path.join(workdir, 'config.json')
  if not has_checkpoint or not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  for run in (old, new):  # runs from before the option used the byte encoder
    run['text_encoder'] = run.get('text_encoder') or {'kind': 'byte'}
  for section in ('model', 'autoencoder', 'data', 'text_encoder', 'packing', 'buckets'):  # what steps train on
    for key in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
      if key not in old.get(section, {}):  # a field added since that run: it had the default
        continue
      before, after = old.get(section, {}).get(key), new.get(section, {}).get(key)
      if before != after and key not in RESUMABLE_CHANGES:
        raise UsageError(f'--workdir={workdir} holds a run with config.{section}.{key}={before!r}, '
                         f'this config has {after!r}: use another workdir (or --overwrite)')


class StopSignal:
  """Turns SIGTERM/SIGINT into a request to checkpoint and exit after the current step.

  Multi-process runs use JAX's preemption sync point instead, so every host stops at one step.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.received:  # a second signal: stop now, the default way (a save in flight stays uncommitted)
      self.restore()
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name
    logging.warning('%s received: stopping after this step and its checkpoint (send it again to stop '
                    'at once)', self.received)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def curriculum_steps(config) -> int:
  """The steps that pack only `config.packing.curriculum_sizes` (0: no curriculum)."""
  return config.packing.get('curriculum_steps', 0) if packing_on(config) else 0


def curriculum_config(config):
  """`config` as the curriculum's steps see it: clips of `curriculum_sizes` only, so `packed_layout`'s
  attention window is their largest (the same math as the full config's, less work), and
  `curriculum_frame_conditioning` (if set) as the share of clips given frames."""
  first = copy.deepcopy(config)
  first.data.sizes = config.packing.curriculum_sizes
  first.packing.row_length = config.packing.get('curriculum_row_length') or config.packing.row_length
  if config.packing.get('curriculum_frame_conditioning') is not None and 'frame_conditioning' in config:
    first.frame_conditioning.probability = float(config.packing.curriculum_frame_conditioning)
  return first


def fixed_size_curriculum(config):
  """The config of the curriculum's steps as plain fixed-size batches, when its clips have one size; else None.

  Rows of clips of one size are a fixed-size batch: each clip attends to itself and to its own caption,
  the same math without segment masks, caption slots or per-token positions, and ~8% less time a step
  here (`experiments/packed_throughput.py --curriculum`: 0.54 s against 0.59 s). The batch holds as many
  clips as the curriculum's rows would: `batch_size` rows of `curriculum_row_length` tokens, up to
  `max_segments` clips each. Stills (fewer frames than the temporal patch) stay packed, and so do clips
  given frames under `loss_weighting='token'` (there a clip counts by its generated values, not as one)."""
  if not curriculum_steps(config):
    return None
  sizes = shapes_data.parse_sizes(config.packing.curriculum_sizes)
  if len(sizes) != 1 or sizes[0][0] % config.model.patch[0]:
    return None
  (size,) = sizes
  first = curriculum_config(config)
  if config.packing.get('loss_weighting', 'sample') == 'token' and frame_conditioning_on(first):
    return None
  tokens = packing.aligned(packing.tokens_of(size, config.model.patch), config.packing.get('block', 0) or 1)
  fixed = copy.deepcopy(first)
  fixed.packing.row_length = 0
  fixed.data.sizes = ''
  fixed.data.frames, fixed.data.height, fixed.data.width = size
  fixed.batch_size = config.batch_size * min(config.packing.max_segments, first.packing.row_length // tokens)
  return fixed


def packed_stream(config, source, sizes=None):
  """The packed rows training reads (`packing.PackedRows`): with `config.packing.curriculum_steps`,
  the first steps pack only clips of `curriculum_sizes`, then every size (`packing.Curriculum`); where
  those steps are fixed-size batches instead (`fixed_size_curriculum`), their rows are never read.
  `sizes`: each clip's (T, H, W), if already read (`pipeline.clip_sizes`)."""
  p = config.packing
  sizes = pipeline.clip_sizes(source) if sizes is None else sizes
  counts = [packing.tokens_of(size, config.model.patch) for size in sizes]
  rows = lambda examples=None, length=p.row_length: packing.PackedRows(  # noqa: E731
      source, counts, patch=config.model.patch, length=length, max_segments=p.max_segments,
      seed=config.data.seed, align=p.get('block', 0) or 1, examples=examples)
  stream = rows()
  logging.info('packing: %d rows of %d tokens per epoch, %.3f of their tokens used (not padding)',
               len(stream.epoch(0)), p.row_length, stream.epoch_efficiency(0))
  if not p.get('curriculum_steps'):
    return stream
  examples = curriculum_examples(config, sizes)
  fixed = fixed_size_curriculum(config)
  if fixed is not None:
    logging.info('curriculum: steps 0..%d train fixed-size batches of %d clips of %s (%d clips), then packed rows',
                 p.curriculum_steps, fixed.batch_size, p.curriculum_sizes, len(examples))
    return packing.Curriculum(None, p.curriculum_steps * config.batch_size, stream)
  first = rows(examples, curriculum_config(config).packing.row_length)
  logging.info('curriculum: steps 0..%d pack the %d clips of %s only, in rows of %d tokens (%.3f of them used)',
               p.curriculum_steps, len(examples), p.curriculum_sizes, first.length, first.epoch_efficiency(0))
  return packing.Curriculum(first, p.curriculum_steps * config.batch_size, stream)


def curriculum_examples(config, sizes) -> list[int]:
  """The indices of the clips of `config.packing.curriculum_sizes` (UsageError if there are none)."""
  first_sizes = set(shapes_data.parse_sizes(config.packing.curriculum_sizes))
  examples = [i for i, size in enumerate(sizes) if tuple(size) in first_sizes]
  if not examples:
    raise UsageError(f'config.packing.curriculum_sizes={config.packing.curriculum_sizes!r}: no training clip has '
                     'these sizes')
  return examples


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the final state.

  Stops early, after a committed checkpoint, on SIGTERM/SIGINT (preemption) and raises after
  `config.max_consecutive_nonfinite` skipped steps in a row. `overwrite` starts afresh instead.
  """
  sizes = validate_config(config, jax.device_count())
  is_main = jax.process_index() == 0
  prepare_workdir(workdir, overwrite)
  mngr = checkpoint.manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  start_step = mngr.latest_step()
  check_workdir(config, workdir, start_step is not None)
  if is_main:  # atomically: the other processes may be reading the previous one in check_workdir
    with open(os.path.join(workdir, 'config.json.tmp'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(os.path.join(workdir, 'config.json.tmp'), os.path.join(workdir, 'config.json'))

  # --- Mesh. ---
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_tuple(config.sharding_rules)
  logging.info('mesh %s over %d devices (%s)', sizes, jax.device_count(), jax.devices()[0].platform)

  # --- Input. ---
  if jax.process_count() > 1:  # process 0 builds a missing dataset, the others then open it
    if is_main:
      pipeline.data_source(config.data, 'train')
    multihost_utils.sync_global_devices('dataset ready')
  source = pipeline.SkipBadRecords(pipeline.data_source(config.data, 'train'), config.data.max_text_len,
                                   name=f'config.data.name={config.data.name!r} (train)',
                                   tokenize=text_lib.tokenizer_from_config(config))

  # --- Model, optimizer and sharded state. ---
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, abstract_state, shardings = state_shardings(config, mesh, tx)
  autoencoder = autoencoder_lib.make(config.autoencoder)  # a VAE's weights: frozen, replicated
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state['params']))
  logging.info('model: %.2fM parameters', num_params / 1e6)

  # Built outside the mesh: its feature network runs on each process's own device.
  evaluator = None
  if evaluator_lib.enabled(config) and (start_step or 0) < config.total_steps:
    evaluator = evaluator_lib.Evaluator(config, graphdef, autoencoder)
  elif config.get('eval') and config.eval.every_steps and pipeline.is_encoded(config.data):
    logging.info('evaluation off: config.data.name="encoded" holds latents, not clips')

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if start_step is None:
      state = create_state(config, autoencoder.channels, tx, shardings)
      start_step = 0
    else:
      logging.info('resuming from %s at step %d', mngr.directory, start_step)
      state = checkpoint.restore(mngr, start_step, abstract_state)

    # --- A frozen text encoder (T5), sharded by the same rules; None for the byte encoder. ---
    text_encoder = text_lib.from_config(config, mesh, rules)
    frozen = frozen_params(config, autoencoder, text_encoder)
    frozen = {k: v if k == 'text' else jax.device_put(v, sharding.replicated(mesh)) for k, v in frozen.items()}

    # --- The jitted step: state donated, shardings explicit. ---
    batch_shardings = {k: sharding.batch_sharding(mesh, nd, rules) for k, nd in batch_ndims(config).items()}
    step_fn = jit_train_step(config, graphdef, tx, autoencoder, mesh, shardings, batch_shardings, text_encoder,
                             frozen)
    # The curriculum's steps: the same step, its attention windows as long as the curriculum's largest
    # clip, or for clips of one size a fixed-size step (fixed_size_curriculum).
    first_steps, first_step_fn, first_iter = curriculum_steps(config), None, None
    fixed_first = fixed_size_curriculum(config)
    first_config = fixed_first or (curriculum_config(config) if first_steps else None)
    if first_steps > start_step:
      first_batch_shardings = {k: sharding.batch_sharding(mesh, nd, rules)
                               for k, nd in batch_ndims(first_config).items()}
      first_step_fn = jit_train_step(first_config, graphdef, tx, autoencoder, mesh, shardings,
                                     first_batch_shardings, text_encoder, frozen)

    # --- The loop. ---
    stream = source
    if packing_on(config):  # rows of several samples each, in a seeded order of their own
      clip_sizes = pipeline.clip_sizes(source)
      stream = packed_stream(config, source, clip_sizes)
      if fixed_first is not None and first_steps > start_step:
        first_source = pipeline.SkipBadRecords(
            pipeline.Subset(source.source, curriculum_examples(config, clip_sizes)), config.data.max_text_len,
            name=f'config.data.name={config.data.name!r} (train, {config.packing.curriculum_sizes})',
            tokenize=source.tokenize)
        first_iter = pipeline.make_iterator(first_source, global_batch_size=fixed_first.batch_size,
                                            seed=config.data.seed, max_text_len=config.data.max_text_len,
                                            start_step=start_step, process_index=jax.process_index(),
                                            process_count=jax.process_count(),
                                            worker_count=config.data.worker_count)
    elif buckets_on(config):  # each batch one size, its batch size set by config.buckets.tokens_per_step
      stream = buckets.BucketedBatches(source, pipeline.clip_sizes(source), patch=config.model.patch,
                                       tokens_per_step=config.buckets.tokens_per_step,
                                       multiple=math.lcm(data_parallel_size(config, sizes) * config.grad_accum_steps,
                                                         jax.process_count()),
                                       seed=config.data.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())
      logging.info('buckets: %s; %.0f tokens per step on average; %.3f of the clips in each epoch\'s batches',
                   buckets.describe(stream), buckets.mean_tokens_per_step(stream), stream.epoch_usage(0))
      if config.get('packing', {}).get('curriculum_steps'):
        logging.warning('config.packing.curriculum_steps=%d is for packed rows: buckets train every size from '
                        'step 0', config.packing.curriculum_steps)
      starved = buckets.starved(stream)
      if starved:
        logging.warning('buckets %s have fewer clips than one batch: never trained on', starved)
    # (After a fixed-size curriculum the rows start at its end: its rows are never read.)
    rows_from = max(start_step, first_steps) if first_iter is not None else start_step
    data_iter = pipeline.make_iterator(stream, global_batch_size=config.batch_size, seed=config.data.seed,
                                       max_text_len=config.data.max_text_len, start_step=rows_from,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       worker_count=config.data.worker_count, shuffle=not packing_on(config),
                                       batched=buckets_on(config))
    writer = metrics.Writer(workdir, enabled=is_main, resume_step=start_step)
    progress = metrics.Progress(config.total_steps, start_step)
    lr_schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
    stop = StopSignal()
    pending = []  # device metrics not yet read: no host sync per step
    window = []  # host metrics since the last log line
    window_tokens = 0  # real (not padding) patch tokens trained on since the last log line
    nonfinite_streak = 0
    check_every = min(config.log_every_steps, config.max_consecutive_nonfinite)
    logging.info('training steps %d..%d, global batch %s%s', start_step, config.total_steps,
                 'by bucket' if buckets_on(config) else config.batch_size,
                 f' ({fixed_first.batch_size} clips in the curriculum\'s steps)' if first_iter is not None else '')
    optim.log_ema_warmup(config.ema_decay, config.total_steps)
    done = start_step
    fixed_until = first_steps if first_iter is not None else 0
    try:
      for step in range(start_step, config.total_steps):
        fixed_step = step < fixed_until  # a fixed-size curriculum step
        if step == fixed_until:
          first_iter = None  # its readers end with it
        local = next(first_iter if fixed_step else data_iter)
        window_tokens += (stream.step_tokens(step, config.batch_size) if packing_on(config) and not fixed_step
                          else real_tokens(config, autoencoder, local) * jax.process_count())  # rows differ by process
        in_shardings = first_batch_shardings if step < first_steps else batch_shardings
        batch = {k: jax.make_array_from_process_local_data(in_shardings[k], local[k]) for k in in_shardings}
        state, step_metrics = (first_step_fn if step < first_steps else step_fn)(state, batch, frozen)
        pending.append(step_metrics)
        done = step + 1
        is_log_step = done % config.log_every_steps == 0 or done == config.total_steps
        if is_log_step or done % check_every == 0:
          for i, m in enumerate(jax.device_get(pending), start=done - len(pending) + 1):
            nonfinite_streak = nonfinite_streak + 1 if m['train/skipped_nonfinite'] else 0
            window.append(m)
            if nonfinite_streak == config.max_consecutive_nonfinite:
              mngr.wait_until_finished()
              raise NonFiniteError(
                  f'{nonfinite_streak} consecutive non-finite steps up to step {i} '
                  f'(config.max_consecutive_nonfinite={config.max_consecutive_nonfinite}); parameters were '
                  f'not updated by them, the last checkpoint (step {mngr.latest_step()}) holds the last good state')
          pending = []
        if is_log_step:
          means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          means['train/skipped_nonfinite'] *= len(window)  # a count, not a rate
          means['train/learning_rate'] = float(lr_schedule(done))
          means['data/skipped_records'] = source.skipped + (first_source.skipped if fixed_until else 0)  # this process
          rate = progress.report(done)
          if rate:  # per second of training, like steps/s (the first window, with the compile, has none)
            rate['tokens_per_sec'] = window_tokens * rate['steps_per_sec'] / len(window)
          window, window_tokens = [], 0
          writer.scalars(done, {**means, **{f'perf/{k}': v for k, v in rate.items()}})
          shown = {'loss': means['train/loss']}
          for key in ('train/skipped_nonfinite', 'data/skipped_records'):
            if means[key]:
              shown[key.split('/')[1]] = means[key]
          metrics.log_line(done, config.total_steps, shown, rate)
        preempted = stop.should_stop(done)
        if done % config.checkpoint_every_steps == 0 or done == config.total_steps or preempted:
          checkpoint.save(mngr, done, state)
        if evaluator and (done % config.eval.every_steps == 0 or done == config.total_steps) and not preempted:
          scalars, videos = evaluator(state['ema'], done, frozen, text_encoder)  # overlaps the checkpoint write
          writer.scalars(done, scalars)
          writer.videos(done, videos, fps=config.sample.fps)
          progress.exclude(scalars['eval/seconds'])  # steps/s and the ETA count training only
        if preempted:
          mngr.wait_until_finished()
          logging.info('stopped by %s at step %d; checkpoint committed, resume with the same command',
                       stop.received or 'preemption', done)
          return state

      if sample_prompts(config) and not stop.received:
        paths = write_samples(config, graphdef, state['ema'], autoencoder, done, workdir, writer, text_encoder)
        if paths:
          logging.info('samples written to %s', os.path.dirname(paths[0]))
    finally:
      stop.restore()
      mngr.wait_until_finished()  # never leave an async save half-written
      mngr.close()
      writer.close()
  return state
