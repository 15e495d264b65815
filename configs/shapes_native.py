r"""Shapes at native sizes, packed: clips of 1 (images), 8 and 16 frames, square, wide and tall.

  python -m sora_jax.main --config=configs/shapes_native.py --workdir=runs/native
  python -m sora_jax.sample --workdir=runs/native --prompt="a red circle moving right" --height=32 --width=56 --out=wide.gif

Every clip keeps its own size (nothing cropped or padded away): the tokens of up to 3 clips share
a row of `packing.row_length` = 224 tokens, the largest clip's (sora_jax/data/packing.py), attention
stays inside each clip, and each clip has its own caption, timestep and time shift. Rows as long as
the largest clip keep attention dense and cheap (one [224, 224] masked attention per row) and still
pack 0.97-0.98 of their tokens with real ones; 3 caption slots a row keep the text encoder's work
near a fixed-size batch's. Each clip starts at a multiple of `packing.block` = 16 tokens, so
cross-attention works on 16-query blocks of one clip against its own caption
(layers.PackedLayout). Patches are 2 x 8 x 8 like configs/shapes.py; an image (a one-frame clip)
trains and samples as a still clip of 2 identical frames (`dit.repeat_stills`). The first
`packing.curriculum_steps` = 1400 steps train on 8x32x32 clips only, where direction is learned
fastest (27 a step, what 9 rows of 192 tokens hold; clips of one size need no packing, so these steps
are plain fixed-size batches: `train.fixed_size_curriculum`), then every size (~16 clips a step); 0.6 of the clips
are given some frames in those steps (frame conditioning speeds up direction), 0.2 after them (given
frames show the shape and cost shape accuracy). `tiny` is a seconds-long smoke run.

For comparison, aspect-ratio/duration buckets instead of packing (each batch one size, about 2048
tokens per step; sora_jax/data/buckets.py):
  python -m sora_jax.main --config=configs/shapes_native.py --workdir=runs/buckets \
      --config.packing.row_length=0 --config.buckets.tokens_per_step=2048
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location('_shapes_config', os.path.join(os.path.dirname(__file__), 'shapes.py'))
shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes)


def get_config(arg: str | None = None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'configs/shapes_native.py: unknown variant {arg!r}; expected none or "tiny"')
  config = shapes.get_config('tiny' if arg == 'tiny' else None)
  config.data.sizes = '1x32x32,8x32x32,8x32x56,8x56x32,16x32x32,16x32x56,16x56x32'
  config.data.num_train = 57344  # ~8,200 clips of each size: the curriculum's are not repeated much
  config.model.patch = (2, 8, 8)  # as the fixed-size default; an image trains as a still 2-frame clip
  # RoPE's base: at 10000 an axis's 5 frequencies (head dim 32) are 1, 0.16, 0.025, ... radians a patch:
  # the fastest wraps at 6 patches and the slow ones hardly change over 7, and tall and wide samples drew
  # a second object at the far edge (21 of 36 tall). 100 spreads them over 1 to 0.025 (9-11 of 36; README).
  config.model.rope_theta = 100.0
  # Byte embeddings start at scale 1 (T5's), not 0.02: with 0.02 the text blocks' first outputs, which
  # mix the caption's bytes, outweigh each byte's own identity, and seed 0 drew red and green at chance
  # to the end (cyan and magenta partly); at 1.0 every color is right by step 1000 (README, "Native sizes").
  config.model.text_embedding_std = 1.0
  config.packing.update(row_length=224, max_segments=3, loss_weighting='sample', block=16)
  # A size curriculum: the first 1400 steps pack 8 x 32 x 32 clips only (3 a row, 27 a step), then
  # every size. Short clips teach motion in the fewest tokens: without this stage direction stays
  # at chance after 1800 steps of the mix. Direction appears around steps 600-1100 of one size (at 32
  # clips a step; when, depends on the data) and the mix hardly teaches it after: so a curriculum long
  # enough. Frame conditioning speeds up learning direction in the curriculum; afterwards it costs
  # shape accuracy (given frames show the shape), so fewer clips are given frames.
  # Its rows hold 3 clips of 64 tokens and no padding: 192 tokens (a second compile, ~14% fewer tokens a step).
  config.packing.update(curriculum_steps=1400, curriculum_sizes='8x32x32', curriculum_frame_conditioning=0.6,
                        curriculum_row_length=192)
  config.batch_size = 9  # rows: 2016 tokens per step
  # Below configs/shapes.py's 1.5e-3: with it this mix never learned direction (16x32x56: 0.27 at the
  # end); 1e-3 learns it but leaves wide/tall shape under 0.6 (0.57); 1.25e-3 has both.
  config.optim.learning_rate = 1.25e-3
  # Timestep shift by size (more noise for more tokens, e.g. 64: an 8 x 32 x 32 clip keeps time_shift)
  # measured no gain here and slows direction: off.
  config.objective.shift_base_tokens = 0
  config.frame_conditioning.probability = 0.2  # after the curriculum; 0.6 during it
  config.eval.every_steps = 0  # evaluation reads fixed-size clips: not yet for packed runs
  config.sample.max_tokens = 1024
  if arg != 'tiny':
    config.total_steps = 2500  # 22.9 minutes here with the dataset built (~45 s to build it), ~2 steps/s
  else:
    config.data.update(sizes='1x16x16,2x16x16,2x16x24,2x24x16', frames=2, height=16, width=16, object_size=6,
                       num_train=64)
    config.packing.update(row_length=32, max_segments=8, block=4, curriculum_steps=1, curriculum_sizes='2x16x16',
                          curriculum_row_length=16)
    config.batch_size = 8  # rows: one per device of the tests' 8
    config.objective.shift_base_tokens = 8
  return config
