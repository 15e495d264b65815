"""Frame conditioning: the training masks, the loss, the DiT's mask embedding and the sampler's
given frames (image-to-video, extension, interpolation, loops, editing)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax import prompting, video
from sora_jax.diffusion import frame_conditioning as fc
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.models import dit

ALL = dict(first=1, first_k=1, last=1, last_k=1, first_last=1, keyframes=1)


@pytest.mark.parametrize('name, frames, expected', [
    ('first', 4, [1, 0, 0, 0]),
    ('last', 4, [0, 0, 0, 1]),
    ('first_last', 4, [1, 0, 0, 1]),
    ('first_last', 2, [0, 0]),  # would leave nothing to generate: unconditioned instead
])
def test_each_strategy_gives_its_mask(name, frames, expected):
  masks = fc.sample_masks(jax.random.key(0), 16, frames, probability=1.0, weights={name: 1.0})
  np.testing.assert_array_equal(masks, np.broadcast_to(np.array(expected, bool), (16, frames)))


def test_first_k_and_last_k_give_prefixes_and_suffixes_of_every_length_and_keyframes_never_cover_the_clip():
  masks = np.asarray(fc.sample_masks(jax.random.key(1), 512, 6, probability=1.0, weights={'first_k': 1}))
  k = masks.sum(1)
  assert set(k) == {1, 2, 3, 4, 5}
  np.testing.assert_array_equal(masks, np.arange(6)[None] < k[:, None])  # prefixes
  masks = np.asarray(fc.sample_masks(jax.random.key(1), 512, 6, probability=1.0, weights={'last_k': 1}))
  k = masks.sum(1)
  assert set(k) == {1, 2, 3, 4, 5}
  np.testing.assert_array_equal(masks, np.arange(6)[None] >= 6 - k[:, None])  # suffixes
  keys = np.asarray(fc.sample_masks(jax.random.key(2), 512, 4, probability=1.0, weights={'keyframes': 1},
                                    keyframe_rate=0.9))
  assert keys.any() and not keys.all(axis=1).any()


def test_probability_sets_the_conditioned_share_and_one_frame_clips_are_never_conditioned():
  masks = np.asarray(fc.sample_masks(jax.random.key(3), 4000, 8, probability=0.3, weights=ALL))
  assert abs(masks.any(1).mean() - 0.3 * (1 - (0.7 ** 8 + 0.3 ** 8) / 6)) < 0.03
  assert not np.asarray(fc.sample_masks(jax.random.key(3), 64, 8, probability=0.0, weights=ALL)).any()
  assert not np.asarray(fc.sample_masks(jax.random.key(3), 64, 1, probability=1.0, weights=ALL)).any()
  with pytest.raises(ValueError, match='unknown strategies'):
    fc.sample_masks(jax.random.key(0), 2, 4, probability=1.0, weights={'middle': 1})


def test_clips_of_several_lengths_draw_masks_within_their_own_frames():
  lengths = np.array([1, 2, 4, 8] * 256)
  for name in fc.STRATEGIES:
    masks = np.asarray(fc.sample_masks(jax.random.key(4), len(lengths), 8, probability=1.0, weights={name: 1},
                                       frames_b=lengths))
    inside = np.arange(8)[None] < lengths[:, None]
    assert not (masks & ~inside).any(), name  # never past a clip's end
    assert not masks[lengths == 1].any() and not (masks | ~inside).all(1).any(), name  # something to generate
    if name == 'last':
      np.testing.assert_array_equal(masks[lengths > 1].argmax(1), lengths[lengths > 1] - 1)
  same = fc.sample_masks(jax.random.key(5), 64, 8, probability=0.5, weights=ALL, frames_b=np.full(64, 8))
  np.testing.assert_array_equal(same, fc.sample_masks(jax.random.key(5), 64, 8, probability=0.5, weights=ALL))


def test_latent_masks_follow_a_causal_vaes_frame_spans():
  pixel = np.zeros(9, bool)
  np.testing.assert_array_equal(fc.latent_frame_mask(np.eye(9, dtype=bool)[0], 4), [1, 0, 0])
  np.testing.assert_array_equal(fc.latent_frame_mask(np.eye(9, dtype=bool)[8], 4), [0, 0, 1])
  pixel[:5] = True
  np.testing.assert_array_equal(fc.latent_frame_mask(pixel, 4), [1, 1, 0])
  np.testing.assert_array_equal(fc.latent_frame_mask(pixel, 1), pixel)


def test_the_loss_sees_given_frames_clean_and_ignores_the_networks_output_on_them():
  x0 = jax.random.normal(jax.random.key(0), (2, 4, 3, 3, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0.5, 0.9])
  given = jnp.array([[True, False, False, False], [True, True, False, True]])
  seen = []

  def net(x_t, t_b, bump):
    seen.append(x_t)
    return x0 + bump

  bump_given = jnp.where(given[..., None, None, None], 5.0, 0.0)  # wrong only on given frames
  loss_given, _ = rf.loss(lambda x, tb: net(x, tb, bump_given), x0, noise, t, prediction_type='x0',
                          given_bt=given)
  assert float(loss_given) == 0.0
  np.testing.assert_array_equal(np.asarray(seen[0])[np.asarray(given)], np.asarray(x0)[np.asarray(given)])  # clean
  assert not np.allclose(np.asarray(seen[0])[~np.asarray(given)], np.asarray(x0)[~np.asarray(given)])
  loss_other, per_sample = rf.loss(lambda x, tb: net(x, tb, 1.0 - bump_given / 5), x0, noise, t,
                                   prediction_type='x0', min_t=0.0, given_bt=given)
  np.testing.assert_allclose(per_sample, 1 / t ** 2, rtol=1e-6)  # mean over generated values only


def tiny_dit(frame_conditioning=True):
  """A random DiT with every parameter perturbed (adaLN-Zero would make its output 0)."""
  model = dit.DiT(channels=3, patch=(2, 4, 4), width=32, depth=1, num_heads=2, text_width=16, text_depth=1,
                  text_heads=2, frame_conditioning=frame_conditioning, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
  return model


def test_the_dit_marks_given_frames_and_an_empty_mask_is_no_mask():
  model = functools.partial(nnx.jit(lambda m, *args, **kwargs: m(*args, **kwargs)), tiny_dit())  # not op by op
  x = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 3))
  t, tokens, tmask = jnp.array([0.3, 0.7]), jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), bool)
  plain = model(x, t, tokens, tmask)
  np.testing.assert_allclose(model(x, t, tokens, tmask, frame_mask_bt=jnp.zeros((2, 4), bool)), plain, atol=1e-6)
  marked = model(x, t, tokens, tmask, frame_mask_bt=jnp.array([[1, 0, 0, 0], [0, 0, 0, 0]], bool))
  assert not np.allclose(marked[0], plain[0], atol=1e-4)
  np.testing.assert_allclose(marked[1], plain[1], atol=1e-6)
  with pytest.raises(ValueError, match='frame_conditioning'):
    tiny_dit(False)(x, t, tokens, tmask, frame_mask_bt=jnp.zeros((2, 4), bool))


@pytest.mark.parametrize('given, expected', [
    ('11110000', True), ('00001111', True), ('11000000', True),  # extension, backward, a shorter clip
    ('10000000', False), ('10000001', False), ('11110001', False),  # image-to-video, interpolation, a loop's bridge
    ('01110000', False), ('11111111', False), ('00000000', False)])
def test_extensions_are_one_run_of_given_frames_at_either_end(given, expected):
  from sora_jax import sample
  assert sample.is_extension([c == '1' for c in given]) is expected


@pytest.mark.parametrize('frames, window, backward, expected', [
    (8, 8, False, [0]), (5, 8, False, [0]), (16, 8, False, [0, 4, 8]), (13, 8, False, [0, 4, 5]),
    (13, 8, True, [5, 1, 0]),
])
def test_windows_overlap_by_half_and_end_at_the_output(frames, window, backward, expected):
  assert prompting.windows(frames, window, backward) == expected


# ------------------------------------------------------------------------------------------------
# A tiny frame-conditioned model (configs/shapes.py:tiny trains with frame conditioning on).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def conditioned_workdir(data_dir, tmp_path_factory):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes as shapes_config
  from sora_jax import train
  config = shapes_config.get_config('tiny')
  config.data.data_dir = data_dir
  config.sample.prompts = ()
  assert config.model.frame_conditioning and config.frame_conditioning.probability > 0
  workdir = str(tmp_path_factory.mktemp('conditioned') / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def clip(direction='right', color='red', frames=8):
  from sora_jax.data import shapes
  start = {'right': (16, 8), 'left': (16, 24), 'down': (8, 16), 'up': (24, 16)}[direction]
  return shapes.render_clip(color, 'circle', direction, frames=frames, height=32, width=32, object_size=12,
                            start_yx=start, displacement=12)


PROMPTS = ['a red circle moving right', 'a blue square moving up']


def test_every_mode_returns_the_given_frames_unchanged(conditioned_workdir, caplog):
  import logging
  from sora_jax import UsageError, sample
  caplog.set_level(logging.INFO, logger='absl')
  model = sample.load(conditioned_workdir)
  c = clip()
  kw = dict(num_steps=2)
  v = prompting.keyframes(model, PROMPTS, [(c[0], 0)], **kw)  # image-to-video
  assert v.shape == (2, 8, 32, 32, 3) and (v[:, 0] == c[0]).all()
  v = prompting.keyframes(model, PROMPTS, [(c[0], 0), (c[-1], -1)], frame_guidance_scale=2.0, **kw)
  assert (v[:, 0] == c[0]).all() and (v[:, -1] == c[-1]).all()
  caplog.clear()
  v, note = prompting.extend(model, PROMPTS, c[:3], frames=13, **kw)  # 3 windows
  assert v.shape[1] == 13 and (v[:, :3] == c[:3]).all() and note is None
  # A long video reports each window with its time and an ETA; a one-window output reports nothing.
  progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith('window ')]
  assert [m.split(':')[0] for m in progress] == [
      'window 1/3 (frames 0-7)', 'window 2/3 (frames 4-11)', 'window 3/3 (frames 5-12)']
  assert all(', ETA ' in m for m in progress), progress
  caplog.clear()
  v, note = prompting.extend(model, PROMPTS, c, backward=True, **kw)
  assert (v[:, 4:] == c[:4]).all() and note.startswith('extend_backward:') and 'keeping its first 4' in note
  assert not [r for r in caplog.records if r.getMessage().startswith('window ')]
  v = prompting.keyframes(model, PROMPTS, [(c[0], 0), (c[6], -2)], loop=True, **kw)
  assert v.shape[1] == 8 and (v[:, 0] == c[0]).all() and (v[:, 6] == c[6]).all()
  v, _ = prompting.edit(model, PROMPTS, c, strength=0.5, **kw)
  assert v.shape == (2, 8, 32, 32, 3)
  wide = clip(frames=4)[:, :, np.r_[0:32, 0:16]]  # 32 x 48: given frames of another size set the output's
  v, _ = prompting.extend(model, PROMPTS[:1], wide, **kw)
  assert v.shape == (1, 8, 32, 48, 3) and (v[0, :4] == wide).all()
  # Reconstruction guidance changes the generated frames, never the given ones. By default it guides
  # extensions (the config's extension_reconstruction_guidance) and nothing else.
  plain, _ = prompting.extend(model, PROMPTS, c[:4], reconstruction_guidance=0.0, **kw)
  guided, _ = prompting.extend(model, PROMPTS, c[:4], reconstruction_guidance=50.0, **kw)
  assert (plain[:, :4] == c[:4]).all() and (guided[:, :4] == c[:4]).all()
  assert not np.array_equal(plain[:, 4:], guided[:, 4:])
  sample_cfg = model.config.sample
  assert sample_cfg.reconstruction_guidance == 0 and sample_cfg.extension_reconstruction_guidance == 15
  by_default, _ = prompting.extend(model, PROMPTS, c[:4], **kw)
  np.testing.assert_array_equal(by_default, prompting.extend(model, PROMPTS, c[:4], reconstruction_guidance=15.0, **kw)[0])
  assert not np.array_equal(by_default, plain)
  ends = [(c[0], 0), (c[7], 7)]
  np.testing.assert_array_equal(prompting.keyframes(model, PROMPTS, ends, **kw),
                                prompting.keyframes(model, PROMPTS, ends, reconstruction_guidance=0.0, **kw))
  with pytest.raises(UsageError, match='reconstruction_guidance=-1'):
    prompting.extend(model, PROMPTS, c[:4], reconstruction_guidance=-1.0, **kw)
  # The same seed and prompt give the same video whatever else is in the batch.
  one = prompting.keyframes(model, PROMPTS[:1], [(c[0], 0)], **kw)
  np.testing.assert_array_equal(one[0], prompting.keyframes(model, PROMPTS, [(c[0], 0)], **kw)[0])


def test_sdedit_at_full_strength_is_plain_sampling_and_below_it_starts_from_the_input(conditioned_workdir):
  from sora_jax import sample
  model = sample.load(conditioned_workdir)
  full = sample.generate(model, PROMPTS, edit=clip(), strength=1.0, num_steps=2, seed=3, guidance_scale=2.0)
  np.testing.assert_array_equal(full, sample.generate(model, PROMPTS, num_steps=2, seed=3, guidance_scale=2.0))
  right = sample.generate(model, PROMPTS, edit=clip('right'), strength=0.5, num_steps=2, seed=3)
  left = sample.generate(model, PROMPTS, edit=clip('left'), strength=0.5, num_steps=2, seed=3)
  assert not np.array_equal(right, left) and not np.array_equal(right, full)
  # An edit's unset guidance is EDIT_GUIDANCE (text-to-video's is the config's).
  np.testing.assert_array_equal(right, sample.generate(model, PROMPTS, edit=clip('right'), strength=0.5, num_steps=2,
                                                       seed=3, guidance_scale=sample.EDIT_GUIDANCE))


def test_flowedit_to_the_source_prompt_unguided_returns_the_input_and_a_guided_edit_changes_it(conditioned_workdir):
  from sora_jax import UsageError, sample
  model = sample.load(conditioned_workdir)
  c = clip()
  kw = dict(edit=c, strength=0.85, num_steps=3, seed=2, edit_method='flowedit')
  # Both velocities are the network's under the same caption at the same point (up to float rounding), so
  # no step moves the clip, however many noises a step averages: it comes back unchanged in uint8.
  for draws in (1, 3):
    same = sample.generate(model, PROMPTS, guidance_scale=1.0, source_prompts=PROMPTS, flowedit_noise_draws=draws,
                           **kw)
    np.testing.assert_array_equal(same, np.broadcast_to(c, same.shape))
  changed = sample.generate(model, PROMPTS, guidance_scale=4.0, source_prompts=[''] * 2, **kw)
  assert not np.array_equal(changed, same)
  single = sample.generate(model, PROMPTS, guidance_scale=4.0, source_prompts=[''] * 2, flowedit_noise_draws=1, **kw)
  assert not np.array_equal(changed, single)  # the default averages several noises a step
  for draws in (0, 1.5):
    with pytest.raises(UsageError, match=f'flowedit_noise_draws={draws}: use a whole number >= 1'):
      sample.generate(model, PROMPTS, flowedit_noise_draws=draws, **kw)
  with pytest.raises(UsageError, match='1 source prompts for 2 prompts'):
    sample.generate(model, PROMPTS, source_prompts=PROMPTS[:1], **kw)
  with pytest.raises(UsageError, match='edit_method='):
    sample.generate(model, PROMPTS, **{**kw, 'edit_method': 'inversion'})
  for bad in (dict(source_prompts=PROMPTS), dict(flowedit_noise_draws=2)):
    with pytest.raises(UsageError, match='source_prompts and flowedit_noise_draws go with edit_method="flowedit"'):
      sample.generate(model, PROMPTS, edit=c, strength=0.5, **bad)


def test_bad_inputs_are_one_line_errors(conditioned_workdir, tmp_path):
  from PIL import Image
  from sora_jax import UsageError, sample
  bad = tmp_path / 'notes.png'
  bad.write_text('not an image')
  with pytest.raises(UsageError, match='cannot read image .*notes.png'):
    prompting.read_image(str(bad), 32, 32)
  with pytest.raises(UsageError, match='cannot read video .*missing.gif'):
    prompting.read_video(str(tmp_path / 'missing.gif'), 32, 32)
  with pytest.raises(UsageError, match='keyframe @8: outside an output of 8 frames'):
    prompting.given_frames(8, [(clip()[0], 8)])
  # Two frames for one place: an error, not the later one silently.
  with pytest.raises(UsageError, match='keyframe @2: output frame 2 is already given by the video'):
    prompting.given_frames(8, [(clip()[0], 2)], clip()[:4])
  with pytest.raises(UsageError, match='keyframe @-1: output frame 7 is already given by another keyframe'):
    prompting.given_frames(8, [(clip()[0], 7), (clip()[1], -1)])
  # Notebook misuse: a string for a list, frames that are not uint8, options without their input.
  model = sample.load(conditioned_workdir)
  c = clip()
  with pytest.raises(UsageError, match="prompts='a red circle': give a list"):
    sample.generate(model, 'a red circle', num_steps=1)
  with pytest.raises(UsageError, match='given: frames of dtype float32; give uint8'):
    sample.generate(model, PROMPTS, given=c.astype(np.float32) / 255, given_mask=np.eye(8, dtype=bool)[0])
  with pytest.raises(UsageError, match='strength and edit_method go with edit='):
    sample.generate(model, PROMPTS, strength=0.5)
  with pytest.raises(UsageError, match='given frame @9: outside an output of 8 frames'):
    prompting.generate_frames(model, PROMPTS, {9: c[0]}, frames=8)
  with pytest.raises(UsageError, match=r'given frame 0: float64 \(32, 32, 3\); expected uint8 \(32, 32, 3\)'):
    prompting.keyframes(model, PROMPTS, [(c[0] / 255, 0)])
  with pytest.raises(UsageError, match='frames=0: need at least one frame'):
    prompting.keyframes(model, PROMPTS, [(c[0], 0)], frames=0)
  with pytest.raises(UsageError, match='loop: every frame of its bridge'):
    prompting.extend(model, PROMPTS, c[:4], backward=True, loop=True)
  with pytest.raises(UsageError, match=r'x: frames float64 \(8, 32, 32, 3\); expected uint8'):
    prompting.fit_frames(c / 255, 16, 16, 'x')
  gray16 = tmp_path / 'gray16.png'  # 16-bit gray: not clipped to white
  Image.fromarray(np.full((32, 32), 128 * 257, np.uint16)).save(gray16)
  assert (prompting.read_image(str(gray16), 32, 32)[0] == 128).all()
  gif = str(tmp_path / 'clip.gif')
  video.write(gif, clip(), fps=8)
  with pytest.raises(UsageError, match='it has 8 frames; a keyframe is one image'):
    prompting.read_image(gif, 32, 32)
  mp4 = str(tmp_path / 'clip.mp4')
  video.write(mp4, clip(), fps=8)
  with pytest.raises(UsageError, match='clip.mp4: it is a video; a keyframe is one image'):
    prompting.read_image(mp4, 32, 32)
  with pytest.raises(UsageError, match='use PATH@INDEX'):
    sample.parse_keyframes(['first.png'])
  assert sample.parse_keyframes(['a@b.png@-1']) == [('a@b.png', -1)]
  with pytest.raises(UsageError, match='strength=0'):
    sample.generate(model, PROMPTS, edit=clip(), strength=0)
  plain = sample.Model(**{**model.__dict__, 'config': model.config.copy_and_resolve_references()})
  plain.config.model.frame_conditioning = False
  with pytest.raises(UsageError, match='trained without frame conditioning'):
    sample.generate(plain, PROMPTS, given=clip(), given_mask=np.eye(8, dtype=bool)[0])


def test_images_of_another_size_are_resized_and_center_cropped_with_a_note(tmp_path):
  from PIL import Image
  wide = np.zeros((32, 64, 3), np.uint8)
  wide[:, 16:48] = 255  # the center square
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  image, note = prompting.read_image(str(tmp_path / 'wide.png'), 16, 16)
  assert image.shape == (16, 16, 3) and image.mean() > 250  # the bright center, not the dark sides
  assert note.endswith('wide.png: 64x32 resized and center-cropped to 16x16')
  assert prompting.read_image(str(tmp_path / 'wide.png'), 32, 64)[1] is None


# Several CLI invocations in one process (absl parsing and `sample.main` as `python -m sora_jax.sample`
# runs them), so that they share one compile: each flag end to end, and the bad-input errors.
CLI_DRIVER = r'''
import json, sys
from absl import flags
from sora_jax import sample
sample.define_flags()
results = []
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['sample'] + argv)
  try:
    sample.main([])
    results.append('ok')
  except SystemExit as e:
    results.append(str(e.code))
print('RESULTS ' + json.dumps(results))
'''


@pytest.mark.slow
def test_each_prompting_flag_end_to_end(conditioned_workdir, tmp_path):
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  from PIL import Image
  from sora_jax import video
  from tests.conftest import subprocess_env
  c = clip()
  big_first = np.asarray(Image.fromarray(c[0]).resize((64, 64), Image.Resampling.NEAREST))
  Image.fromarray(big_first).save(tmp_path / 'first.png')
  Image.fromarray(c[-1]).save(tmp_path / 'last.png')
  video.write(str(tmp_path / 'clip.gif'), c[:4])
  common = [f'--workdir={conditioned_workdir}', '--prompt=a red circle moving right', '--steps=2']
  config_only = tmp_path / 'config_only'
  config_only.mkdir()
  (config_only / 'config.json').write_text((Path(conditioned_workdir) / 'config.json').read_text())
  out = lambda name: f'--out={tmp_path / name}'
  runs = [
      common + [out('kf.gif'), f'--keyframe={tmp_path}/first.png@0', f'--keyframe={tmp_path}/last.png@-1',
                '--frames=12', '--loop', '--frame_guidance_scale=2'],
      common + [out('ext.gif'), f'--extend={tmp_path}/clip.gif', '--frames=10', '--reconstruction_guidance=15'],
      common + [out('back.gif'), f'--extend_backward={tmp_path}/clip.gif'],
      common + [out('edit.gif'), f'--edit={tmp_path}/clip.gif', '--strength=0.7'],
      common + [out('x.gif'), f'--keyframe={tmp_path}/nothing.png@0'],
      common + [out('x.gif'), f'--keyframe={tmp_path}/first.png'],
      common + [out('x.gif'), '--strength=0.5'],
      common + [out('x.gif'), f'--extend={tmp_path}/clip.gif', f'--extend_backward={tmp_path}/clip.gif'],
      # Sizes (native-size sampling): another frame size, a one-frame .png, and the size errors.
      common + [out('wide.gif'), '--height=32', '--width=48', f'--extend={tmp_path}/clip.gif'],
      common + [out('image.png'), '--frames=1'],
      common + [out('x.gif'), '--width=30'],
      common + [out('x.png')],
      common + [out('x.gif'), '--height=512', '--width=512'],
      common + [out('flowedit.gif'), f'--edit={tmp_path}/clip.gif', '--edit_method=flowedit',
                '--source_prompt=a blue circle moving right', '--flowedit_noise_draws=2'],
      common + [out('x.gif'), f'--edit={tmp_path}/clip.gif', '--source_prompt=a blue circle moving right'],
      common + [out('x.gif'), '--edit_method=flowedit'],
      common + [out('x.gif'), f'--extend={tmp_path}/clip.gif', '--reconstruction_guidance=-1'],
      common + [out('x.gif'), f'--edit={tmp_path}/clip.gif', '--flowedit_noise_draws=2'],
      common + [out('x.gif'), f'--edit={tmp_path}/clip.gif', '--edit_method=flowedit', '--flowedit_noise_draws=0'],
      common + [out('x.gif'), '--steps=0'],
      common + [out('x.gif'), f'--workdir={config_only}', '--frames=4', '--loop'],  # no checkpoint to load
      common + [out('x.gif'), '--loop', f'--extend_backward={tmp_path}/clip.gif'],
      common + [out('x.gif'), f'--extend={tmp_path}/clip.gif', f'--keyframe={tmp_path}/last.png@2'],
      common + [out('edit4.gif'), f'--edit={tmp_path}/clip.gif', '--frames=4'],
      common + [out('x.gif'), f'--workdir={config_only}', f'--keyframe={tmp_path}/late.png@9'],  # nothing to load
  ]
  Image.fromarray(big_first).save(tmp_path / 'late.png')
  result = subprocess.run([sys.executable, '-c', CLI_DRIVER, json.dumps(runs)], cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert 'RESULTS' in result.stdout, result.stderr[-3000:]
  codes = json.loads(result.stdout.split('RESULTS ')[1])
  assert codes[:4] == ['ok'] * 4, (codes, result.stderr[-3000:])
  assert 'first.png: 64x64 resized and center-cropped to 32x32' in result.stdout
  kf = video.read(str(tmp_path / 'kf.gif'))
  first = prompting.read_image(str(tmp_path / 'first.png'), 32, 32)[0]  # resized as the CLI did
  assert kf.shape == (12, 32, 32, 3) and (kf[0] == first).all() and (kf[-1] == c[-1]).all()
  ext = video.read(str(tmp_path / 'ext.gif'))
  assert ext.shape == (10, 32, 32, 3) and (ext[:4] == c[:4]).all()
  back = video.read(str(tmp_path / 'back.gif'))
  assert back.shape == (8, 32, 32, 3) and (back[4:] == c[:4]).all()
  assert video.read(str(tmp_path / 'edit.gif')).shape == (8, 32, 32, 3)
  assert 'cannot read image' in codes[4] and 'nothing.png' in codes[4]
  assert 'use PATH@INDEX' in codes[5]
  assert '--strength goes with --edit' in codes[6]
  assert 'give one' in codes[7]
  assert codes[8:10] == ['ok'] * 2, (codes, result.stderr[-3000:])
  wide = video.read(str(tmp_path / 'wide.gif'))
  assert wide.shape == (8, 32, 48, 3) and 'clip.gif: 32x32 resized and center-cropped to 48x32' in result.stdout
  assert video.read(str(tmp_path / 'image.png')).shape == (1, 32, 32, 3)
  assert 'config.model.patch=(2, 8, 8) does not divide --width=30' in codes[10]
  assert 'a .png holds one frame' in codes[11]
  assert '16384 spacetime patches, more than config.sample.max_tokens=1024' in codes[12]
  assert codes[13] == 'ok' and video.read(str(tmp_path / 'flowedit.gif')).shape == (8, 32, 32, 3)
  assert '--source_prompt goes with --edit_method=flowedit' in codes[14]
  assert '--edit_method and --source_prompt go with --edit' in codes[15]
  assert '--reconstruction_guidance=-1.0: use a scale >= 0' in codes[16]
  assert '--flowedit_noise_draws goes with --edit_method=flowedit' in codes[17]
  assert '--flowedit_noise_draws=0: use a whole number >= 1' in codes[18]
  assert '--steps=0: must be a positive integer' in codes[19]
  assert 'loop: needs an output of at least 8 frames' in codes[20]  # said before loading (there is nothing to load)
  assert '--loop and --extend_backward' in codes[21]
  assert 'keyframe @2: output frame 2 is already given by the video' in codes[22]
  assert codes[23] == 'ok' and (video.read(str(tmp_path / 'edit4.gif')).shape == (4, 32, 32, 3))
  assert codes[24] == 'error: keyframe @9: outside an output of 8 frames' and 'late.png' not in result.stdout  # unread
  assert all('\n' not in code for code in codes)


@pytest.mark.slow
@pytest.mark.parametrize('args', [['--modes=image_to_video,extend,extend_backward,interpolate,edit'],
                                  ['--modes=edit', '--edit_method=flowedit', '--flowedit_noise_draws=2']])
def test_eval_prompting_scores_every_mode_and_edit_method(conditioned_workdir, args):
  import json
  import os
  import subprocess
  import sys
  from tests.conftest import subprocess_env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, 'experiments/eval_prompting.py', f'--workdir={conditioned_workdir}',
                           '--cases=2', '--steps=2', *args], cwd=root, env=subprocess_env(1), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.strip().splitlines()[-1])
  modes = args[0].split('=')[1].split(',')
  assert all(0 <= r[m] <= 1 for m in modes) and r['exact_given'] and r['cases'] == 2
  assert f'{modes[-1]}: 2/2 cases, ' in result.stderr and ', ETA 0:00:00' in result.stderr  # progress, on stderr
  flowedit = 'flowedit' in ' '.join(args)
  assert (r['edit_method'], r['strength'], r['edit_guidance_scale'], r['flowedit_noise_draws']) == (
      ('flowedit', 0.85, 3.0, 2) if flowedit else ('sdedit', 0.7, 3.0, None))


def test_sampling_at_another_size_gives_exactly_that_size_and_the_default_is_the_config(conditioned_workdir):
  from sora_jax import UsageError, sample
  model = sample.load(conditioned_workdir)
  kw = dict(num_steps=2, seed=1)
  np.testing.assert_array_equal(sample.generate(model, PROMPTS, size=(8, 32, 32), **kw),
                                sample.generate(model, PROMPTS, **kw))
  assert sample.generate(model, PROMPTS, size=(4, 16, 56), **kw).shape == (2, 4, 16, 56, 3)
  with pytest.raises(UsageError, match='does not divide height=20'):
    sample.generate(model, PROMPTS, size=(8, 20, 32), **kw)


def test_the_time_shift_grows_with_the_square_root_of_the_token_count():
  from sora_jax.diffusion import rectified_flow as rf
  assert rf.size_shift(1.5, 1000, None) == 1.5 and rf.size_shift(1.5, 1000, 0) == 1.5  # off
  np.testing.assert_allclose(rf.size_shift(1.0, [64, 256, 16], 64), [1.0, 2.0, 0.5])
  t = np.linspace(0.1, 0.9, 5)
  assert (rf.shift_time(t, rf.size_shift(1.0, 256, 64)) > t).all()  # more tokens: noisier


def test_a_conditioning_probability_without_the_models_mark_is_refused(tiny_config):
  from sora_jax import UsageError, train
  tiny_config.model.frame_conditioning = False
  with pytest.raises(UsageError, match='config.model.frame_conditioning=True'):
    train.validate_config(tiny_config, 8)
  tiny_config.frame_conditioning.probability = 0.0
  train.validate_config(tiny_config, 8)
  tiny_config.model.frame_conditioning = True
  tiny_config.frame_conditioning.update(probability=0.5, strategies={'middle': 1.0})
  with pytest.raises(UsageError, match="unknown strategies \\['middle'\\]"):
    train.validate_config(tiny_config, 8)


def test_the_extension_probe_reports_speed_slope_and_path_error_per_noise_level(conditioned_workdir):
  import json
  import os
  import subprocess
  import sys
  from sora_jax.eval import adherence
  from tests.conftest import subprocess_env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # On a clean clip the brightness centroid is the judge's centroid.
  c = clip()
  np.testing.assert_allclose(adherence.soft_centroids(c[None].astype(np.float32) / 127.5 - 1.0)[0],
                             adherence.centroids(c), atol=1e-4)
  result = subprocess.run([sys.executable, 'experiments/extension_probe.py', f'--workdir={conditioned_workdir}',
                           '--cases=4', '--noise_levels=1,0.5'], cwd=root, env=subprocess_env(1, PYTHONPATH=root),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  line = json.loads(result.stdout.splitlines()[-1])
  assert set(line) >= {'t=1', 't=0.5'} and line['cases'] == 4
  assert all(np.isfinite(line[k]['speed_slope']) and 0 <= line[k]['right'] <= 1 for k in ('t=1', 't=0.5'))
