"""Evaluation: the Fréchet distance, FVD's behaviour, the I3D import, the shapes classifier and the
prompting judge's paths."""

import os

import numpy as np
import pytest
import scipy.linalg

from sora_jax import UsageError
from sora_jax.data import shapes
from sora_jax.eval import adherence, classifier, fvd, i3d


def _random_stats(rng, n=400, d=6):
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  return a, fvd.Statistics.of(a)


def test_frechet_distance_matches_a_direct_scipy_computation():
  rng = np.random.default_rng(0)
  fa, a = _random_stats(rng)
  fb, b = _random_stats(rng)
  fb = fb + 0.3
  b = fvd.Statistics.of(fb)
  mu1, mu2 = fa.mean(0), fb.mean(0)
  s1, s2 = np.cov(fa.T), np.cov(fb.T)
  # Tr((S1 S2)^1/2) through the symmetric form S1^1/2 S2 S1^1/2, whose square root is real.
  r1 = scipy.linalg.sqrtm(s1).real
  expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
  assert fvd.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
  a = fvd.Statistics(mu=np.array([0.0, 1.0]), sigma=np.diag([1.0, 4.0]), count=10)
  b = fvd.Statistics(mu=np.array([2.0, 1.0]), sigma=np.diag([9.0, 4.0]), count=10)
  # |mu|^2 = 4; per axis (sqrt s1 - sqrt s2)^2 = (1 - 3)^2 + 0 = 4
  assert fvd.frechet_distance(a, b) == pytest.approx(8.0, abs=1e-9)


def test_fvd_is_zero_for_identical_sets_and_grows_quadratically_with_a_shift():
  rng = np.random.default_rng(1)
  videos = rng.integers(0, 200, (64, 4, 8, 8, 3)).astype(np.uint8)
  proj = rng.normal(size=(4 * 8 * 8 * 3, 5))
  feature_fn = lambda v: v.reshape(len(v), -1).astype(np.float64) @ proj  # noqa: E731 - linear features
  assert fvd.fvd(feature_fn, videos, videos, batch_size=24) == pytest.approx(0.0, abs=1e-6)
  shift = (proj.sum(axis=0) ** 2).sum()  # brightening every pixel by 1 moves the features by proj.sum(0)
  for k in (1, 2, 5):
    assert fvd.fvd(feature_fn, videos, videos + k, batch_size=24) == pytest.approx(k * k * shift, rel=1e-6)


def test_statistics_round_trip_and_bad_features(tmp_path):
  _, a = _random_stats(np.random.default_rng(2))
  a.save(tmp_path / 'real.npz')
  b = fvd.Statistics.load(str(tmp_path / 'real.npz'))
  assert fvd.frechet_distance(a, b) == pytest.approx(0.0, abs=1e-8) and b.count == a.count
  with pytest.raises(ValueError, match='N >= 2'):
    fvd.Statistics.of(np.zeros((1, 3)))


