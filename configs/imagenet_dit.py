r"""Class-conditional image DiTs of Peebles & Xie (2023), "Scalable Diffusion Models with Transformers".

Variants: `S/2`, `B/2`, `L/2`, `XL/2` (and the /4, /8 patch sizes of the paper), with `,mesh=NAME`
as in configs/shapes.py (`sora_jax.sharding.MESH_PRESETS`), e.g. `configs/imagenet_dit.py:B/4,mesh=fsdp`.
Each is the paper's model on a 32 x 32 x 4 latent (256 x 256 images through the SD VAE) with 1000
classes: the same widths, depths, heads and patch sizes, and the same trainable parameters and
forward FLOPs (tests/test_imagenet_dit.py checks both against the official implementation):

  model  width  depth  heads  parameters, p=2 (paper)  Gflops p=2 (paper)  p=4 (paper)     p=8 (paper)
  S      384    12     6      32,865,056 (33M)         6.056 (6.06)        1.413 (1.41)    0.358 (0.36)
  B      768    12     12     130,315,808 (130M)       23.005 (23.01)      5.565 (5.56)    1.418 (1.42)
  L      1024   24     16     457,840,672 (458M)       80.698 (80.71)      19.696 (19.70)  5.011 (5.01)
  XL     1152   28     16     674,834,720 (675M)       118.621 (118.64)    29.044 (29.05)  7.392 (7.39)

(Gflops as the paper counts them: multiply-adds, i.e. `dit.forward_flops_per_sample` / 2; p=2 gives
256 tokens.) The parameters are those the official code trains (its frozen sin-cos `pos_embed`
buffer aside, which its train.py log includes: 675,129,632 for XL/2).

The model is this repo's DiT with `conditioning='class'`: a label table with a null class (label
1000) for classifier-free guidance, self-attention with qkv biases and neither QK-norm nor RoPE,
fixed 2D sin-cos positions, MLP ratio 4 (GELU tanh), adaLN-Zero, and a final layer with "learned
sigma" outputs (2 x 4 channels, of which the rectified-flow loss uses the first 4, as SiT does:
the other 4 get no gradient and are kept only so that parameters and FLOPs equal the paper's).

The objective is SiT's (Ma et al. 2024) rather than DiT's DDPM: rectified flow, velocity
prediction, t ~ U(0, 1). Optimizer as DiT: AdamW, constant lr 1e-4, no weight decay, batch 256,
EMA 0.9999; 10% of labels dropped to the null class.

Data: ImageNet latents come with the VAE issue. Until then `data` names the embedded `shapes`
dataset at one 32 x 32 frame, whose records carry 84 classes (color x shape x direction,
`sora_jax.data.shapes.class_label`), and `autoencoder` is 'identity' (3 pixel channels) while the
model is built for `model.channels=4` latent channels: pass `--config.model.channels=3` (3/4 of
the patch-embedding and output weights; everything else as the paper) to train on pixels meanwhile:

  python -m sora_jax.main --config=configs/imagenet_dit.py:S/2 --workdir=runs/dit_s2 --config.model.channels=3
  python -m sora_jax.sample --workdir=runs/dit_s2 --prompt=17 --out=class17.gif   # a class index
"""

import importlib.util
import os

import ml_collections

from sora_jax import sharding

# configs/shapes.py by path: config files are loaded by path, and `configs` need not be importable.
_spec = importlib.util.spec_from_file_location('_shapes_config', os.path.join(os.path.dirname(__file__), 'shapes.py'))
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)

# name: (width, depth, heads), as in the paper's Table 1.
SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}
PATCHES = (2, 4, 8)
VARIANTS = tuple(f'{size}/{p}' for size in SIZES for p in PATCHES)

# shapes' rules plus the label table's rows: replicated (its columns, 'embed', follow fsdp).
SHARDING_RULES = shapes.SHARDING_RULES + (('classes', None),)

NUM_CLASSES = 1000
# Sampled at the end of training: the classes of the DiT repository's sample.py.
SAMPLE_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name, _, rest = (arg or '').partition(',')
  options = dict(item.partition('=')[::2] for item in rest.split(',') if item)
  if name not in VARIANTS or set(options) - {'mesh'} or options.get('mesh', 'dp') not in sharding.MESH_PRESETS:
    raise ValueError(f'configs/imagenet_dit.py: unknown variant {arg!r}; expected one of {list(VARIANTS)}, '
                     f'optionally followed by ",mesh=NAME" with NAME in {sorted(sharding.MESH_PRESETS)}, '
                     'e.g. --config=configs/imagenet_dit.py:XL/2')
  size, patch = name.split('/')
  width, depth, heads = SIZES[size]
  config = shapes.get_config()  # every field the trainer reads; the values below replace the small ones
  config.total_steps = 400_000  # the paper's DiT-XL/2 table entries are at 400k steps
  config.batch_size = 256
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.ema_decay = 0.9999

  # ImageNet 256 x 256 latents come with the VAE issue; `shapes` frames stand in (see above).
  config.data.update(frames=1, height=32, width=32, object_size=12)
  config.autoencoder = dict(kind='identity')

  config.frame_conditioning.probability = 0.0  # single images: nothing to give
  config.model = dict(
      conditioning='class', num_classes=NUM_CLASSES,
      channels=4,  # the SD VAE's latent channels; None: the autoencoder's
      patch=(1, int(patch), int(patch)),  # (t, h, w): one frame
      width=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
      qk_norm=False, qkv_bias=True, rope=False,  # the paper's attention
      absolute_positions=True,  # fixed 2D sin-cos positions, DiT's table
      learn_sigma=True,  # 2 x channels outputs, the second half unused (see the docstring)
      dtype='float32',  # compute dtype; parameters stay float32
      attention_impl='xla',  # or 'cudnn' on GPU
      sequence_parallel='all_to_all',
      remat='none',
  )
  config.objective = dict(
      prediction='velocity',
      min_t=0.05,  # unused by velocity prediction
      time_mean=0.0, time_std=1.0, time_shift=1.0, shift_base_tokens=0,
      high_noise_fraction=1.0, high_noise_min=0.0,  # every t from U(0, 1), as SiT
      caption_dropout=0.1,  # for class models: the share of labels replaced by the null class
  )
  config.optim = dict(
      learning_rate=1e-4, warmup_steps=0, final_lr_fraction=1.0,  # constant, as DiT
      b1=0.9, b2=0.999, weight_decay=0.0, grad_clip_norm=1e9,  # DiT clips nothing: a bound never reached
  )
  config.sample = dict(
      num_steps=250, guidance_scale=1.5, time_shift=1.0, fps=1, max_tokens=0,  # DiT's 250 steps and FID guidance 1.5
      stochasticity=0.0,  # the ODE
      labels=SAMPLE_LABELS,  # written to WORKDIR/samples/ at the end of training
      prompts=(),  # unused by a class-conditional model
  )
  config.mesh = sharding.MESH_PRESETS[options.get('mesh', 'dp')]
  config.sharding_rules = SHARDING_RULES
  return config
