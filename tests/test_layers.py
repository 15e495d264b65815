import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax import sharding
from sora_jax.models import layers


def test_rope_scores_depend_only_on_relative_3d_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 24)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 2, 24)), jnp.float32)

  def score(pq, pk):
    rq = layers.apply_rope(q, jnp.array([[pq]]))
    rk = layers.apply_rope(k, jnp.array([[pk]]))
    return np.asarray(jnp.einsum('bsnk,bsnk->n', rq, rk))

  base = score((1, 2, 3), (4, 0, 5))
  np.testing.assert_allclose(score((11, 7, 6), (14, 5, 8)), base, rtol=1e-4, atol=1e-4)
  assert not np.allclose(score((1, 2, 3), (4, 1, 5)), base, atol=1e-3)  # another offset differs


def test_rope_preserves_norms_and_is_identity_at_the_origin():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 3, 12)), jnp.float32)
  pos = jnp.asarray(np.random.default_rng(2).integers(0, 9, size=(2, 5, 3)))
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(x, pos), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(layers.apply_rope(x, jnp.zeros_like(pos)), x, atol=1e-6)


def test_rope_position_scale_rotates_as_scaled_positions_so_far_offsets_stop_aliasing():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 7, 2, 30)), jnp.float32)
  pos = jnp.asarray(np.stack([np.zeros(7), np.arange(7), np.zeros(7)], -1)[None])  # 7 rows, one column
  np.testing.assert_allclose(layers.apply_rope(x, pos, 100.0, position_scale=0.5),
                             layers.apply_rope(x, 0.5 * pos, 100.0), atol=1e-6)
  # The fastest h frequency alone: offset 6 scores almost like offset 0 at scale 1 (6 rad), not at 0.5.
  q = jnp.zeros((1, 7, 1, 30)).at[..., 5].set(1.0).at[..., 20].set(1.0)  # the pair (5, 20): h, 1 rad
  for scale, aliased in ((1.0, True), (0.5, False)):
    r = layers.apply_rope(q, pos, 100.0, position_scale=scale)[0, :, 0]
    score_0_6 = float(r[0] @ r[6]) / float(r[0] @ r[0])
    assert (score_0_6 > 0.9) == aliased, (scale, score_0_6)


def test_rope_dims_split_the_head_dim_into_even_parts():
  assert layers.rope_dims(32, 3) == (12, 10, 10)
  assert sum(layers.rope_dims(64, 3)) == 64


def test_cross_attention_ignores_masked_keys():
  from flax import nnx
  attn = layers.Attention(16, 2, context_dim=8, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3, 16))
  ctx = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 8)), jnp.float32)
  mask = jnp.array([[True, True, False, False]])
  changed = ctx.at[:, 2:].set(100.0)
  np.testing.assert_allclose(attn(x, context_bld=ctx, mask_bl=mask),
                             attn(x, context_bld=changed, mask_bl=mask), atol=1e-5)


@pytest.mark.parametrize('sequence_parallel, collective', [('all_to_all', 'all-to-all'),
                                                           ('gather_kv', 'all-gather')])
@pytest.mark.parametrize('sizes', [dict(data=2, sequence=4), dict(fsdp=2, tensor=2, sequence=2)])
def test_sequence_parallel_self_attention_equals_unsharded_attention_with_a_key_mask(
    sequence_parallel, collective, sizes):
  from configs.shapes import SHARDING_RULES
  rules = sharding.rules_tuple(SHARDING_RULES)
  mesh = sharding.make_mesh(dict(dict(data=1, fsdp=1, tensor=1, sequence=1), **sizes))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(3))
  mask_bs = jnp.asarray(rng.random((2, 16)) > 0.3)  # padding keys, e.g. of a packed sequence
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask_bs[:, None, None, :])
  sp = lambda q, k, v: layers.self_attention(q, k, v, mask_bs, sequence_parallel=sequence_parallel)
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    spec = NamedSharding(mesh, P(('data', 'fsdp'), 'sequence', 'tensor'))
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
    out = jax.jit(sp)(q, k, v)
    grads = jax.jit(jax.grad(loss(sp), argnums=(0, 1, 2)))(q, k, v)
    hlo = jax.jit(sp).lower(q, k, v).compile().as_text()
  np.testing.assert_allclose(out, plain(q, k, v), atol=1e-6)
  for g, g_ref in zip(grads, jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g_ref, atol=2e-5)
  assert collective in hlo
  assert out.sharding.spec[1] == 'sequence'  # the output stays sharded like the queries


