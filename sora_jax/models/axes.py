"""The logical axis vocabulary: every parameter and activation is sharded by these names.

Weights:      'embed' model width d, 'mlp' hidden width of the MLP, 'heads' attention heads n,
              'kv' head dim k, 'vocab' token vocabulary, 'patch' values in one patch,
              'text_embed' width of the text encoder, 'norm' norm scales, 'pos' learned positions.
Activations:  'act_batch' b, 'act_seq' spacetime tokens s, 'act_text' text tokens l,
              'act_embed' d, 'act_heads' n, 'act_mlp' hidden width.

The mapping from these names to the mesh axes ('data', 'fsdp', 'tensor', 'sequence') lives in the
config (`config.sharding_rules`) and is applied by `sora_jax.sharding`; modules only ever name
logical axes. A name without a rule is replicated.
"""

import flax.linen as nn
import jax
from flax import nnx

# Parameters carry logical names as metadata only; `sora_jax.sharding` turns them into concrete
# shardings and `train.py` creates the state already sharded with `jax.jit(out_shardings=...)`.
nnx.use_eager_sharding(False)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
  """A float32 parameter initialised by `init`, annotated with one logical name per dimension."""
  if len(axes) != len(shape):
    raise ValueError(f'{len(axes)} axis names {axes} for a parameter of shape {shape}')
  return nnx.Param(init(rngs.params(), shape, jax.numpy.float32), out_sharding=axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside a mesh and rules."""
  return nn.with_logical_constraint(x, axes)
