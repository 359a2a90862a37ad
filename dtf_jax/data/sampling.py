"""Which frames of a video form a clip (SPEC.md 6.2), as small pure functions.

Notation: ``D`` = number of frames of the video, ``S`` = ``num_segments``,
``L`` = ``clip_length``, ``ell = L * num_steps``, ``a = D // S``.

Each segment ``i`` contributes the frames ``offset_i + j * num_steps``,
``j = 0..L-1`` (0-based here; the originals' frame files are numbered from 1,
i.e. file number = index + 1), and segments are concatenated in time, so a clip
has ``S * L`` frames.

* Train: if ``a >= ell``: ``offset_i = U{0..a-ell} + i*a``; elif ``D >= ell``:
  with ``b = (D - ell) / S`` (float), ``offset_i = U{0..floor(b)} +
  floor(i*b)``; else the video is too short. ``U`` is uniform over the
  integers, both ends inclusive.
* Test clip ``c`` of ``num_clips``: ``offset_i = floor((a-ell)*c/num_clips) +
  i*a``, or ``floor(b*c/num_clips) + floor(i*b)``; with one clip this is
  offset 0 (the start of the video, not its centre).

Short videos (``D < ell``): by default :class:`ShortVideoError`. With
``short_video='loop'`` the video is treated as the periodic frame sequence
``0, 1, .., D-1, 0, 1, ..`` of length ``ell`` (i.e. sampled as if ``D = ell``,
which gives offset 0 for every segment) and every index is taken modulo ``D``.
"""

from __future__ import annotations

import numpy as np

SHORT_VIDEO_MODES = ('error', 'loop')


class ShortVideoError(ValueError):
  """A video has fewer frames than one clip needs."""


def _check_args(num_frames, clip_length, num_segments, num_steps):
  for name, value in (('clip_length', clip_length),
                      ('num_segments', num_segments),
                      ('num_steps', num_steps)):
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  if int(num_frames) != num_frames or num_frames < 0:
    raise ValueError(
        f'num_frames must be a non-negative integer, got {num_frames!r}.')


def _frames_from_offsets(offsets, clip_length, num_steps):
  offsets = np.asarray(offsets, np.int64)
  steps = np.arange(clip_length, dtype=np.int64) * num_steps
  return (offsets[:, None] + steps[None, :]).reshape(-1)


def _short(num_frames, ell, short_video, video):
  if short_video not in SHORT_VIDEO_MODES:
    raise ValueError(f"short_video must be one of {SHORT_VIDEO_MODES}, got "
                     f'{short_video!r}.')
  if short_video == 'error':
    name = f' {video!r}' if video is not None else ''
    raise ShortVideoError(
        f'video{name} has {num_frames} frames, fewer than the '
        f'{ell} (clip_length * num_steps) one clip needs. Remove it from the '
        "list (python -m dtf_jax.data.check_videos lists such videos) or set "
        "short_video='loop' to loop its frames.")
  if num_frames < 1:
    name = f' {video!r}' if video is not None else ''
    raise ShortVideoError(f'video{name} has no frames; it cannot be looped.')


def train_offsets(num_frames: int, clip_length: int, num_segments: int,
                  num_steps: int, rng: np.random.Generator) -> np.ndarray:
  """Random start offsets of the segments of a training clip (SPEC.md 6.2).

  Args:
    num_frames: D, number of frames of the video (>= clip_length*num_steps).
    clip_length: L, frames per segment.
    num_segments: S.
    num_steps: stride between sampled frames.
    rng: numpy random generator.

  Returns:
    int64 array (S,) of 0-based offsets.

  Raises:
    ShortVideoError: if ``num_frames < clip_length * num_steps``.
  """
  _check_args(num_frames, clip_length, num_segments, num_steps)
  ell = clip_length * num_steps
  a = num_frames // num_segments
  if a >= ell:
    return np.array([rng.integers(0, a - ell + 1) + i * a
                     for i in range(num_segments)], np.int64)
  if num_frames >= ell:
    b = float(num_frames - ell) / num_segments
    return np.array([rng.integers(0, int(b) + 1) + int(i * b)
                     for i in range(num_segments)], np.int64)
  raise ShortVideoError(f'{num_frames} frames < clip_length * num_steps = {ell}')


def eval_offsets(num_frames: int, clip_length: int, num_segments: int,
                 num_steps: int, clip_index: int, num_clips: int
                 ) -> np.ndarray:
  """Deterministic start offsets of test clip ``clip_index`` (SPEC.md 6.2).

  Returns:
    int64 array (S,) of 0-based offsets.

  Raises:
    ShortVideoError: if ``num_frames < clip_length * num_steps``.
  """
  _check_args(num_frames, clip_length, num_segments, num_steps)
  if not 0 <= clip_index < num_clips:
    raise ValueError(f'clip_index must be in [0, num_clips={num_clips}), got '
                     f'{clip_index}.')
  ell = clip_length * num_steps
  a = num_frames // num_segments
  if a >= ell:
    # Same float expression (and evaluation order) as the original.
    return np.array([int(float(a - ell) * clip_index / num_clips) + i * a
                     for i in range(num_segments)], np.int64)
  if num_frames >= ell:
    b = float(num_frames - ell) / num_segments
    return np.array([int(b * clip_index / num_clips) + int(i * b)
                     for i in range(num_segments)], np.int64)
  raise ShortVideoError(f'{num_frames} frames < clip_length * num_steps = {ell}')


def train_frame_indices(num_frames: int, clip_length: int, num_segments: int,
                        num_steps: int, rng: np.random.Generator, *,
                        short_video: str = 'error', video: str | None = None
                        ) -> np.ndarray:
  """0-based frame indices of a random training clip.

  Args:
    num_frames: D.
    clip_length, num_segments, num_steps: see module docstring.
    rng: numpy random generator.
    short_video: 'error' (default, as the original) or 'loop'.
    video: name used in the short-video error message.

  Returns:
    int64 array (S*L,) of frame indices in [0, D).
  """
  _check_args(num_frames, clip_length, num_segments, num_steps)
  ell = clip_length * num_steps
  if num_frames < ell:
    _short(num_frames, ell, short_video, video)
    offsets = train_offsets(ell, clip_length, num_segments, num_steps, rng)
    return _frames_from_offsets(offsets, clip_length, num_steps) % num_frames
  offsets = train_offsets(num_frames, clip_length, num_segments, num_steps,
                          rng)
  return _frames_from_offsets(offsets, clip_length, num_steps)


def eval_frame_indices(num_frames: int, clip_length: int, num_segments: int,
                       num_steps: int, clip_index: int, num_clips: int, *,
                       short_video: str = 'error', video: str | None = None
                       ) -> np.ndarray:
  """0-based frame indices of test clip ``clip_index`` of ``num_clips``.

  Returns:
    int64 array (S*L,) of frame indices in [0, D).
  """
  _check_args(num_frames, clip_length, num_segments, num_steps)
  ell = clip_length * num_steps
  if num_frames < ell:
    _short(num_frames, ell, short_video, video)
    offsets = eval_offsets(ell, clip_length, num_segments, num_steps,
                           clip_index, num_clips)
    return _frames_from_offsets(offsets, clip_length, num_steps) % num_frames
  offsets = eval_offsets(num_frames, clip_length, num_segments, num_steps,
                         clip_index, num_clips)
  return _frames_from_offsets(offsets, clip_length, num_steps)