def test_key_lengths_for_cudnn_equal_the_key_mask_for_padding_at_the_end():
  # cuDNN's flash attention takes key padding as per-sample lengths; `attend` derives them from the
  # mask. XLA accepts both forms, so the equivalence is checked here on CPU.
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (3, 6, 2, 8))
  k, v = jax.random.normal(kk, (3, 5, 2, 8)), jax.random.normal(kv, (3, 5, 2, 8))
  lengths = jnp.array([5, 2, 1], jnp.int32)
  mask_bl = jnp.arange(5)[None, :] < lengths[:, None]
  with_mask = layers.attend(q, k, v, mask_bl)
  with_lengths = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=mask_bl.sum(-1, dtype=jnp.int32))
  np.testing.assert_allclose(with_lengths, with_mask, atol=1e-6)
  np.testing.assert_allclose(with_mask[2], jnp.broadcast_to(v[2, :1], (6, 2, 8)), atol=1e-6)  # 1 key: its value


def test_cudnn_attention_is_refused_before_compiling_where_it_cannot_run():
  from sora_jax import UsageError, train
  from configs import shapes
  config = shapes.get_config('tiny')
  config.model.attention_impl = 'cudnn'
  with pytest.raises(UsageError, match='attention_impl="cudnn"'):
    train.validate_config(config, 1)  # a CPU here; float32 too
  config.model.attention_impl = 'flash'
  with pytest.raises(UsageError, match='attention_impl'):
    train.validate_config(config, 1)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_xla_attention_and_its_backward_pass_equal_jax_nn_attention(dtype):
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 12, 3, 8)), dtype) for _ in range(3))
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mask = jnp.asarray(rng.random((2, 1, 12, 12)) > 0.4).at[0, 0, 3].set(False)  # query 3 of row 0 sees nothing
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for m in (None, mask):
    ours = lambda q, k, v, m=m: layers.xla_attention(q, k, v, m)  # noqa: E731
    ref = lambda q, k, v, m=m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation='xla')  # noqa: E731
    assert ours(q, k, v).dtype == dtype and np.isfinite(np.asarray(ours(q, k, v), np.float32)).all()
    np.testing.assert_allclose(np.asarray(ours(q, k, v), np.float32), np.asarray(ref(q, k, v), np.float32), atol=tol)
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w)  # noqa: E731
    for g, g_ref in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
      assert g.dtype == dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=tol * 4)


