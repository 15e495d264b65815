"""Text encoders: the built-in byte encoder (`byte.py`, trained with the DiT) and frozen pretrained
T5 / UMT5 encoders loaded from local Hugging Face folders (`t5.py`, `tokenizer.py`).

  encoder = sora_jax.text.load_text_encoder('/models/umt5-xxl', max_len=512, dtype='bfloat16')
  embeddings_bld, mask_bl = encoder.encode(['a red fox in the snow', ''])

The empty prompt encodes to one real token (`</s>`): the null condition of classifier-free guidance.
"""

import contextlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import UsageError
from sora_jax.text import byte, t5
from sora_jax.text.tokenizer import Tokenizer

KINDS = ('byte', 't5')


class TextEncoder:
  """A frozen pretrained encoder with its tokenizer.

  `encode(prompts) -> (embeddings [b, max_len, dim], mask [b, max_len] bool)`, padding rows zero.
  `tokenize(prompts) -> (ids, mask)` and `apply(params, ids, mask)` split the two halves, for data
  pipelines (tokenize on the host) and train steps (apply inside jit, `params` an argument).
  """

  def __init__(self, path: str, *, max_len: int = 512, dtype='float32', mesh=None, rules=()):
    self.path = path
    self.max_len = max_len
    self.tokenizer = Tokenizer(path)
    model = t5.load(path, mesh=mesh, rules=rules, param_dtype=dtype)
    if self.tokenizer.vocab_size > model.cfg.vocab_size:
      raise UsageError(f'{path}: the tokenizer has {self.tokenizer.vocab_size} tokens, the model '
                       f'embeds only {model.cfg.vocab_size}')
    self.dim = model.cfg.d_model
    self.dtype = jnp.dtype(dtype)
    self.mesh, self.rules = mesh, tuple(rules)
    self.graphdef, state = nnx.split(model)
    self.params = state.to_pure_dict()  # a plain tree of (sharded) arrays: a jit argument
    self._jit_apply = jax.jit(self.apply)

  def apply(self, params, ids_bl, mask_bl):
    """The pure forward pass: (params, ids [b, l], mask [b, l]) -> (embeddings [b, l, dim], mask)."""
    return nnx.merge(self.graphdef, params)(ids_bl, mask_bl)

  def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer(list(prompts), self.max_len)

  def encode(self, prompts):
    ids_bl, mask_bl = self.tokenize(prompts)
    context = contextlib.nullcontext()
    if self.mesh is not None:
      context = contextlib.ExitStack()
      context.enter_context(jax.set_mesh(self.mesh))
      context.enter_context(nn.logical_axis_rules(self.rules))
    with context:
      return self._jit_apply(self.params, jnp.asarray(ids_bl), jnp.asarray(mask_bl))


def load_text_encoder(path: str, *, max_len: int = 512, dtype='float32', mesh=None, rules=()) -> TextEncoder:
  """A frozen T5 / UMT5 encoder from a local Hugging Face folder (`config.json`, `*.safetensors`,
  and `spiece.model` or `tokenizer.json`), sharded over `mesh` by the logical `rules` if given."""
  return TextEncoder(path, max_len=max_len, dtype=dtype, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------
# From a training config: `config.text_encoder.kind` ('byte' | 't5'), `.path`, `.dtype`.
# ----------------------------------------------------------------------------------------------


def _text_config(config):
  return config.get('text_encoder') or {'kind': 'byte'}


def is_frozen(config) -> bool:
  """Whether the config conditions on a frozen pretrained encoder (rather than the byte encoder)."""
  return _text_config(config).get('kind', 'byte') != 'byte'


def validate(config) -> None:
  """UsageError naming the field for a bad `config.text_encoder`; reads only `config.json`."""
  te = _text_config(config)
  kind = te.get('kind', 'byte')
  if kind not in KINDS:
    raise UsageError(f'config.text_encoder.kind={kind!r}: use one of {KINDS}')
  if kind == 'byte':
    return
  path = te.get('path')
  if not path:
    raise UsageError('config.text_encoder.path is not set: give a local Hugging Face T5/UMT5 folder')
  if not os.path.isdir(path):
    raise UsageError(f'config.text_encoder.path={path!r}: no such folder')
  try:
    t5.read_config(path)
    Tokenizer(path)
  except UsageError as e:
    raise UsageError(f'config.text_encoder.path: {e}') from None
  if te.get('dtype', 'float32') not in ('float32', 'bfloat16'):
    raise UsageError(f'config.text_encoder.dtype={te.dtype!r}: use "float32" or "bfloat16"')


def text_dim(config) -> int | None:
  """The width of the frozen encoder's embeddings, which the DiT projects; None for the byte encoder."""
  return t5.read_config(_text_config(config)['path']).d_model if is_frozen(config) else None


def from_config(config, mesh=None, rules=()) -> TextEncoder | None:
  """The frozen encoder of `config.text_encoder` (tokens of `config.data.max_text_len`), or None."""
  if not is_frozen(config):
    return None
  te = _text_config(config)
  return load_text_encoder(te['path'], max_len=config.data.max_text_len, dtype=te.get('dtype', 'float32'),
                           mesh=mesh, rules=rules)


def tokenizer_from_config(config):
  """`tokenize(texts, max_len) -> (ids, mask)` for the data pipeline: T5's or the byte tokenizer."""
  if is_frozen(config):
    return Tokenizer(_text_config(config)['path'])
  return byte.tokenize
