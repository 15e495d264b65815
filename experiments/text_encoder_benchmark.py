r"""Encode throughput of a frozen T5/UMT5 text encoder, and its error against transformers.

  python experiments/text_encoder_benchmark.py --path=/models/umt5-xxl --batch_size=32 --max_len=512
  python experiments/text_encoder_benchmark.py --random=umt5-base --batch_size=16 --max_len=128

`--random=NAME` saves a randomly initialised model of that real architecture (transformers on CPU
torch, no download; a sentencepiece tokenizer trained on a few lines) to a temporary folder first.
Prints one JSON line: load and compile seconds, prompts/s and tokens/s of `encode` (tokenizing
included), and with `--compare_torch` the max abs error and transformers' prompts/s on the same batch.
"""

import io
import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sora_jax.text import load_text_encoder  # noqa: E402

# Architectures of public checkpoints (their config.json values); the weights are random here.
RANDOM = {
    't5-small': ('t5', dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6)),
    't5-base': ('t5', dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12)),
    'umt5-small': ('umt5', dict(vocab_size=256384, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6)),
    'umt5-base': ('umt5', dict(vocab_size=256384, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12)),
}

flags.DEFINE_string('path', None, 'A Hugging Face T5/UMT5 folder.')
flags.DEFINE_enum('random', None, list(RANDOM), 'Save a random model of this architecture and use it.')
flags.DEFINE_integer('batch_size', 16, 'Prompts per encode call.')
flags.DEFINE_integer('max_len', 128, 'Tokens per prompt (padding included).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Parameter and compute dtype.')
flags.DEFINE_integer('iters', 5, 'Timed encode calls.')
flags.DEFINE_bool('compare_torch', True, 'Also run transformers on the same batch (float32).')
FLAGS = flags.FLAGS

WORDS = ('a red fox runs through fresh snow at dawn while the camera slowly pans to the left '
         'over a frozen lake with mountains behind it and birds flying overhead').split()


def save_random(name: str, path: str) -> None:
  import sentencepiece as spm
  import torch
  import transformers
  kind, kw = RANDOM[name]
  spiece = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter([' '.join(WORDS)] * 50), model_writer=spiece,
                                 vocab_size=64, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                 bos_id=-1, minloglevel=2)
  with open(os.path.join(path, 'spiece.model'), 'wb') as f:
    f.write(spiece.getvalue())
  torch.manual_seed(0)
  cls = transformers.T5EncoderModel if kind == 't5' else transformers.UMT5EncoderModel
  config_cls = transformers.T5Config if kind == 't5' else transformers.UMT5Config
  cls(config_cls(feed_forward_proj='gated-gelu', **kw)).save_pretrained(path)


def prompts(n: int) -> list[str]:
  rng = np.random.default_rng(0)
  return [' '.join(rng.choice(WORDS, size=rng.integers(5, 200))) for _ in range(n)]


def main(argv):
  del argv
  tmp = None
  path = FLAGS.path
  if FLAGS.random:
    tmp = tempfile.TemporaryDirectory()
    path = tmp.name
    save_random(FLAGS.random, path)
  if not path:
    sys.exit('error: give --path or --random')
  result = dict(model=FLAGS.random or path, batch_size=FLAGS.batch_size, max_len=FLAGS.max_len,
                dtype=FLAGS.dtype, device=jax.devices()[0].device_kind, num_devices=jax.device_count())
  start = time.perf_counter()
  encoder = load_text_encoder(path, max_len=FLAGS.max_len, dtype=FLAGS.dtype)
  result['load_s'] = round(time.perf_counter() - start, 2)
  result['params'] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(encoder.params)))
  batch = prompts(FLAGS.batch_size)
  start = time.perf_counter()
  emb, mask = encoder.encode(batch)
  emb.block_until_ready()
  result['first_call_s'] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  for _ in range(FLAGS.iters):
    emb, mask = encoder.encode(batch)
  emb.block_until_ready()
  seconds = (time.perf_counter() - start) / FLAGS.iters
  result['prompts_per_s'] = round(FLAGS.batch_size / seconds, 2)
  result['tokens_per_s'] = round(FLAGS.batch_size * FLAGS.max_len / seconds, 1)
  result['real_tokens_per_s'] = round(float(np.asarray(mask).sum()) / seconds, 1)
  if FLAGS.compare_torch:
    import torch
    import transformers
    ids, ids_mask = encoder.tokenize(batch)
    with open(os.path.join(path, 'config.json')) as f:
      kind = json.load(f).get('model_type', 't5')
    model = (transformers.UMT5EncoderModel if kind == 'umt5' else transformers.T5EncoderModel).from_pretrained(path).eval()
    with torch.no_grad():
      start = time.perf_counter()
      ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(ids_mask, dtype=torch.long)).last_hidden_state.numpy()
      result['torch_prompts_per_s'] = round(FLAGS.batch_size / (time.perf_counter() - start), 2)
    err = np.abs(np.asarray(emb, np.float32) - ref)[ids_mask]
    result['max_abs_error'] = float(err.max())
    result['output_scale'] = float(np.abs(ref[ids_mask]).max())
  print(json.dumps(result))
  if tmp:
    tmp.cleanup()


if __name__ == '__main__':
  app.run(main)
