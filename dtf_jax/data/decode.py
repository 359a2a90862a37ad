"""Reading the sampled frames of one video: encoded files (PyAV) and frame folders.

Encoded videos (mp4/webm/mkv/avi/...): the packets of the first video stream are
demuxed once (no decoding) to get every frame's presentation timestamp; frame
``k`` of the video is the frame with the ``k``-th smallest timestamp, which is
exact for variable-frame-rate files too. To read a set of frames the decoder
seeks to the keyframe at or before the first needed frame, decodes forward to
it, and seeks again whenever a later needed frame lies beyond another keyframe;
only the needed frames are converted to RGB. If timestamps are missing or a seek
lands past its target, the file is decoded sequentially from the start instead
(frames counted in decode order).

Frame folders: ``root/<path>/<template % (index + 1)>`` (the originals' JPEG
frames ``%05d.jpg`` numbered from 1), read with PIL and converted to RGB.

Errors that mean "this sample is unusable" (missing/truncated/corrupt file, an
undecodable frame, fewer decodable frames than needed) raise
:class:`BadVideoError`; the pipeline replaces such samples.
"""

from __future__ import annotations

import bisect
import os
from typing import Callable

import numpy as np
from PIL import Image

from dtf_jax.data.sampling import ShortVideoError

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.avi', '.mov', '.m4v', '.mpg',
                    '.mpeg', '.ogv', '.flv', '.wmv')


class BadVideoError(Exception):
  """A video (or a frame of it) could not be read; the sample is unusable."""


def _av():
  import av  # pylint: disable=g-import-not-at-top
  return av


def _frame_index(container, stream):
  """Sorted presentation timestamps and keyframe timestamps of all packets.

  Returns:
    (pts, keyframe_pts): sorted int lists; ``None`` if any packet has no pts.
  """
  pts, keys = [], []
  for packet in container.demux(stream):
    if packet.size == 0 and packet.pts is None:
      continue  # flush packet at the end of the stream
    if packet.pts is None:
      return None
    pts.append(int(packet.pts))
    if packet.is_keyframe:
      keys.append(int(packet.pts))
  pts.sort()
  keys.sort()
  return pts, keys


def _to_rgb(frame) -> np.ndarray:
  return frame.to_ndarray(format='rgb24')


def _decode_by_seeking(container, stream, pts, keys, wanted_pts):
  """Decodes the frames whose pts are in ``wanted_pts`` (sorted, unique).

  Returns:
    dict pts -> RGB array, or None if a seek overshot (caller falls back).
  """
  out = {}
  wanted = set(wanted_pts)
  decoder = None
  position = None  # pts of the last decoded frame
  for target in wanted_pts:
    if target in out:
      continue
    i = bisect.bisect_right(keys, target) - 1
    keyframe = keys[i] if i >= 0 else pts[0]
    if decoder is None or position is None or keyframe > position:
      container.seek(keyframe, stream=stream, backward=True, any_frame=False)
      decoder = container.decode(stream)
      position = None
    found = False
    for frame in decoder:
      if frame.pts is None:
        return None
      position = int(frame.pts)
      if position in wanted and position not in out:
        out[position] = _to_rgb(frame)
      if position >= target:
        found = position == target or target in out
        break
    if not found:
      return None
  return out


def _decode_sequential(path, frame_indices):
  """Decodes from the start, counting frames in decode order."""
  av = _av()
  wanted = set(int(i) for i in frame_indices)
  last = max(wanted)
  out = {}
  count = 0
  with av.open(path) as container:
    stream = container.streams.video[0]
    for frame in container.decode(stream):
      if count in wanted:
        out[count] = _to_rgb(frame)
      count += 1
      if count > last:
        break
  return out, count


def count_video_frames(path: str) -> int:
  """Number of frames of the first video stream (packets demuxed, not decoded)."""
  av = _av()
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise BadVideoError(f'{path}: no video stream')
      stream = container.streams.video[0]
      index = _frame_index(container, stream)
      if index is not None:
        return len(index[0])
    # Timestamps missing: count decoded frames.
    return _decode_sequential(path, [np.iinfo(np.int64).max])[1]
  except BadVideoError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BadVideoError(f'{path}: cannot read video ({type(e).__name__}: '
                        f'{e})') from e


