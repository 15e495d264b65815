r"""Train the causal video VAE (`models/vae.py`) on clips: reconstruction + KL.

  python -m sora_jax.main --config=configs/vae_shapes.py --workdir=runs/vae

The DiT trainer's pieces, for another model: the same data pipeline (the order a function of the
step), parameters and optimizer state created on the mesh, async Orbax checkpoints of the train
state and EMA, metrics.jsonl and TensorBoard, progress with ETA, resume after a crash or SIGTERM.

Loss per clip: `l1_weight` x L1 + MSE of the reconstruction (pixels in [-1, 1]) from a posterior sample, plus
`kl_weight` x the KL divergence to N(0, 1) per latent value; optionally (`objective.adversarial.weight`
> 0) an adversarial term: a per-frame PatchGAN discriminator (hinge loss, its own AdamW) trained from
step `adversarial.start_step` on, and `weight` x -D(reconstruction) added to the VAE's loss from then. Every `eval_every_steps` the EMA
model reconstructs the validation clips from the posterior mean: `eval/psnr` (dB, pixels in
[0, 1]) and `eval/ssim` go to metrics.jsonl, and reconstructions next to their originals to WORKDIR/samples/.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from sora_jax import UsageError, checkpoint, metrics, optim, sharding, video
from sora_jax.data import pipeline
from sora_jax.models import vae

IS_VAE = lambda config: config.get('trainer', 'dit') == 'vae'  # noqa: E731


def vae_config(config) -> vae.VAEConfig:
  m = config.model
  spatial = m.get('spatial_downsample')
  return vae.VAEConfig(base_dim=m.base_dim, z_dim=m.z_dim, dim_mult=tuple(m.dim_mult),
                       num_res_blocks=m.num_res_blocks, temporal_downsample=tuple(m.temporal_downsample),
                       spatial_downsample=None if spatial is None else tuple(spatial),
                       patch_size=m.get('patch_size', 1), shortcuts=m.get('shortcuts', False),
                       decoder_base_dim=m.get('decoder_base_dim'))


def validate_config(config, num_devices: int) -> None:
  for field in ('total_steps', 'batch_size', 'log_every_steps', 'checkpoint_every_steps', 'eval_every_steps'):
    value = config[field]
    if not isinstance(value, int) or value <= 0:
      raise UsageError(f'config.{field}={value!r}: must be a positive integer')
  try:
    cfg = vae_config(config)
    cfg.latent_shape(config.data.frames, config.data.height, config.data.width)
  except ValueError as e:
    raise UsageError(f'config.model / config.data: {e}') from None
  try:
    sizes = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  adv = config.objective.get('adversarial', {})
  if adv.get('weight', 0.0) < 0:
    raise UsageError(f'config.objective.adversarial.weight={adv.weight!r}: must be >= 0 (0: no adversarial term)')
  if min(config.data.height, config.data.width) < 11:
    raise UsageError(f'config.data.height/width {config.data.height}x{config.data.width}: eval/ssim needs frames '
                     'of at least 11 x 11 pixels')
  if adversarial_on(config):
    if not isinstance(adv.get('start_step'), int) or adv.start_step < 0:
      raise UsageError(f'config.objective.adversarial.start_step={adv.get("start_step")!r}: a step >= 0')
    if config.data.height % 4 or config.data.width % 4:
      raise UsageError(f'config.objective.adversarial: the discriminator strides by 4; config.data.height/width '
                       f'{config.data.height}x{config.data.width} must be multiples of 4')
  dp = sizes['data'] * sizes['fsdp']
  if config.batch_size % (dp * jax.process_count()):
    raise UsageError(f'config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} '
                     f'and the {jax.process_count()} processes')


def check_resume(config, workdir: str, start_step) -> None:
  """Refuses, before anything is written, to resume a checkpoint whose state the config would not
  match: one with (without) a discriminator under a config without (with) the adversarial term."""
  path = os.path.join(workdir, 'config.json')
  if start_step is None or not os.path.exists(path):
    return
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    previous = ml_collections.ConfigDict(__import__('json').load(f))
  was, now = adversarial_on(previous), adversarial_on(config)
  same_disc = not now or previous.objective.adversarial.channels == config.objective.adversarial.channels
  if was != now or not same_disc:
    raise UsageError(f'config.objective.adversarial: the checkpoint in {workdir} (step {start_step}) was trained '
                     f'{"with" if was else "without"} the adversarial term'
                     f'{f" ({previous.objective.adversarial.channels} channels)" if was else ""}; resume with the '
                     'same setting, or train in a new workdir')


def psnr(x, y):
  """Peak signal-to-noise ratio (dB) per clip of videos in [-1, 1], as pixels in [0, 1]."""
  mse = jnp.mean(((x - y) / 2.0) ** 2, axis=tuple(range(1, x.ndim)))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def ssim(x, y, *, window: int = 11, sigma: float = 1.5):
  """Structural similarity per clip of videos [b, T, H, W, C] in [-1, 1], as pixels in [0, 1]:
  Wang et al. (2004) with an 11 x 11 Gaussian window (sigma 1.5), 'valid' borders (as TensorFlow's
  tf.image.ssim), averaged over positions, channels and frames."""
  x, y = (x + 1.0) / 2.0, (y + 1.0) / 2.0
  taps = np.exp(-0.5 * ((np.arange(window) - (window - 1) / 2) / sigma) ** 2)
  taps /= taps.sum()

  def band(n):  # [n - window + 1, n]: row i holds the taps at columns i .. i + window - 1
    g = np.zeros((n - window + 1, n), np.float32)
    for i in range(n - window + 1):
      g[i, i:i + window] = taps
    return g

  gh, gw = band(x.shape[2]), band(x.shape[3])
  blur = lambda v: jnp.einsum('bthwc,ph,qw->btpqc', v, gh, gw)  # noqa: E731 - separable, 'valid'
  c1, c2 = 0.01**2, 0.03**2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x**2
  var_y = blur(y * y) - mu_y**2
  cov = blur(x * y) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=tuple(range(1, s.ndim)))


class PatchDiscriminator(nnx.Module):
  """Per-frame PatchGAN: videos [b, T, H, W, 3] in [-1, 1] -> real/fake logits [b, T, H/4, W/4, 1]."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv1 = vae.Conv2d(3, channels, 4, stride=2, rngs=rngs)
    self.conv2 = vae.Conv2d(channels, 2 * channels, 4, stride=2, rngs=rngs)
    self.conv3 = vae.Conv2d(2 * channels, 2 * channels, 3, rngs=rngs)
    self.out = vae.Conv2d(2 * channels, 1, 3, rngs=rngs)

  def __call__(self, x_bthwc):
    x = jax.nn.leaky_relu(self.conv1(x_bthwc), 0.2)
    x = jax.nn.leaky_relu(self.conv2(x), 0.2)
    x = jax.nn.leaky_relu(self.conv3(x), 0.2)
    return self.out(x)


