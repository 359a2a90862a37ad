"""Clip augmentations (SPEC.md 6.3): parameter distributions and invariants."""

import colorsys
import itertools
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dtf_jax.data import augment
from dtf_jax.data import pipeline


def textured_clip(rng, t=4, h=48, w=64):
  """Smooth texture plus a per-frame offset of 10*t (no clipping)."""
  base = ndimage.gaussian_filter(rng.uniform(40, 180, (h, w, 3)), (2, 2, 0))
  return np.stack([np.round(base + 10 * k) for k in range(t)]).astype(np.uint8)


def test_crop_params_follow_torchvision_bounds():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    h_img = int(rng.integers(8, 300))
    w_img = int(rng.integers(8, 300))
    top, left, h, w = augment.random_resized_crop_params(rng, h_img, w_img)
    assert 0 < h <= h_img and 0 < w <= w_img
    assert 0 <= top <= h_img - h and 0 <= left <= w_img - w
    area = h * w / (h_img * w_img)
    aspect = w / h
    fallback = (top, left) == ((h_img - h) // 2, (w_img - w) // 2)
    if not fallback:
      # Rounding of w and h to integers widens the ranges slightly.
      tol_w, tol_h = 0.5 / w, 0.5 / h
      assert 0.2 * (1 - tol_w) * (1 - tol_h) - 1e-9 <= area <= 1 + 1e-9
      assert 0.75 * (1 - tol_w - tol_h) <= aspect <= (4 / 3) * (1 + tol_w + tol_h)


def test_crop_positions_are_uniform_and_cover_the_range():
  rng = np.random.default_rng(1)
  tops = []
  for _ in range(3000):
    top, _, h, _ = augment.random_resized_crop_params(rng, 40, 40, (0.25, 0.25),
                                                      (1.0, 1.0))
    assert h == 20
    tops.append(top)
  counts = np.bincount(tops, minlength=21)
  assert counts.shape == (21,) and counts.min() > 80  # 21 values, ~143 each


def test_crop_fallback_is_centred_with_clamped_ratio():
  rng = np.random.default_rng(0)
  # A 1000x10 frame: no crop with aspect in [3/4, 4/3] and >= 20% area fits.
  assert augment.random_resized_crop_params(rng, 1000, 10) == (
      (1000 - 13) // 2, 0, 13, 10)
  assert augment.random_resized_crop_params(rng, 10, 1000) == (
      0, (1000 - 13) // 2, 10, 13)


def test_one_crop_for_all_frames_and_flip():
  rng = np.random.default_rng(3)
  clip = textured_clip(rng)
  params = augment.sample_train_params(rng, 48, 64, color_jitter=False,
                                       flip_prob=0.0)
  out = augment.apply_train_params(clip, params, 32).astype(int)
  assert out.shape == (4, 32, 32, 3)
  for k in range(1, 4):
    # Same crop/resize for every frame: frames differ by their offset only.
    assert np.abs(out[k] - out[0] - 10 * k).max() <= 1
  flipped = augment.apply_train_params(
      clip, augment.TrainAugmentParams(crop=params.crop, flip=True), 32)
  np.testing.assert_array_equal(flipped, out[:, :, ::-1].astype(np.uint8))
  # The crop is the box the parameters name: compare with a direct resize.
  top, left, h, w = params.crop
  ref = Image.fromarray(clip[2][top:top + h, left:left + w]).resize(
      (32, 32), Image.BILINEAR)
  np.testing.assert_array_equal(out[2], np.asarray(ref))


def test_parameter_distribution():
  rng = np.random.default_rng(5)
  n = 4000
  params = [augment.sample_train_params(rng, 64, 64) for _ in range(n)]
  jittered = [p for p in params if p.jitter]
  assert abs(len(jittered) / n - 0.8) < 0.03
  assert abs(np.mean([p.grayscale for p in params]) - 0.2) < 0.03
  assert abs(np.mean([p.blur_radius is not None for p in params]) - 0.5) < 0.03
  assert abs(np.mean([p.flip for p in params]) - 0.5) < 0.03
  radii = [p.blur_radius for p in params if p.blur_radius is not None]
  assert 0.1 <= min(radii) < 0.15 and 1.95 < max(radii) <= 2.0
  orders = {tuple(op for op, _ in p.jitter) for p in jittered}
  assert orders == set(itertools.permutations(augment.JITTER_OPS))
  for p in jittered:
    for op, f in p.jitter:
      if op == 'hue':
        assert -0.1 <= f <= 0.1
      else:
        assert 0.6 <= f <= 1.4
  no_flip = [augment.sample_train_params(rng, 64, 64, flip_prob=0.0)
             for _ in range(300)]
  assert not any(p.flip for p in no_flip)
  off = [augment.sample_train_params(rng, 64, 64, color_jitter=False)
         for _ in range(300)]
  assert not any(p.jitter or p.grayscale or p.blur_radius for p in off)


def _apply_one(img, **kw):
  h, w = img.shape[:2]
  params = augment.TrainAugmentParams(crop=(0, 0, h, w), **kw)
  return augment.apply_train_params(img[None], params, h)[0].astype(float)


def test_colour_ops_match_their_definitions():
  rng = np.random.default_rng(11)
  img = rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)
  x = img.astype(float)
  gray = x @ np.array([0.299, 0.587, 0.114])
  # brightness: blend with black.
  out = _apply_one(img, jitter=(('brightness', 1.3),))
  assert np.abs(out - np.clip(1.3 * x, 0, 255)).max() <= 1
  # contrast: blend with the mean grey level.
  mean = int(gray.mean() + 0.5)
  out = _apply_one(img, jitter=(('contrast', 0.7),))
  assert np.abs(out - np.clip(0.7 * x + 0.3 * mean, 0, 255)).max() <= 1.5
  # saturation: blend with the grey image.
  out = _apply_one(img, jitter=(('saturation', 0.5),))
  assert np.abs(out - np.clip(0.5 * x + 0.5 * gray[..., None], 0, 255)
                ).max() <= 1.5
  # grayscale: ITU-R 601-2 luma replicated to 3 channels.
  out = _apply_one(img, grayscale=True)
  assert np.abs(out - gray[..., None]).max() <= 1
  assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_hue_shift_rotates_hue():
  rng = np.random.default_rng(2)
  # Saturated, bright colours so 8-bit HSV keeps hue precise.
  hsv = np.stack([rng.uniform(0, 1, 64), np.full(64, 0.9), np.full(64, 0.9)], 1)
  rgb = np.array([colorsys.hsv_to_rgb(*p) for p in hsv]) * 255
  img = np.round(rgb).astype(np.uint8).reshape(8, 8, 3)
  for factor in (-0.1, 0.07):
    out = _apply_one(img, jitter=(('hue', factor),)).reshape(-1, 3) / 255
    got = np.array([colorsys.rgb_to_hsv(*p)[0] for p in out])
    want = (hsv[:, 0] + int(factor * 255) / 255) % 1
    diff = np.abs((got - want + 0.5) % 1 - 0.5)
    assert diff.max() < 0.02, diff.max()


def test_blur_is_a_gaussian_of_the_given_radius():
  rng = np.random.default_rng(4)
  img = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
  out = _apply_one(img, blur_radius=1.5)
  ref = ndimage.gaussian_filter(img.astype(float), (1.5, 1.5, 0))
  inner = (slice(6, -6), slice(6, -6))
  assert np.abs(out[inner] - ref[inner]).mean() < 2.0
  assert out.std() < 0.5 * img.std()


def test_rand_augment_ops_and_magnitudes():
  rng = np.random.default_rng(6)
  clip = textured_clip(rng, t=3, h=32, w=32)
  seen = set()
  for _ in range(60):
    p = augment.sample_train_params(rng, 32, 32, rand_augment=(2, 9))
    assert len(p.rand_augment) == 2 and not p.jitter and not p.grayscale
    for name, value, _, _ in p.rand_augment:
      lo, hi = {n: (a, b) for n, a, b in augment._RA_OPS}[name]
      assert value == pytest.approx(9 / 30 * (hi - lo) + lo)
      seen.add(name)
    out = augment.apply_train_params(clip, p, 24)
    assert out.shape == (3, 24, 24, 3) and out.dtype == np.uint8
  assert seen <= set(augment.RAND_AUGMENT_OPS) and len(seen) >= 12


def test_normalize_values_and_range():
  rng = np.random.default_rng(8)
  x = rng.integers(0, 256, (2, 3, 5, 5, 3)).astype(np.uint8)
  got = augment.normalize(x)
  want = (x / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(
      augment.IMAGENET_STD)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-6)
  lo = -np.array(augment.IMAGENET_MEAN) / np.array(augment.IMAGENET_STD)
  hi = (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  assert np.all(got >= lo - 1e-6) and np.all(got <= hi + 1e-6)


@pytest.mark.parametrize('h,w', [(240, 320), (321, 180), (100, 100)])
@pytest.mark.parametrize('num_crops', [1, 3])
def test_eval_views_resize_and_crops(h, w, num_crops):
  rng = np.random.default_rng(h + w)
  clip = rng.integers(0, 256, (2, h, w, 3)).astype(np.uint8)
  views = augment.eval_views(clip, 64, 56, num_crops)
  assert views.shape == (num_crops, 2, 56, 56, 3)
  short, long_ = min(h, w), max(h, w)
  new_long = int(64 * long_ / short)
  new_h, new_w = (64, new_long) if h <= w else (new_long, 64)
  resized = np.stack([np.asarray(Image.fromarray(f).resize(
      (new_w, new_h), Image.BILINEAR)) for f in clip])
  top, left = round((new_h - 56) / 2), round((new_w - 56) / 2)
  starts = [(top, left)]
  if num_crops == 3:
    if new_w >= new_h:
      starts = [(top, 0), (top, left), (top, new_w - 56)]
    else:
      starts = [(0, left), (top, left), (new_h - 56, left)]
  for view, (t, l) in zip(views, starts):
    np.testing.assert_array_equal(view, resized[:, t:t + 56, l:l + 56])


def test_centre_crop_uses_python_rounding():
  # (H - c) / 2 = 0.5 -> round() gives 0 (banker's rounding), as torchvision.
  assert augment.crop_positions(57, 59, 56, 1) == [(0, 2)]


def test_eval_crop_larger_than_frame_is_an_error():
  with pytest.raises(ValueError, match='eval_resize'):
    augment.crop_positions(50, 60, 56, 1)


class _ArraySource:
  """A source over in-memory uint8 videos (T, H, W, 3)."""

  def __init__(self, videos, labels):
    self.videos, self.labels = videos, labels

  def __len__(self):
    return len(self.videos)

  def name(self, i):
    return f'mem{i}'

  def label(self, i):
    return self.labels[i]

  def read(self, i, fn):
    return self.videos[i][fn(len(self.videos[i]))]


def test_train_clip_is_deterministic_given_seed_and_index():
  rng = np.random.default_rng(9)
  src = _ArraySource([textured_clip(rng, t=20, h=40, w=52)], [0])
  opts = pipeline.ClipOptions(clip_length=8, crop_size=24)
  def clip(seed, g):
    return pipeline.load_train_clip(
        src, 0, pipeline._sample_rng(seed, pipeline._SAMPLE_TAG, g, 0), opts)
  a, b = clip(1, 5), clip(1, 5)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (8, 24, 24, 3) and a.dtype == np.uint8
  assert not np.array_equal(a, clip(1, 6))
  assert not np.array_equal(a, clip(2, 5))