def read_video_frames(path: str, frame_indices_fn: Callable[[int], np.ndarray],
                      num_frames: int | None = None) -> np.ndarray:
  """Reads the frames a sampling function asks for from an encoded video.

  Args:
    path: video file.
    frame_indices_fn: maps the number of frames ``D`` to the 0-based indices to
      read (any order, repeats allowed), e.g. a clip sampler.
    num_frames: ``D`` to pass to ``frame_indices_fn`` (from the list file);
      ``None`` uses the number of frames in the container.

  Returns:
    uint8 array (len(indices), H, W, 3), frames in the order of the indices.

  Raises:
    BadVideoError: missing/corrupt file or fewer decodable frames than needed.
    (Errors raised by ``frame_indices_fn``, e.g. ShortVideoError, propagate.)
  """
  if not os.path.isfile(path):
    raise BadVideoError(f'{path}: file does not exist')
  av = _av()
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise BadVideoError(f'{path}: no video stream')
      stream = container.streams.video[0]
      stream.thread_type = 'SLICE'
      index = _frame_index(container, stream)
      container_frames = None if index is None else len(index[0])
      d = num_frames if num_frames is not None else container_frames
      if d is None:
        d = count_video_frames(path)
      indices = np.asarray(frame_indices_fn(int(d)), np.int64).reshape(-1)
      frames = None
      if index is not None and container_frames:
        pts, keys = index
        if int(indices.max()) < len(pts) and int(indices.min()) >= 0:
          wanted_pts = sorted(set(pts[int(i)] for i in indices))
          by_pts = _decode_by_seeking(container, stream, pts, keys, wanted_pts)
          if by_pts is not None:
            frames = [by_pts[pts[int(i)]] for i in indices]
  except (BadVideoError, ShortVideoError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BadVideoError(f'{path}: cannot decode ({type(e).__name__}: {e})'
                        ) from e
  if frames is None:
    try:
      by_index, count = _decode_sequential(path, indices)
    except Exception as e:  # pylint: disable=broad-except
      raise BadVideoError(f'{path}: cannot decode ({type(e).__name__}: {e})'
                          ) from e
    missing = sorted(set(int(i) for i in indices) - set(by_index))
    if missing:
      raise BadVideoError(
          f'{path}: needed frame {missing[0]} but only {count} frames could '
          'be decoded (truncated or corrupt file, or a wrong num_frames in '
          'the list)')
    frames = [by_index[int(i)] for i in indices]
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise BadVideoError(f'{path}: frames of different sizes {sorted(shapes)}')
  return np.stack(frames)


def frame_file(root: str, video_path: str, template: str, index: int) -> str:
  """Path of 0-based frame ``index`` (file number ``index + 1``)."""
  return os.path.join(root, video_path, template % (int(index) + 1))


def read_image_frames(directory: str, template: str,
                      frame_indices: np.ndarray) -> np.ndarray:
  """Reads frames ``directory/template % (i + 1)`` for 0-based indices ``i``.

  Returns:
    uint8 array (len(indices), H, W, 3).

  Raises:
    BadVideoError: a frame file is missing or cannot be decoded, or frames
      differ in size.
  """
  cache = {}
  frames = []
  for i in np.asarray(frame_indices, np.int64).reshape(-1):
    i = int(i)
    if i not in cache:
      name = os.path.join(directory, template % (i + 1))
      try:
        with Image.open(name) as img:
          cache[i] = np.asarray(img.convert('RGB'))
      except Exception as e:  # pylint: disable=broad-except
        raise BadVideoError(f'{name}: cannot read frame ({type(e).__name__}: '
                            f'{e})') from e
    frames.append(cache[i])
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise BadVideoError(f'{directory}: frames of different sizes '
                        f'{sorted(shapes)}')
  return np.stack(frames)


def decode_image_bytes(data: bytes) -> np.ndarray:
  """Decodes one encoded image (JPEG/PNG bytes) to uint8 RGB (H, W, 3)."""
  import io  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise BadVideoError(f'cannot decode image ({type(e).__name__}: {e})'
                        ) from e
