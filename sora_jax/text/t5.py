"""The T5 v1.1 / UMT5 encoder in Flax, loaded from a Hugging Face folder, sharded like the DiT.

Shape letters: b batch, l tokens, d model width, n heads, k head dim (`d_kv`), f MLP width.

The architecture, as `transformers`' `T5EncoderModel` / `UMT5EncoderModel` computes it:
token embedding (no scaling), pre-norm blocks of self-attention and MLP, a final RMS norm.
T5 peculiarities: RMS norms without mean or bias; unscaled attention logits (the 1/sqrt(k) is folded
into the weights); a learned relative position bias over log-spaced buckets, added to the logits.
T5 computes that bias in its first block and reuses it in all; UMT5 gives every block its own.
The MLP is gated (`gated-gelu`, v1.1 and UMT5) or plain (`relu`, the original T5).

Parameters are stored in `param_dtype` (bfloat16 halves an XXL encoder to 11 GB) and sharded by
logical axes: 'text_embed' (d) -> fsdp, 'heads' (n*k) and 'mlp' (f) -> tensor, per the config's
rules. Loading reads each device's shard of each tensor straight from the safetensors files, so no
device (and no host, beyond one tensor's shard) ever holds the full model.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import UsageError, pretrained
from sora_jax.models.axes import constrain, param

ACTIVATIONS = {
    'relu': jax.nn.relu,
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  gated: bool = True
  activation: str = 'gelu_new'
  layer_norm_epsilon: float = 1e-6
  bias_per_layer: bool = False  # UMT5: every block has its own relative position bias

  @classmethod
  def from_hf(cls, hf: dict, source: str = 'config.json') -> 'T5Config':
    """From a Hugging Face `config.json` of model_type 't5' or 'umt5'."""
    model_type = hf.get('model_type', 't5')
    if model_type not in ('t5', 'umt5', 'mt5'):
      raise UsageError(f'{source}: model_type={model_type!r}, expected "t5", "mt5" or "umt5"')
    ff = hf.get('feed_forward_proj', 'relu')
    gated = ff.startswith('gated-')
    activation = hf.get('dense_act_fn') or ff.split('-')[-1]
    if ff == 'gated-gelu':
      activation = 'gelu_new'  # what transformers substitutes for "gated-gelu"
    if activation not in ACTIVATIONS:
      raise UsageError(f'{source}: activation {activation!r} is not supported ({sorted(ACTIVATIONS)})')
    try:
      return cls(vocab_size=hf['vocab_size'], d_model=hf['d_model'], d_kv=hf['d_kv'], d_ff=hf['d_ff'],
                 num_layers=hf['num_layers'], num_heads=hf['num_heads'],
                 relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
                 relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
                 gated=gated, activation=activation,
                 layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
                 bias_per_layer=model_type == 'umt5')
    except KeyError as e:
      raise UsageError(f'{source}: missing field {e.args[0]!r}') from None


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int):
  """[l_q, l_k] int32 bucket of each (query, key) offset, bidirectional as in T5's encoder.

  Half the buckets are for keys after the query; within each half, offsets below num_buckets / 4
  get their own bucket and larger ones share log-spaced buckets up to `max_distance`.
  """
  offset = jnp.arange(key_len)[None, :] - jnp.arange(query_len)[:, None]
  half = num_buckets // 2
  buckets = (offset > 0).astype(jnp.int32) * half
  distance = jnp.abs(offset)
  max_exact = half // 2
  # Clamp before the log: distance 0 would give -inf (unused where is_small, but kept finite).
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


class RMSNorm(nnx.Module):
  """T5's norm: x / rms(x) * scale, the statistics in float32."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ('norm',))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * self.scale.astype(x.dtype)


def _kernel(rngs, d_in, d_out, axes):
  return param(rngs, nnx.initializers.normal(d_in**-0.5), (d_in, d_out), axes)