def adversarial_on(config) -> bool:
  return config.objective.get('adversarial', {}).get('weight', 0.0) > 0


def discriminator(config, seed: int = 0) -> PatchDiscriminator:
  return PatchDiscriminator(config.objective.adversarial.channels, rngs=nnx.Rngs(seed))


def discriminator_optimizer(config) -> optax.GradientTransformation:
  adv = config.objective.adversarial
  return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm),
                     optax.adamw(adv.learning_rate, b1=0.5, b2=0.9, weight_decay=0.0))


def make_train_step(config, graphdef, tx, disc_graphdef=None, disc_tx=None):
  adv = config.objective.get('adversarial', {})
  adversarial = adversarial_on(config)

  def loss_fn(params, x, rng, disc, active):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = model.decode_unclipped(z)
    l1 = jnp.mean(jnp.abs(recon - x))
    mse = jnp.mean((recon - x) ** 2)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    loss = config.objective.get('l1_weight', 1.0) * l1 + mse + config.objective.kl_weight * kl
    parts = {'train/l1': l1, 'train/mse': mse, 'train/kl': kl}
    if adversarial:  # the generator's hinge term: push D(reconstruction) up (D itself fixed here)
      g_adv = -jnp.mean(nnx.merge(disc_graphdef, disc)(recon))
      loss = loss + jnp.where(active, adv.weight, 0.0) * g_adv
      parts['train/adversarial'] = g_adv
    return loss, (parts, recon)

  def disc_loss_fn(disc, x, recon):
    d = nnx.merge(disc_graphdef, disc)
    real, fake = d(x), d(jax.lax.stop_gradient(recon))
    loss = jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
    return loss, {'train/disc_loss': loss, 'train/disc_real': jnp.mean(real), 'train/disc_fake': jnp.mean(fake)}

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(config.seed), state['step'])
    x = batch['video'].astype(jnp.float32) / 127.5 - 1.0
    active = state['step'] >= adv.get('start_step', 0) if adversarial else False
    (loss, (parts, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], x, rng, state.get('disc'), active)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = optim.ema_update(state['ema'], params, config.ema_decay, state['step'])
    new_state = dict(step=state['step'] + 1, params=params, opt_state=opt_state, ema=ema)
    if adversarial:  # the discriminator learns from start_step on (before: left as initialised)
      (_, d_parts), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(state['disc'], x, recon)
      d_updates, d_opt = disc_tx.update(d_grads, state['disc_opt_state'], state['disc'])
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)  # noqa: E731
      new_state.update(disc=keep(optax.apply_updates(state['disc'], d_updates), state['disc']),
                       disc_opt_state=keep(d_opt, state['disc_opt_state']))
      parts.update(d_parts)
    return new_state, {'train/loss': loss, 'train/grad_norm': optax.global_norm(grads), **parts}

  return train_step


