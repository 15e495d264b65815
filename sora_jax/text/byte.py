"""The built-in text encoder: UTF-8 bytes -> a small transformer trained jointly with the DiT.

It is the default for the synthetic `shapes` world. A pretrained encoder (T5) fills the same
interface later: `encode(tokens_bl, mask_bl) -> (embeddings_bld, mask_bl)`.

Token ids: 0 is padding, 1 is a BOS token that every caption starts with (so the empty caption,
used as the null condition for classifier-free guidance, still has one real key), byte v is v + 2.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import layers
from sora_jax.models.axes import param

PAD_ID, BOS_ID, BYTE_OFFSET = 0, 1, 2
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Byte-level tokens [b, max_len] int32 and mask [b, max_len] bool; long texts are truncated."""
  tokens = np.zeros((len(texts), max_len), np.int32)
  for i, text in enumerate(texts):
    ids = [BOS_ID] + [b + BYTE_OFFSET for b in text.encode('utf-8')]
    ids = ids[:max_len]
    tokens[i, :len(ids)] = ids
  return tokens, tokens != PAD_ID


class TextBlock(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm1 = layers.RMSNorm(dim, 'text_embed', rngs=rngs)
    self.attn = layers.Attention(dim, num_heads, rngs=rngs, dtype=dtype, query_axis='act_text')
    self.norm2 = layers.RMSNorm(dim, 'text_embed', rngs=rngs)
    self.mlp = layers.Mlp(dim, 4 * dim, rngs=rngs, dtype=dtype, token_axis='act_text')

  def __call__(self, x_bld, mask_bl, pos_bl1):
    x_bld = x_bld + self.attn(self.norm1(x_bld), mask_bl=mask_bl, pos_bsa=pos_bl1)
    return x_bld + self.mlp(self.norm2(x_bld))


class ByteTextEncoder(nnx.Module):
  """Embeds byte tokens and runs `depth` pre-norm transformer blocks with 1D RoPE.

  `embedding_std`: the byte embeddings' initial scale. At 0.02 (GPT-2's) the blocks' first outputs,
  which mix the caption's bytes, outweigh each byte's own identity in the residual stream; at 1.0
  (T5's) every byte starts distinct (README, "Native sizes": the red/green mix-up).
  """

  def __init__(self, dim: int, depth: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               embedding_std: float = 0.02):
    self.embedding = param(rngs, layers.init_normal(embedding_std), (VOCAB_SIZE, dim), ('vocab', 'text_embed'))
    self.blocks = nnx.List([TextBlock(dim, num_heads, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = layers.RMSNorm(dim, 'text_embed', rngs=rngs)
    self.dim = dim
    self.dtype = dtype

  def __call__(self, tokens_bl, mask_bl):
    """Returns (embeddings [b, l, dim], mask [b, l])."""
    x = self.embedding[tokens_bl].astype(self.dtype)
    pos_bl1 = jnp.broadcast_to(jnp.arange(tokens_bl.shape[1])[None, :, None], (*tokens_bl.shape, 1))
    for block in self.blocks:
      x = block(x, mask_bl, pos_bl1)
    return self.norm(x), mask_bl
