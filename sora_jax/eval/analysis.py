"""Notebook helpers for a workdir: metrics curves, loss per timestep, attention maps, parameter tables.

  model = sample.load('runs/shapes')                         # EMA parameters
  curves = analysis.read_metrics('runs/shapes')              # {'train/loss': (steps, values), ...}
  analysis.timestep_losses(model, videos, prompts)           # (t [K], loss [K])
  analysis.attention_maps(model, video, prompt, t=0.5, block=0)   # [heads, tokens, tokens]
  analysis.parameter_table(model.params)                     # rows (path, shape, dtype, sharding)

Used by experiments/notebooks/analysis.ipynb.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import pretrained, sample
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.eval import evaluator


def read_metrics(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {name: (steps, values)}; rows may hold any subset of names (train vs eval)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  curves: dict[str, tuple[list, list]] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        for k, v in row.items():
          if k != 'step':
            curves.setdefault(k, ([], []))
            curves[k][0].append(row['step'])
            curves[k][1].append(v)
  return {k: (np.array(s), np.array(v, np.float64)) for k, (s, v) in curves.items()}


def timestep_losses(model: sample.Model, videos_bthwc, prompts: list, num_buckets: int = 16,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The training objective of `model` on clips at the centres of `num_buckets` equal t buckets."""
  cfg = model.config
  loss_at = evaluator.timestep_loss_fn(cfg, model.graphdef, model.autoencoder)
  videos = np.asarray(videos_bthwc)
  shape = model.autoencoder.latent_shape(*videos.shape[1:4])
  noise = jax.random.normal(jax.random.key(seed), (len(videos), *shape, model.autoencoder.channels))
  cond, _ = sample.conditioning(cfg, list(prompts), model.text_encoder)
  ts = evaluator.bucket_centres(num_buckets)
  return ts, evaluator.timestep_losses(loss_at, model.params, model.autoencoder.params, videos, cond, noise, ts)


def attention_maps(model: sample.Model, video_thwc, prompt, *, t: float = 0.5, block: int = 0,
                   seed: int = 0) -> np.ndarray:
  """Self-attention probabilities [heads, tokens, tokens] of `block` when denoising `video_thwc`
  (uint8 [T, H, W, 3]) noised to level t under `prompt`. Tokens are t-major over the patch grid."""
  cfg = model.config
  net = nnx.merge(model.graphdef, model.params)
  attn = net.blocks[block].self_attn
  attn.sow_weights = True
  x0 = model.autoencoder.encode(model.autoencoder.params, jnp.asarray(video_thwc, jnp.float32)[None] / 127.5 - 1.0)
  noise = jax.random.normal(jax.random.key(seed), x0.shape)
  t_b = jnp.full((1,), t, jnp.float32)
  cond, _ = sample.conditioning(cfg, [prompt], model.text_encoder)
  net(rf.interpolate(x0, noise, t_b), t_b, **cond)
  weights = nnx.pop(attn, nnx.Intermediate)['attention_weights'].get_value()[0]  # the one call's
  attn.sow_weights = False
  return np.asarray(weights[0])


def parameter_table(params) -> list[tuple[str, tuple, str, str]]:
  """(path, shape, dtype, sharding) per parameter array, in path order; the total is
  sum(math.prod(shape))."""
  rows = []
  flat = pretrained.flatten(params.to_pure_dict() if hasattr(params, 'to_pure_dict') else params)
  for path, x in sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))):
    spec = getattr(getattr(x, 'sharding', None), 'spec', None)
    rows.append(('.'.join(map(str, path)), tuple(x.shape), str(x.dtype), str(spec) if spec is not None else '-'))
  return rows


def count_parameters(params) -> int:
  return sum(math.prod(shape) for _, shape, _, _ in parameter_table(params))