def test_rows_at_most_twice_the_window_attend_densely_rows_longer_through_windows():
  rng = np.random.default_rng(5)
  layout = layers.PackedLayout(block=4, window=8)
  for length, dense in ((16, True), (24, False)):
    segments = jnp.asarray(np.repeat(np.arange(length // 4) // 2 + 1, 4)[None].repeat(2, 0))  # 8 tokens each
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32) for _ in range(3))
    attend = lambda q, k, v: layers.self_attention(q, k, v, segment_bs=segments, layout=layout)  # noqa: E731
    np.testing.assert_allclose(attend(q, k, v), layers.segment_attention(q, k, v, segments, segments), atol=1e-6)
    jaxpr = str(jax.make_jaxpr(attend)(q, k, v))
    assert (f'f32[2,2,{length},{length}]' in jaxpr) == dense  # whole-row scores only when dense


@pytest.mark.parametrize('block', [512, 4])  # one block; then a scan over 3 blocks of queries (last padded)
def test_packed_segments_attend_only_to_themselves_exactly_as_each_alone(block):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 10, 2, 8)), jnp.float32) for _ in range(3))
  # Row 0: samples of 5 and 3 tokens, then 2 padding; row 1: one sample of 10 tokens.
  segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 10])
  spans = [(0, 0, 5), (0, 5, 8), (1, 0, 10)]
  loss = lambda q, k, v: sum(jnp.sum(layers.segment_attention(q, k, v, segments, segments, block=block)[r, a:e] ** 2)
                             for r, a, e in spans)
  out = layers.segment_attention(q, k, v, segments, segments, block=block)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for r, a, e in spans:
    alone = lambda q, k, v: jax.nn.dot_product_attention(q[r:r + 1, a:e], k[r:r + 1, a:e], v[r:r + 1, a:e])
    np.testing.assert_allclose(out[r, a:e], alone(q, k, v)[0], atol=1e-6)
    ref = jax.grad(lambda q, k, v: jnp.sum(alone(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, ref):
      np.testing.assert_allclose(g[r, a:e], g_ref[r, a:e], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(grads[1])[0, 8:], 0)  # padding keys get no gradient
  # What the backward pass keeps: never all the scores [b, heads, s, l] (blocks recompute theirs).
  _, backward = jax.vjp(lambda q, k, v: layers.segment_attention(q, k, v, segments, segments, block=block), q, k, v)
  largest = max(x.size for x in jax.tree.leaves(backward) if hasattr(x, 'size'))
  if block < 10:
    assert largest < 2 * 2 * 10 * 10


def test_block_aligned_rows_attend_within_a_window_and_their_own_caption_as_the_masked_row_does():
  rng = np.random.default_rng(3)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  # Samples start at multiples of 4 tokens and have at most 8: rows of 24 tokens, 3 caption slots of 5.
  segments = jnp.array([[1] * 7 + [0] + [2] * 3 + [0] + [3] * 8 + [0] * 4,
                        [1] * 8 + [2] * 8 + [3] * 2 + [0] * 6])
  layout = layers.PackedLayout(block=4, window=8, slots=3)
  q, k, v = arr(2, 24, 2, 8), arr(2, 24, 2, 8), arr(2, 24, 2, 8)
  text_k, text_v = arr(2, 15, 2, 8), arr(2, 15, 2, 8)
  caption_mask = np.arange(5) < np.array([[5], [2], [4]])  # per slot
  text_segment = jnp.asarray(np.where(caption_mask, np.arange(1, 4)[:, None], 0).reshape(1, 15).repeat(2, 0))
  real = (segments > 0)[..., None, None]
  pairs = [
      (lambda q, k, v: layers.windowed_segment_attention(q, k, v, segments, layout),
       lambda q, k, v: layers.segment_attention(q, k, v, segments, segments), (q, k, v)),
      (lambda q, k, v: layers.windowed_segment_attention(q, k, v, segments, layout, chunk=8),  # 3 chunks of 2 blocks
       lambda q, k, v: layers.segment_attention(q, k, v, segments, segments), (q, k, v)),
      (lambda q, k, v: layers.slotted_cross_attention(q, k, v, segments, text_segment, layout),
       lambda q, k, v: layers.segment_attention(q, k, v, segments, text_segment), (q, text_k, text_v)),
  ]
  for fast, reference, args in pairs:
    np.testing.assert_allclose(jnp.where(real, fast(*args), 0), jnp.where(real, reference(*args), 0), atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(real, f(*a), 0) ** 2)  # noqa: E731
    for g, g_ref in zip(jax.grad(loss(fast), argnums=(0, 1, 2))(*args), jax.grad(loss(reference), argnums=(0, 1, 2))(*args)):
      np.testing.assert_allclose(g, g_ref, atol=1e-5)
  # No [s, s] (or [s, l]) scores: [s / block, block, window] at most.
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: layers.windowed_segment_attention(q, k, v, segments, layout))(q, k, v))
  assert 'f32[2,2,24,24]' not in jaxpr and 'f32[12,2,4,8]' in jaxpr
  # Each block scores its own caption only: [s / block, block, l / slots], not the row against each slot.
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: layers.slotted_cross_attention(q, k, v, segments, text_segment, layout))(
      q, text_k, text_v))
  assert 'f32[2,2,24,5]' not in jaxpr and 'f32[12,2,4,5]' in jaxpr