class T5Block(nnx.Module):

  def __init__(self, cfg: T5Config, has_bias: bool, *, rngs: nnx.Rngs):
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    self.cfg = cfg
    self.attn_norm = RMSNorm(d, cfg.layer_norm_epsilon, rngs=rngs)
    self.q = _kernel(rngs, d, inner, ('text_embed', 'heads'))
    self.k = _kernel(rngs, d, inner, ('text_embed', 'heads'))
    self.v = _kernel(rngs, d, inner, ('text_embed', 'heads'))
    self.o = _kernel(rngs, inner, d, ('heads', 'text_embed'))
    if has_bias:
      self.relative_bias = param(rngs, nnx.initializers.normal(d**-0.5),
                                 (cfg.relative_attention_num_buckets, cfg.num_heads), (None, 'heads'))
    self.mlp_norm = RMSNorm(d, cfg.layer_norm_epsilon, rngs=rngs)
    if cfg.gated:
      self.wi_0 = _kernel(rngs, d, cfg.d_ff, ('text_embed', 'mlp'))
      self.wi_1 = _kernel(rngs, d, cfg.d_ff, ('text_embed', 'mlp'))
    else:
      self.wi = _kernel(rngs, d, cfg.d_ff, ('text_embed', 'mlp'))
    self.wo = _kernel(rngs, cfg.d_ff, d, ('mlp', 'text_embed'))

  def position_bias(self, length: int):
    """[n, l, l] additive attention bias from this block's relative position table."""
    buckets_ll = relative_position_buckets(length, length, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
    return jnp.take(self.relative_bias[...].astype(jnp.float32), buckets_ll, axis=0).transpose(2, 0, 1)

  def __call__(self, x_bld, bias_bnll):
    b, l, _ = x_bld.shape
    n, k = self.cfg.num_heads, self.cfg.d_kv
    dt = x_bld.dtype
    h = self.attn_norm(x_bld)
    q, kk, v = (jnp.einsum('bld,de->ble', h, w[...].astype(dt)).reshape(b, l, n, k) for w in (self.q, self.k, self.v))
    logits_bnll = jnp.einsum('bqnk,blnk->bnql', q, kk, preferred_element_type=jnp.float32) + bias_bnll
    weights = jax.nn.softmax(logits_bnll, axis=-1).astype(dt)
    out = jnp.einsum('bnql,blnk->bqnk', weights, v).reshape(b, l, n * k)
    x_bld = x_bld + jnp.einsum('ble,ed->bld', out, self.o[...].astype(dt))
    x_bld = constrain(x_bld, ('act_batch', 'act_text', 'act_embed'))

    h = self.mlp_norm(x_bld)
    act = ACTIVATIONS[self.cfg.activation]
    if self.cfg.gated:
      h = act(h @ self.wi_0[...].astype(dt)) * (h @ self.wi_1[...].astype(dt))
    else:
      h = act(h @ self.wi[...].astype(dt))
    h = constrain(h, ('act_batch', 'act_text', 'act_mlp'))
    x_bld = x_bld + h @ self.wo[...].astype(dt)
    return constrain(x_bld, ('act_batch', 'act_text', 'act_embed'))


class T5Encoder(nnx.Module):
  """(ids [b, l] int, mask [b, l] bool) -> (embeddings [b, l, d], mask); padded rows are zero."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    self.embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), ('vocab', 'text_embed'))
    self.blocks = nnx.List([T5Block(cfg, has_bias=cfg.bias_per_layer or i == 0, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)

  def __call__(self, ids_bl, mask_bl):
    l = ids_bl.shape[1]
    x_bld = jnp.take(self.embedding[...], ids_bl, axis=0).astype(self.dtype)
    x_bld = constrain(x_bld, ('act_batch', 'act_text', 'act_embed'))
    key_mask_b11l = jnp.where(mask_bl, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    bias_bnll = None
    for block in self.blocks:
      if bias_bnll is None or self.cfg.bias_per_layer:
        bias_bnll = block.position_bias(l)[None] + key_mask_b11l
      x_bld = block(x_bld, bias_bnll)
    out_bld = self.final_norm(x_bld)
    return jnp.where(mask_bl[..., None], out_bld, 0).astype(self.dtype), mask_bl


# ----------------------------------------------------------------------------------------------
# Loading a Hugging Face folder.
# ----------------------------------------------------------------------------------------------


def hf_names(cfg: T5Config) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (the Hugging Face tensor name, whether it is a Linear weight to transpose)."""
  names = {('embedding',): ('shared.weight', False), ('final_norm', 'scale'): ('encoder.final_layer_norm.weight', False)}
  for i in range(cfg.num_layers):
    pre = f'encoder.block.{i}.layer'
    ours = ('blocks', i)
    names[ours + ('attn_norm', 'scale')] = (f'{pre}.0.layer_norm.weight', False)
    for w in 'qkvo':
      names[ours + (w,)] = (f'{pre}.0.SelfAttention.{w}.weight', True)
    if cfg.bias_per_layer or i == 0:
      names[ours + ('relative_bias',)] = (f'{pre}.0.SelfAttention.relative_attention_bias.weight', False)
    names[ours + ('mlp_norm', 'scale')] = (f'{pre}.1.layer_norm.weight', False)
    for w in (('wi_0', 'wi_1', 'wo') if cfg.gated else ('wi', 'wo')):
      names[ours + (w,)] = (f'{pre}.1.DenseReluDense.{w}.weight', True)
  return names


def read_config(path: str) -> T5Config:
  """The architecture in a Hugging Face folder's `config.json` (no weights are read)."""
  hf, config_file = pretrained.read_config(path, 'a Hugging Face T5/UMT5 folder')
  return T5Config.from_hf(hf, config_file)


def load(path: str, *, mesh=None, rules=(), param_dtype=jnp.float32, dtype=None) -> T5Encoder:
  """The encoder of a Hugging Face T5/UMT5 folder (`config.json` + `*.safetensors`).

  With a mesh, every parameter is created sharded by `rules` (logical axis -> mesh axes) and each
  process reads only its devices' slices. Without one, parameters live on the default device.
  Works for encoder-only (`T5EncoderModel`) and full (`T5ForConditionalGeneration`) checkpoints.
  """
  from sora_jax import sharding  # pylint: disable=g-import-not-at-top
  cfg = read_config(path)
  param_dtype = jnp.dtype(param_dtype)
  dtype = jnp.dtype(dtype or param_dtype)
  abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, abstract_state = nnx.split(abstract)
  shapes = abstract_state.to_pure_dict()
  if mesh is not None:
    logical = nnx.get_partition_spec(abstract_state).to_pure_dict()
    shardings = sharding.logical_to_shardings(logical, shapes, mesh, rules)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)

  tensors = pretrained.SafetensorsFolder(path)
  flat = {}
  for ours, (name, transpose) in hf_names(cfg).items():
    leaf = _get_path(shapes, ours)
    try:
      # T5 checkpoints may name the tied embedding `encoder.embed_tokens` instead of `shared`.
      tensor, file = tensors.find(name, 'encoder.embed_tokens.weight' if name == 'shared.weight' else None)
    except KeyError:
      raise UsageError(f'{path}: the weights have no tensor {name!r} (is this a T5/UMT5 checkpoint?)') from None
    stored = tuple(tensor.get_shape())
    expected = tuple(leaf.shape[::-1]) if transpose else tuple(leaf.shape)
    if stored != expected:
      raise UsageError(f'{file}: {name} has shape {stored}, config.json implies {expected}')

    def read(index, tensor=tensor, transpose=transpose):  # this device's slice of our layout
      block = tensor[tuple(index)[::-1]].T if transpose else tensor[tuple(index)]
      return np.asarray(block).astype(param_dtype)

    flat[ours] = jax.make_array_from_callback(leaf.shape, _get_path(shardings, ours), read)
  abstract_state.replace_by_pure_dict(pretrained.unflatten(flat))
  return nnx.merge(graphdef, abstract_state)


def _get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree
