"""The tokenizer of a pretrained T5/UMT5 folder: `spiece.model` (sentencepiece) or `tokenizer.json`.

Ids equal those of the Hugging Face tokenizer called as text-to-video pipelines call it
(`padding='max_length', truncation=True, max_length=L`): the pieces, cut to L - 1, then `</s>`,
then padding. The empty prompt is `[</s>]`, one real token, so it is a valid null condition.
"""

import json
import os

import numpy as np

from sora_jax import UsageError


class Tokenizer:
  """`tokenizer(texts, max_len) -> (ids [b, max_len] int32, mask [b, max_len] bool)`."""

  def __init__(self, path: str):
    spiece = os.path.join(path, 'spiece.model')
    tokenizer_json = os.path.join(path, 'tokenizer.json')
    if os.path.exists(spiece):
      import sentencepiece  # pylint: disable=g-import-not-at-top
      self._sp = sentencepiece.SentencePieceProcessor(model_file=spiece)
      self._encode = lambda texts: [self._sp.encode(t) for t in texts]
      self.vocab_size = self._sp.get_piece_size()
      # T5's models define both (<pad> 0, </s> 1); -1 means undefined.
      self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
      self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else 1
    elif os.path.exists(tokenizer_json):
      import tokenizers  # pylint: disable=g-import-not-at-top
      tok = tokenizers.Tokenizer.from_file(tokenizer_json)
      tok.no_truncation()
      tok.no_padding()
      self._tok = tok
      self._encode = lambda texts: [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
      self.vocab_size = tok.get_vocab_size()
      special = _special_tokens(path)
      self.pad_id = _id_or(special.get('pad_token', '<pad>'), tok.token_to_id, 0)
      self.eos_id = _id_or(special.get('eos_token', '</s>'), tok.token_to_id, 1)
    else:
      raise UsageError(f'{path}: no tokenizer (expected spiece.model or tokenizer.json)')

  def __call__(self, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if max_len < 1:
      raise ValueError(f'max_len={max_len}: needs room for at least the </s> token')
    ids_bl = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask_bl = np.zeros((len(texts), max_len), bool)
    for i, ids in enumerate(self._encode([str(t) for t in texts])):
      ids = list(ids[:max_len - 1]) + [self.eos_id]
      ids_bl[i, :len(ids)] = ids
      mask_bl[i, :len(ids)] = True
    return ids_bl, mask_bl


def _special_tokens(path: str) -> dict:
  """pad/eos token strings from `special_tokens_map.json` or `tokenizer_config.json`, if present."""
  out = {}
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    file = os.path.join(path, name)
    if os.path.exists(file):
      with open(file) as f:
        data = json.load(f)
      for key in ('pad_token', 'eos_token'):
        value = data.get(key)
        if isinstance(value, dict):
          value = value.get('content')
        if isinstance(value, str):
          out[key] = value
  return out


def _id_or(token: str, to_id, default: int) -> int:
  """The id of `token` in the vocabulary, else `default`."""
  i = to_id(token)
  return int(i) if i is not None else default
