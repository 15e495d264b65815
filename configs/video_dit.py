r"""Reference text-to-video DiTs at the field's sizes, each with the TPU slice it is planned for.

  python experiments/benchmark.py --config=configs/video_dit.py:2B --analyze_only --topology=v5p:4x4x2

Variants: `700M`, `2B`, `8B`, `14B` (parameters counted by `--analyze_only`: `num_params`). Each
sets `config.aot_topology`, the slice whose ahead-of-time compile of the real train step fits in
HBM with its batch (about 1-2 samples per chip per step), micro-batches, remat policy and mesh;
`experiments/aot_table.md` has the per-device memory of each.

There is no VAE yet, so these are pixel-space video DiTs: large spacetime patches (4 x 16 x 16 x 3
values per token) on 32-64 frame clips at 256-512 px give 2k-16k tokens per sample, like the latent
token counts of published video models. The data is `shapes` rendered at that clip size, the only
dataset there is; real video data comes with the VAE issue. The block is this repo's DiT block
(self-attention, cross-attention to the text, 4x MLP, per-block adaLN-Zero: about 22 width^2
parameters per block), so widths and depths are a little below those of published models of the
same parameter count, whose blocks share their adaLN and use narrower MLPs.

  variant  params  width  depth  heads  clip (T x H x W)  tokens  slice (chips)    batch  micro-  remat  GiB/chip
                                                                                            batches        (AOT)
  700M     0.69B   1152   22     9      32 x 256 x 256    2048    v5p:2x2x2 (8)    16     1       dots   8.4
  2B       2.05B   1792   28     14     64 x 256 x 256    4096    v5p:4x4x2 (32)   64     2       full   16.2
  8B       8.03B   3072   38     24     32 x 512 x 512    8192    v5p:4x4x4 (64)   64     4       full   22.3
  14B      14.24B  4096   38     32     64 x 512 x 512    16384   v5p:4x4x8 (128)  128    8       full   42.5

GiB/chip: the compiled step's total per chip (state, batch and XLA's temporaries) of the 95.7 GiB
that libtpu budgets on a v5p, from the ahead-of-time compile. All leave room: `--sweep` (longer
clips per remat policy) shows what it buys.

All compute in bfloat16 (float32 parameters, moments and EMA), with FSDP over the slice (mesh
fsdp=-1); 8B and 14B add tensor parallelism (4 and 8 ways), which splits each sample's attention
(heads x tokens^2 scores: XLA's attention materialises them) and MLP activations. On a TPU,
`--config.model.attention_impl=splash` (the Pallas flash kernel; `experiments/launch/tpu_pod.sh`
sets it) never stores the scores: memory then grows with the tokens, not their square (README,
"On a TPU"); the figures above are XLA's attention.
Override any field as usual, e.g. `--config.grad_accum_steps=2 --config.model.remat=dots`.
"""

import importlib.util
import os

import ml_collections

# configs/shapes.py by path: config files are loaded by path, and `configs` need not be importable.
_spec = importlib.util.spec_from_file_location('_shapes_config', os.path.join(os.path.dirname(__file__), 'shapes.py'))
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)

# name: (width, depth, heads, (frames, height, width), topology, mesh, batch, grad_accum, remat)
VARIANTS = {
    '700M': (1152, 22, 9, (32, 256, 256), 'v5p:2x2x2', dict(data=1, fsdp=-1, tensor=1, sequence=1), 16, 1, 'dots'),
    '2B': (1792, 28, 14, (64, 256, 256), 'v5p:4x4x2', dict(data=1, fsdp=-1, tensor=1, sequence=1), 64, 2, 'full'),
    '8B': (3072, 38, 24, (32, 512, 512), 'v5p:4x4x4', dict(data=1, fsdp=-1, tensor=4, sequence=1), 64, 4, 'full'),
    '14B': (4096, 38, 32, (64, 512, 512), 'v5p:4x4x8', dict(data=1, fsdp=-1, tensor=8, sequence=1), 128, 8, 'full'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f'configs/video_dit.py: unknown variant {arg!r}; expected one of {list(VARIANTS)}, '
                     'e.g. --config=configs/video_dit.py:2B')
  width, depth, heads, (frames, height, width_px), topology, mesh, batch, accum, remat = VARIANTS[arg]
  config = shapes.get_config()  # every field the trainer reads; the values below replace the small ones
  config.aot_topology = topology  # the TPU slice this config is planned (and AOT-checked) for
  config.total_steps = 200_000
  config.batch_size = batch  # global; `grad_accum_steps` micro-batches per step
  config.grad_accum_steps = accum
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.ema_decay = 0.9999

  config.data.update(frames=frames, height=height, width=width_px, object_size=height * 3 // 8,
                     num_train=4096, num_validation=128, max_text_len=64)

  config.model.update(
      patch=(4, 16, 16), width=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
      text_width=768, text_depth=4, text_heads=6,  # the byte encoder, until a pretrained one
      dtype='bfloat16', remat=remat,
  )
  config.optim.update(learning_rate=1e-4, warmup_steps=2000, final_lr_fraction=0.1, b1=0.9, b2=0.999,
                      weight_decay=0.0, grad_clip_norm=1.0)
  config.sample.update(num_steps=50, guidance_scale=5.0, fps=16, max_tokens=0)  # 0: no size limit
  config.mesh = mesh
  config.sharding_rules = shapes.SHARDING_RULES
  return config