def test_segment_spans_are_where_pack_put_each_sample_and_absent_ones_are_minus_one():
  from sora_jax.data import packing
  rng = np.random.default_rng(0)
  # Latent clips of 4, 2 and 6 patch tokens (patch 1 x 2 x 2) in rows of 16 aligned to 4 tokens.
  clips = [rng.normal(size=(1, 4, 4, 3)), rng.normal(size=(2, 2, 2, 3)), rng.normal(size=(1, 4, 6, 3))]
  rows = [packing.pack(clips, (1, 2, 2), 16, max_segments=4, align=4), packing.pack(clips[1:2], (1, 2, 2), 16, align=4)]
  lengths, offsets = layers.segment_spans(jnp.asarray(np.stack([r['segment_s'] for r in rows])), 4)
  np.testing.assert_array_equal(lengths, [[4, 2, 6, -1], [2, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 4, 8, -1, -1], [0, -1, -1, -1, -1]])


def test_paired_spans_attend_exactly_where_segment_ids_do_and_drop_segments_without_keys():
  # Rows of 24 tokens, 3 caption slots of 5; in row 1 segment 3 has queries but an empty caption.
  segments = jnp.array([[1] * 7 + [0] + [2] * 3 + [0] + [3] * 8 + [0] * 4,
                        [1] * 8 + [2] * 8 + [3] * 2 + [0] * 6])
  caption_lengths = np.array([[5, 2, 4], [3, 5, 0]])
  captions = jnp.asarray(np.where(np.arange(5)[None, None] < caption_lengths[..., None],
                                  np.arange(1, 4)[None, :, None], 0).reshape(2, 15))
  for kv_segments in (segments, captions):
    q_spans, kv_spans = layers.paired_spans(segments, kv_segments, 3)
    inside = lambda spans, n: ((jnp.arange(n)[None, None] >= spans[1][:, :-1, None])  # noqa: E731
                               & (jnp.arange(n)[None, None] < spans[1][:, :-1, None] + spans[0][..., None])
                               & (spans[0][..., None] > 0))  # [b, M, tokens]: in kept span m
    span_mask = jnp.einsum('bms,bml->bsl', inside(q_spans, 24).astype(int),
                           inside(kv_spans, kv_segments.shape[1]).astype(int)) > 0
    has_keys = (segments[..., None] == kv_segments[:, None, :]).any(-1)  # [b, s]
    id_mask = (segments[..., None] == kv_segments[:, None, :]) & (segments[..., None] > 0)
    np.testing.assert_array_equal(span_mask, id_mask)
    np.testing.assert_array_equal(q_spans[2], (segments > 0) & has_keys)  # the tokens the kernel computes
  np.testing.assert_array_equal(q_spans[0][1], [8, 8, -1])  # row 1's segment 3: no caption, left out of both
  np.testing.assert_array_equal(kv_spans[0][1], [3, 5, -1])


def test_cudnn_packed_layout_is_off_without_cudnn_and_packed_rows_keep_the_mask_paths():
  layout = layers.PackedLayout(block=4, window=8, slots=3)
  if jax.default_backend() != 'gpu':
    assert not layers.cudnn_packed_layout()
    assert not layers.uses_cudnn_packed_layout('cudnn', layout)
  assert not layers.uses_cudnn_packed_layout('xla', layout)
  assert not layers.uses_cudnn_packed_layout('cudnn', None)
  assert not layers.uses_cudnn_packed_layout('cudnn', layers.PackedLayout(block=4, window=8, slots=1))


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason="cuDNN's packed layout needs an NVIDIA GPU")
def test_cudnn_packed_layout_equals_xla_on_packed_rows_and_their_captions():
  assert layers.cudnn_packed_layout(), 'this GPU\'s cuDNN lacks the packed layout (9.6+) or failed its check'
  rng = np.random.default_rng(7)
  segments = jnp.array([[1] * 70 + [0] * 10 + [2] * 32 + [3] * 16, [1] * 128, [1] * 16 + [2] * 96 + [0] * 16])
  captions = jnp.asarray(np.where(np.arange(32)[None, None] < np.array([[20, 9, 31], [12, 1, 1], [32, 5, 1]])[..., None],
                                  np.arange(1, 4)[None, :, None], 0).reshape(3, 96))
  captions = jnp.where(jnp.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]]).repeat(32, 1) > 0, captions, 0)
  real = (segments > 0)[..., None, None]
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)  # noqa: E731
  q = arr(3, 128, 4, 64)
  for k, v, kv_segments in ((arr(3, 128, 4, 64), arr(3, 128, 4, 64), segments), (arr(3, 96, 4, 64), arr(3, 96, 4, 64), captions)):
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v), 0).astype(jnp.float32) ** 2)  # noqa: E731
    fast = lambda q, k, v: layers.cudnn_segment_attention(q, k, v, segments, kv_segments, 3)  # noqa: E731
    exact = lambda q, k, v: layers.segment_attention(q, k, v, segments, kv_segments)  # noqa: E731
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(jnp.where(real, fast(q, k, v), 0).astype(jnp.float32),
                               jnp.where(real, exact(*f32), 0), atol=0.03)
    for g, g_ref in zip(jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(exact), argnums=(0, 1, 2))(*f32)):
      np.testing.assert_allclose(g.astype(jnp.float32), g_ref, atol=0.1 * float(jnp.max(jnp.abs(g_ref))))
      assert np.isfinite(np.asarray(g.astype(jnp.float32))).all()