@pytest.mark.slow
def test_i3d_import_matches_the_reference_pytorch_i3d(tmp_path):
  """A random piergiaj InceptionI3d (cd-fvd's copy), saved as a state dict, converted: same logits,
  including the preprocessing (32 x 32 uint8 frames resized to 224)."""
  pytest.importorskip('cdfvd', reason="the reference: pip install --no-deps cd-fvd==0.1.1 (README, Tests)")
  import torch
  from cdfvd.third_party.i3d import pytorch_i3d, utils as ref_utils

  torch.manual_seed(0)
  net = pytorch_i3d.InceptionI3d(400, in_channels=3).eval()
  with torch.no_grad():  # non-trivial batch-norm statistics, so that their import is checked too
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm3d):
        m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
  path = str(tmp_path / 'i3d.pt')
  torch.save(net.state_dict(), path)
  videos = np.random.default_rng(0).integers(0, 256, (2, 10, 32, 32, 3), dtype=np.uint8)
  x = ref_utils.preprocess_i3d(videos)
  np.testing.assert_allclose(np.asarray(i3d.preprocess(videos)), x.permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
  with torch.no_grad():
    ref = net(x).numpy()
  ours = i3d.load(path)(videos)
  assert ours.shape == (2, 400)
  np.testing.assert_allclose(ours, ref, atol=1e-6 + 1e-4 * np.abs(ref).max())
  # The .npz conversion reads back without torch and gives the same features.
  npz = str(tmp_path / 'i3d.npz')
  np.savez(npz, **i3d.read_state_dict(path))
  np.testing.assert_array_equal(i3d.load(npz)(videos), ours)


def test_i3d_refuses_bad_checkpoints_and_short_clips(tmp_path):
  with pytest.raises(UsageError, match='no such file'):
    i3d.load(str(tmp_path / 'missing.pt'))
  bad = tmp_path / 'bad.pt'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(UsageError, match='bad.pt: not a readable PyTorch state dict'):
    i3d.load(str(bad))
  np.savez(tmp_path / 'other.npz', **{'fc.weight': np.zeros((2, 2))})
  with pytest.raises(UsageError, match='other.npz: not a piergiaj InceptionI3d checkpoint'):
    i3d.load(str(tmp_path / 'other.npz'))
  from flax import nnx
  features = i3d.Features(nnx.eval_shape(lambda: i3d.InceptionI3d(rngs=nnx.Rngs(0))))
  with pytest.raises(UsageError, match='T >= 9'):
    features(np.zeros((1, 8, 32, 32, 3), np.uint8))


@pytest.fixture(scope='module')
def shapes_classifier():
  # The session's cache (tests/conftest.py), whose default is these 150 steps: trained once, for the
  # tests that evaluate 8x32x32 clips too.
  return classifier.load_or_train(steps=150)


def test_shapes_classifier_is_accurate_on_held_out_clips(shapes_classifier):
  videos, labels = classifier.labelled_batch(np.random.default_rng(777), shapes_classifier.size, 256)
  predicted = shapes_classifier.predict(videos)
  for head in classifier.HEADS:
    assert (predicted[head] == labels[head]).mean() >= 0.97, head
  prompts = [classifier.shapes.caption(classifier.shapes.COLOR_NAMES[c], classifier.shapes.SHAPES[s],
                                       classifier.shapes.DIRECTION_NAMES[d])
             for c, s, d in zip(labels['color'], labels['shape'], labels['direction'])]
  assert shapes_classifier.adherence(videos, prompts)['all'] >= 0.95
  wrong = [p.replace('moving left', 'moving XX').replace('moving right', 'moving left').replace('moving XX', 'moving right')
           for p in prompts]
  assert shapes_classifier.adherence(videos, wrong)['direction'] <= 0.55  # half the clips move up or down


def test_shapes_classifier_is_cached_and_its_fvd_separates_real_from_corrupted(shapes_classifier, tmp_path,
                                                                                monkeypatch):
  cache = shapes_classifier.size
  path = classifier.cache_path(cache, str(tmp_path), steps=150)
  shapes_classifier.save(path)
  monkeypatch.setattr(classifier, 'train', lambda *a, **k: pytest.fail('retrained despite the cache'))
  again = classifier.load_or_train(cache_dir=str(tmp_path), steps=150)
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # and nothing half-written left
  videos, _ = classifier.labelled_batch(np.random.default_rng(5), cache, 128)
  np.testing.assert_allclose(again.features(videos), shapes_classifier.features(videos), rtol=1e-6)
  other, _ = classifier.labelled_batch(np.random.default_rng(6), cache, 128)
  same_distribution = fvd.fvd(again.features, videos, other)
  frozen = np.repeat(other[:, :1], other.shape[1], axis=1)  # the object stops moving
  blurred = ((other.astype(np.int32) + np.roll(other, 3, axis=2)) // 2).astype(np.uint8)
  assert same_distribution < fvd.fvd(again.features, videos, frozen)
  assert same_distribution < fvd.fvd(again.features, videos, blurred)


def test_the_prompting_judge_measures_path_error_and_speed_of_the_generated_frames():
  clip = lambda displacement: shapes.render_clip(
      'red', 'square', 'right', frames=8, height=32, width=32, object_size=12, start_yx=(16.0, 7.0),
      displacement=displacement)
  truth, slow = clip(16.0), clip(8.0)  # 16 px over 7 frames; the same start at half the speed
  later = np.arange(8) >= 4
  assert adherence.path_error(truth, truth, later) == 0.0
  assert adherence.speed(truth, later) / adherence.speed(truth, ~later) == pytest.approx(1.0, abs=0.15)
  assert adherence.speed(slow, later) / adherence.speed(truth, later) == pytest.approx(0.5, abs=0.1)
  # Half the speed from the same start: frame t is 8 t / 7 px behind, 4.6 px on average over frames 4-7.
  assert adherence.path_error(slow, truth, later) == pytest.approx(8 / 7 * 5.5, abs=0.6)
  lost = truth.copy()
  lost[6] = 0
  assert adherence.path_error(lost, truth, later) == float('inf') and np.isnan(adherence.speed(lost, later))


def test_classifier_steps_come_from_the_environment_and_a_bad_value_names_it(monkeypatch, tmp_path):
  size = classifier.ClipSize(8, 32, 32, 12)
  monkeypatch.setenv('SORA_JAX_CLASSIFIER_STEPS', '42')
  assert classifier.cache_path(size, str(tmp_path)).endswith('_steps42.npz')
  assert classifier.cache_path(size, str(tmp_path), steps=7).endswith('_steps7.npz')
  monkeypatch.setenv('SORA_JAX_CLASSIFIER_STEPS', 'many')
  with pytest.raises(ValueError, match=r"\$SORA_JAX_CLASSIFIER_STEPS='many'"):
    classifier.load_or_train(cache_dir=str(tmp_path))
