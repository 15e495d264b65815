r"""The causal video VAE (`sora_jax/models/vae.py`) trained on the `shapes` world.

  python -m sora_jax.main --config=configs/vae_shapes.py --workdir=runs/vae

9 x 32 x 32 clips (1 + 4n frames: the first is encoded on its own) -> 3 x 8 x 8 x 16 latents
(x4 in time and space). Eval: `eval/psnr` and `eval/ssim` of the EMA model on the validation clips, and
original | reconstruction GIFs in WORKDIR/samples/. Sized for 15 minutes here (13.7 min, ~0.19 s/step,
plus ~20 s to build the dataset): eval/psnr 30.44 dB after the 4000 steps (README.md, "Training a VAE here").

Variants: `tiny`, a seconds-long smoke run (tests use it).
"""

import importlib.util
import os

import ml_collections

# configs/shapes.py by path: config files are loaded by path, and `configs` need not be importable.
_spec = importlib.util.spec_from_file_location('_shapes_config', os.path.join(os.path.dirname(__file__), 'shapes.py'))
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'configs/vae_shapes.py: unknown variant {arg!r}; expected "tiny"')
  base = shapes.get_config()
  config = ml_collections.ConfigDict()
  config.trainer = 'vae'
  config.seed = 0
  config.total_steps = 4000
  config.batch_size = 2  # twice the (noisier) steps of batch 4 in the same time: +1.2 dB at 4 minutes here
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 2
  config.ema_decay = 0.999
  config.fps = 8
  config.data = base.data
  config.data.update(frames=9, height=32, width=32)
  config.model = dict(
      patch_size=2,  # 2 x 2 pixels -> 12 channels first: 32 x 32 -> 16 x 16
      base_dim=32, z_dim=16,
      dim_mult=(1, 2, 2),
      spatial_downsample=(True, False),  # then one x2 spatial stage: 16 x 16 -> 8 x 8
      temporal_downsample=(True, True),  # x4 in time: 9 -> 3 latent frames
      num_res_blocks=1,
      shortcuts=True,  # parameter-free shortcuts (space/time <-> channels) around every stage
  )
  config.objective = dict(
      # An L1 term keeps this world's reconstructions black for hundreds of steps (most pixels are
      # black, and L1's pull toward the median holds the shapes back); MSE alone gets out.
      l1_weight=0.0,
      kl_weight=1e-4,
      # > 0: a per-frame PatchGAN from start_step on (hinge loss); the VAE adds weight x -D(recon).
      adversarial=dict(weight=0.0, start_step=1500, learning_rate=2e-4, channels=32),
  )
  config.optim = dict(learning_rate=2e-3, warmup_steps=100, final_lr_fraction=0.05, b1=0.9, b2=0.99,
                      weight_decay=0.0, grad_clip_norm=1.0)
  config.mesh = base.mesh
  config.sharding_rules = base.sharding_rules
  if arg == 'tiny':
    config.total_steps = 4
    config.batch_size = 8
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.data.update(num_train=64, num_validation=8, frames=5)
    # x2 in space (the 2 x 2 patch; the stage keeps its size), x2 in time
    config.model.update(base_dim=8, z_dim=4, dim_mult=(1, 2), spatial_downsample=(False,), temporal_downsample=(True,))
  return config