@pytest.mark.parametrize('sequence_parallel', ['all_to_all', 'gather_kv'])
def test_sequence_parallel_segment_attention_equals_unsharded(sequence_parallel):
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 24, 4, 8)), jnp.float32) for _ in range(3))
  # Crossing shard edges; rows longer than twice the window (10), so windowed where a device holds whole rows.
  segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 11, [1] * 3 + [0] + [2] * 2 + [3] * 10 + [0] * 8])
  plain = lambda q, k, v: layers.segment_attention(q, k, v, segments, segments)
  # Block-aligned rows (samples start at multiples of 2 tokens, at most 10): the windowed path where
  # a device holds whole rows (all-to-all), the masked one where it holds a share of the queries.
  layout = layers.PackedLayout(block=2, window=10)
  sp = lambda q, k, v: layers.self_attention(q, k, v, sequence_parallel=sequence_parallel, segment_bs=segments,
                                             layout=layout)
  assert_sequence_sharded_equals_unsharded(sp, plain, q, k, v, segments, kv_sequence_sharded=True)


def test_packed_cross_attention_with_queries_sharded_over_sequence_equals_unsharded():
  rng = np.random.default_rng(4)
  # Rows of 24 queries in blocks of 2 (a clip crosses shard edges: 6 queries a device), 3 caption slots of 5.
  segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 11, [1] * 3 + [0] + [2] * 2 + [3] * 10 + [0] * 8])
  layout = layers.PackedLayout(block=2, window=10, slots=3)
  q = jnp.asarray(rng.normal(size=(2, 24, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 15, 4, 8)), jnp.float32) for _ in range(2))
  text_segment = jnp.asarray(np.where(np.arange(5) < np.array([[5], [2], [4]]), np.arange(1, 4)[:, None], 0)
                             .reshape(1, 15).repeat(2, 0))
  cross = lambda q, k, v: layers.slotted_cross_attention(q, k, v, segments, text_segment, layout)  # noqa: E731
  plain = lambda q, k, v: layers.segment_attention(q, k, v, segments, text_segment)  # noqa: E731
  assert_sequence_sharded_equals_unsharded(cross, plain, q, k, v, segments, kv_sequence_sharded=False)


def assert_sequence_sharded_equals_unsharded(attend, plain, q, k, v, segments, *, kv_sequence_sharded: bool):
  """On a data=2 x sequence=4 mesh with the queries sharded over 'sequence' (and the keys too, or
  whole), `attend` gives `plain`'s outputs and gradients on real (segment > 0) queries."""
  from configs.shapes import SHARDING_RULES
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1, sequence=4))
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where((segments > 0)[..., None, None], f(q, k, v), 0) ** 2)  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_tuple(SHARDING_RULES)):
    q = jax.device_put(q, NamedSharding(mesh, P(('data', 'fsdp'), 'sequence', 'tensor')))
    kv_spec = NamedSharding(mesh, P(('data', 'fsdp'), 'sequence' if kv_sequence_sharded else None, 'tensor'))
    k, v = (jax.device_put(x, kv_spec) for x in (k, v))
    out = jax.jit(attend)(q, k, v)
    grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(plain(q, k, v))[real], atol=1e-6)
  for g, g_ref in zip(grads, jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g_ref, atol=2e-5)
