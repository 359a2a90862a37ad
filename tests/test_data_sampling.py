"""Clip sampling (SPEC.md 6.2) against a NumPy transcription written here."""

import numpy as np
import pytest

from dtf_jax.data import sampling


def spec_train_support(num_frames, clip_length, num_segments, num_steps):
  """SPEC 6.2 train offsets: for each segment the inclusive range [lo, hi]."""
  ell = clip_length * num_steps
  a = num_frames // num_segments
  i = np.arange(num_segments)
  if a >= ell:
    lo = i * a
    return lo, lo + (a - ell)
  if num_frames >= ell:
    b = (num_frames - ell) / num_segments
    lo = np.floor(i * b).astype(np.int64)
    return lo, lo + int(np.floor(b))
  return None


def spec_test_offsets(num_frames, clip_length, num_segments, num_steps, c,
                      num_clips):
  """SPEC 6.2 test offsets (the originals' float expressions, vectorised)."""
  ell = clip_length * num_steps
  a = num_frames // num_segments
  i = np.arange(num_segments, dtype=np.float64)
  if a >= ell:
    return (np.floor(np.float64(a - ell) * c / num_clips) + i * a).astype(
        np.int64)
  if num_frames >= ell:
    b = np.float64(num_frames - ell) / num_segments
    return (np.floor(b * c / num_clips) + np.floor(i * b)).astype(np.int64)
  return None


def spec_frames_1based(offsets, clip_length, num_steps):
  """Frame numbers ``offset + 1 + j*num_steps`` of every segment, in order."""
  return np.concatenate([o + 1 + np.arange(clip_length) * num_steps
                         for o in offsets])


CASES = [
    # (D, L, S, steps): both branches of the formula and the boundaries.
    (16, 16, 1, 1), (17, 16, 1, 1), (40, 8, 1, 1), (300, 16, 1, 1),
    (64, 8, 2, 2), (37, 8, 3, 1), (30, 8, 3, 1), (24, 8, 3, 1), (50, 4, 4, 3),
    (33, 16, 2, 2), (121, 16, 8, 1), (45, 16, 1, 2),
]


@pytest.mark.parametrize('d,l,s,steps', CASES)
def test_train_offsets_support_and_reachability(d, l, s, steps):
  lo, hi = spec_train_support(d, l, s, steps)
  rng = np.random.default_rng(1234 + d)
  seen = [set() for _ in range(s)]
  # Enough draws that every value of the largest support shows up w.h.p.
  for _ in range(max(400, 20 * int((hi - lo).max() + 1))):
    frames = sampling.train_frame_indices(d, l, s, steps, rng)
    assert frames.shape == (s * l,)
    assert frames.min() >= 0 and frames.max() < d
    offsets = frames.reshape(s, l)[:, 0]
    # Frames follow the offsets exactly (SPEC: offset + 1 + j*num_steps).
    np.testing.assert_array_equal(frames + 1,
                                  spec_frames_1based(offsets, l, steps))
    assert np.all(offsets >= lo) and np.all(offsets <= hi), (offsets, lo, hi)
    for i, o in enumerate(offsets):
      seen[i].add(int(o))
  for i in range(s):
    assert seen[i] == set(range(lo[i], hi[i] + 1)), (i, seen[i], lo[i], hi[i])


def test_train_offsets_are_roughly_uniform():
  rng = np.random.default_rng(0)
  d, l = 26, 16  # 11 possible offsets
  counts = np.bincount(
      [sampling.train_offsets(d, l, 1, 1, rng)[0] for _ in range(5500)],
      minlength=11)
  assert counts.shape == (11,)
  # Each bin expects 500; 6 sigma ~ 130.
  assert np.all(np.abs(counts - 500) < 130), counts


@pytest.mark.parametrize('d,l,s,steps', CASES)
@pytest.mark.parametrize('num_clips', [1, 2, 3, 10])
def test_eval_offsets_match_spec_formula(d, l, s, steps, num_clips):
  for c in range(num_clips):
    want = spec_test_offsets(d, l, s, steps, c, num_clips)
    got = sampling.eval_offsets(d, l, s, steps, c, num_clips)
    np.testing.assert_array_equal(got, want)
    frames = sampling.eval_frame_indices(d, l, s, steps, c, num_clips)
    np.testing.assert_array_equal(frames + 1,
                                  spec_frames_1based(want, l, steps))


def test_eval_formula_over_a_grid():
  rng = np.random.default_rng(7)
  for _ in range(300):
    l = int(rng.integers(1, 20))
    steps = int(rng.integers(1, 4))
    s = int(rng.integers(1, 6))
    d = int(rng.integers(l * steps, 400))
    num_clips = int(rng.integers(1, 21))
    c = int(rng.integers(num_clips))
    np.testing.assert_array_equal(
        sampling.eval_offsets(d, l, s, steps, c, num_clips),
        spec_test_offsets(d, l, s, steps, c, num_clips))


def test_one_test_clip_starts_at_the_first_frame():
  np.testing.assert_array_equal(
      sampling.eval_frame_indices(300, 16, 1, 1, 0, 1), np.arange(16))


@pytest.mark.parametrize('fn', ['train', 'eval'])
def test_short_video_raises_clear_error_by_default(fn):
  rng = np.random.default_rng(0)
  with pytest.raises(sampling.ShortVideoError, match=r"'vid/a b'.*15 frames"
                     r".*16.*short_video='loop'"):
    if fn == 'train':
      sampling.train_frame_indices(15, 16, 1, 1, rng, video='vid/a b')
    else:
      sampling.eval_frame_indices(15, 8, 1, 2, 0, 1, video='vid/a b')


def test_short_video_loop_rule():
  rng = np.random.default_rng(0)
  # D = 3 < 16: the periodic sequence 0,1,2,0,1,2,...
  frames = sampling.train_frame_indices(3, 16, 1, 1, rng, short_video='loop')
  np.testing.assert_array_equal(frames, np.arange(16) % 3)
  # With a stride and two segments: indices (j*steps) mod D per segment.
  frames = sampling.eval_frame_indices(5, 4, 2, 2, 0, 1, short_video='loop')
  np.testing.assert_array_equal(frames, np.tile(np.arange(4) * 2, 2) % 5)
  with pytest.raises(sampling.ShortVideoError, match='no frames'):
    sampling.train_frame_indices(0, 16, 1, 1, rng, short_video='loop')


def test_bad_arguments():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='clip_length'):
    sampling.train_frame_indices(30, 0, 1, 1, rng)
  with pytest.raises(ValueError, match='short_video'):
    sampling.train_frame_indices(3, 16, 1, 1, rng, short_video='pad')
  with pytest.raises(ValueError, match='clip_index'):
    sampling.eval_offsets(30, 16, 1, 1, 3, 3)
