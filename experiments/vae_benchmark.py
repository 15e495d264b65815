r"""Wan 2.1 VAE import: error against diffusers and encode/decode throughput, one JSON line.

  python experiments/vae_benchmark.py --path=/models/Wan2.1-T2V-1.3B-Diffusers/vae --frames=17 --size=256
  python experiments/vae_benchmark.py --random --frames=17 --size=128

`--random` saves a randomly initialised VAE of the real Wan 2.1 architecture (diffusers on CPU
torch, no download; norm scales and biases perturbed so every parameter matters) to a temporary
folder first. Reports the max abs error of encode (posterior mean) and decode against diffusers on
one clip, and frames/s of our jitted encode and decode (after compilation) next to diffusers'.
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sora_jax.models import vae_convert  # noqa: E402

flags.DEFINE_string('path', None, 'A diffusers AutoencoderKLWan folder.')
flags.DEFINE_bool('random', False, 'Use a random VAE of the Wan 2.1 architecture instead.')
flags.DEFINE_integer('frames', 17, 'Clip frames (1 + 4n).')
flags.DEFINE_integer('size', 128, 'Clip height and width (multiple of 8).')
flags.DEFINE_integer('batch_size', 1, 'Clips per call.')
flags.DEFINE_integer('iters', 2, 'Timed calls.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import torch
  from diffusers import AutoencoderKLWan
  tmp = None
  path = FLAGS.path
  if FLAGS.random:
    tmp = tempfile.TemporaryDirectory()
    path = tmp.name
    torch.manual_seed(0)
    model = AutoencoderKLWan().eval()  # diffusers' defaults are Wan 2.1's architecture
    with torch.no_grad():
      for name, p in model.named_parameters():
        if 'gamma' in name or 'bias' in name:
          p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
  if not path:
    sys.exit('error: give --path or --random')
  ref = AutoencoderKLWan.from_pretrained(path).eval()
  start = time.perf_counter()
  ours = vae_convert.load_wan(path)
  result = dict(model='random Wan 2.1' if FLAGS.random else path, load_s=round(time.perf_counter() - start, 2),
                params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(ours)))),
                clip=[FLAGS.batch_size, FLAGS.frames, FLAGS.size, FLAGS.size], device=jax.devices()[0].device_kind)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (FLAGS.batch_size, FLAGS.frames, FLAGS.size, FLAGS.size, 3)).astype(np.float32)
  graphdef, params = nnx.split(ours)
  encode = jax.jit(lambda p, v: nnx.merge(graphdef, p).encode(v)[0])
  decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))

  def timed(fn, *args):
    out = fn(*args)
    jax.block_until_ready(out)  # compile
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
      out = fn(*args)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - start) / FLAGS.iters

  mean, enc_s = timed(encode, params, x)
  video, dec_s = timed(decode, params, mean)
  frames = FLAGS.batch_size * FLAGS.frames
  result.update(encode_frames_per_s=round(frames / enc_s, 2), decode_frames_per_s=round(frames / dec_s, 2))
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    start = time.perf_counter()
    mean_ref = ref.encode(xt).latent_dist.mean
    torch_enc_s = time.perf_counter() - start
    start = time.perf_counter()
    video_ref = ref.decode(mean_ref).sample
    torch_dec_s = time.perf_counter() - start
  to_ours = lambda t: t.permute(0, 2, 3, 4, 1).numpy()
  result.update(torch_encode_frames_per_s=round(frames / torch_enc_s, 2),
                torch_decode_frames_per_s=round(frames / torch_dec_s, 2),
                encode_max_abs_error=float(np.abs(np.asarray(mean) - to_ours(mean_ref)).max()),
                latent_scale=float(np.abs(to_ours(mean_ref)).max()),
                # diffusers' own latent in, so that this is the decoder's error alone
                decode_max_abs_error=float(np.abs(np.asarray(decode(params, to_ours(mean_ref)))
                                                  - to_ours(video_ref)).max()))
  print(json.dumps(result))
  if tmp:
    tmp.cleanup()


if __name__ == '__main__':
  app.run(main)