def make_eval_step(graphdef):
  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    x = batch['video'].astype(jnp.float32) / 127.5 - 1.0
    recon = model.decode(model.encode(x)[0])
    return psnr(recon, x), ssim(recon, x), recon

  return eval_step


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Trains the VAE of `config` in `workdir`, resuming from its latest checkpoint; returns the state."""
  from sora_jax import train  # pylint: disable=g-import-not-at-top  (shared workdir handling)
  validate_config(config, jax.device_count())
  is_main = jax.process_index() == 0
  train.prepare_workdir(workdir, overwrite)
  mngr = checkpoint.manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  start_step = mngr.latest_step()
  train.check_workdir(config, workdir, start_step is not None)  # same model and data, or a one-line error
  check_resume(config, workdir, start_step)
  if is_main:
    with open(os.path.join(workdir, 'config.json.tmp'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(os.path.join(workdir, 'config.json.tmp'), os.path.join(workdir, 'config.json'))

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_tuple(config.sharding_rules)
  cfg = vae_config(config)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: vae.VideoVAE(cfg, rngs=nnx.Rngs(0))))
  params_shape = abstract_params.to_pure_dict()
  logical = nnx.get_partition_spec(abstract_params).to_pure_dict()
  param_shardings = sharding.logical_to_shardings(logical, params_shape, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, params_shape)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh))
  shardings = dict(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                   ema=param_shardings)
  disc_graphdef = disc_tx = None
  if adversarial_on(config):  # small: replicated
    disc_graphdef, abstract_disc = nnx.split(nnx.eval_shape(lambda: discriminator(config)))
    disc_tx = discriminator_optimizer(config)
    disc_shape = abstract_disc.to_pure_dict()
    shardings.update(disc=jax.tree.map(lambda _: sharding.replicated(mesh), disc_shape),
                     disc_opt_state=jax.tree.map(lambda _: sharding.replicated(mesh),
                                                 jax.eval_shape(disc_tx.init, disc_shape)))
  logging.info('VAE: %.2fM parameters', sum(math.prod(x.shape) for x in jax.tree.leaves(params_shape)) / 1e6)
  optim.log_ema_warmup(config.ema_decay, config.total_steps)

  def init():
    params = nnx.state(vae.VideoVAE(cfg, rngs=nnx.Rngs(config.seed))).to_pure_dict()
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)
    if disc_graphdef is not None:
      disc = nnx.state(discriminator(config, config.seed + 1)).to_pure_dict()
      state.update(disc=disc, disc_opt_state=disc_tx.init(disc))
    return state

  batch_sharding = {'video': sharding.batch_sharding(mesh, 5, rules)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if start_step is None:
      state = jax.jit(init, out_shardings=shardings)()
      start_step = 0
    else:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              jax.eval_shape(init), shardings)
      state = checkpoint.restore(mngr, start_step, abstract)
      logging.info('resuming at step %d', start_step)
    step_fn = jax.jit(make_train_step(config, graphdef, tx, disc_graphdef, disc_tx), in_shardings=(shardings, batch_sharding),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(param_shardings, batch_sharding))
    source = pipeline.SkipBadRecords(pipeline.data_source(config.data, 'train'), config.data.max_text_len)
    data_iter = pipeline.make_iterator(source, global_batch_size=config.batch_size, seed=config.data.seed,
                                       max_text_len=config.data.max_text_len, start_step=start_step,
                                       process_index=jax.process_index(), process_count=jax.process_count())
    eval_source = pipeline.SkipBadRecords(pipeline.data_source(config.data, 'validation'), config.data.max_text_len)
    writer = metrics.Writer(workdir, enabled=is_main, resume_step=start_step)
    progress = metrics.Progress(config.total_steps, start_step)
    stop = train.StopSignal()
    window = []
    done = start_step
    try:
      for step in range(start_step, config.total_steps):
        local = next(data_iter)
        batch = {'video': jax.make_array_from_process_local_data(batch_sharding['video'], local['video'])}
        state, step_metrics = step_fn(state, batch)
        window.append(step_metrics)
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.total_steps:
          rows = jax.device_get(window)
          window = []
          means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
          rate = progress.report(done)
          writer.scalars(done, {**means, **{f'perf/{k}': v for k, v in rate.items()}})
          metrics.log_line(done, config.total_steps, {'loss': means['train/loss']}, rate)
        if done % config.eval_every_steps == 0 or done == config.total_steps:
          score = evaluate(config, eval_fn, state['ema'], eval_source, batch_sharding, workdir, done, writer)
          logging.info('step %d: eval/psnr %.2f dB', done, score)
        preempted = stop.should_stop(done)
        if done % config.checkpoint_every_steps == 0 or done == config.total_steps or preempted:
          checkpoint.save(mngr, done, state)
        if preempted:
          break
    finally:
      stop.restore()
      mngr.wait_until_finished()
      mngr.close()
      writer.close()
  return state


def evaluate(config, eval_fn, params, source, batch_sharding, workdir, step, writer) -> float:
  """Mean PSNR (returned) and SSIM of the EMA model on the whole validation split; writes a few
  reconstructions."""
  scores, ssims, shown = [], [], None
  b = config.batch_size
  for start in range(0, len(source), b):
    local = [source[i]['video'] for i in range(start, min(start + b, len(source)))]
    n = len(local)
    local += [local[-1]] * (b - n)  # a full batch: one compiled shape
    batch = {'video': jax.device_put(np.stack(local), batch_sharding['video'])}
    score, structure, recon = eval_fn(params, batch)
    scores.append(np.asarray(score)[:n])
    ssims.append(np.asarray(structure)[:n])
    if shown is None:
      shown = (np.stack(local[:2]), video.to_uint8(np.asarray(recon)[:2]))
  value = float(np.mean(np.concatenate(scores)))
  writer.scalars(step, {'eval/psnr': value, 'eval/ssim': float(np.mean(np.concatenate(ssims)))})
  if jax.process_index() == 0 and shown is not None:
    side_by_side = np.concatenate([shown[0], shown[1]], axis=3)  # original | reconstruction
    for i, clip in enumerate(side_by_side):
      video.write(os.path.join(workdir, 'samples', f'{step:08d}', f'reconstruction_{i}.gif'), clip,
                  fps=config.get('fps', 8), upscale=4)
  return value
