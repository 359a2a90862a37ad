"""Random-access sources of videos: ``len``, ``label(i)``, ``read(i, fn)``.

A source knows where video ``i`` lives and how to read a set of its frames; it
does no sampling or augmentation itself. ``read(i, frame_indices_fn)`` calls
``frame_indices_fn(num_frames)`` with the video's frame count and returns the
chosen frames as uint8 ``(n, H, W, 3)``. Unreadable data raises
:class:`~dtf_jax.data.decode.BadVideoError`.

Sources are pickled into grain's worker processes, so they hold only plain
data (the TFDS source opens its data source lazily in each process).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from dtf_jax.data import decode
from dtf_jax.data.lists import VideoEntry

FrameIndicesFn = Callable[[int], np.ndarray]


class VideoFileSource:
  """Encoded video files (mp4/webm/mkv/avi...) named by a list.

  Frame counts come from the list's optional ``num_frames`` column, else from
  the container.
  """

  def __init__(self, entries: Sequence[VideoEntry], root: str | None):
    self._paths = [e.path for e in entries]
    self._labels = np.array([e.label for e in entries], np.int64)
    self._frames = [e.num_frames for e in entries]
    self._root = root or ''

  def __len__(self) -> int:
    return len(self._paths)

  def __repr__(self) -> str:
    return f'VideoFileSource(root={self._root!r}, num_videos={len(self)})'

  def name(self, i: int) -> str:
    return os.path.join(self._root, self._paths[i])

  def label(self, i: int) -> int:
    return int(self._labels[i])

  def num_frames(self, i: int) -> int | None:
    return self._frames[i]

  def read(self, i: int, frame_indices_fn: FrameIndicesFn) -> np.ndarray:
    return decode.read_video_frames(self.name(i), frame_indices_fn,
                                    self._frames[i])


class FrameFolderSource:
  """Folders of JPEG/PNG frames, ``root/<path>/<template % (k+1)>``."""

  def __init__(self, entries: Sequence[VideoEntry], root: str | None,
               template: str = '%05d.jpg'):
    for e in entries:
      if e.num_frames is None:
        raise ValueError(f'frame folder {e.path!r} (list line {e.line}) has '
                         'no num_frames; frame lists need it.')
    self._paths = [e.path for e in entries]
    self._labels = np.array([e.label for e in entries], np.int64)
    self._frames = np.array([e.num_frames for e in entries], np.int64)
    self._root = root or ''
    self._template = template

  def __len__(self) -> int:
    return len(self._paths)

  def __repr__(self) -> str:
    return (f'FrameFolderSource(root={self._root!r}, num_videos={len(self)}, '
            f'template={self._template!r})')

  def name(self, i: int) -> str:
    return os.path.join(self._root, self._paths[i])

  def label(self, i: int) -> int:
    return int(self._labels[i])

  def num_frames(self, i: int) -> int:
    return int(self._frames[i])

  def read(self, i: int, frame_indices_fn: FrameIndicesFn) -> np.ndarray:
    indices = frame_indices_fn(int(self._frames[i]))
    return decode.read_image_frames(self.name(i), self._template, indices)


def import_tfds():
  """Imports tensorflow_datasets or explains how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "data.source='tfds' needs tensorflow-datasets: "
        "pip install 'dtf_jax[tfds]'") from e
  return tfds


def _skip_decoding(tfds):
  """A ``SkipDecoding`` that also works on tfds's NumPy decoding path.

  ``tfds.data_source`` decodes with NumPy, which calls
  ``decode_batch_example_np`` for sequence features (a video); tfds 4.9's
  ``SkipDecoding`` lacks it. This returns the encoded frames unchanged.
  """

  class SkipFrameDecoding(tfds.decode.SkipDecoding):

    def decode_batch_example_np(self, serialized_example):
      return serialized_example

  return SkipFrameDecoding()


class TfdsSource:
  """A TFDS dataset read through ``tfds.data_source`` (ArrayRecord files).

  The frames feature is read undecoded (``tfds.decode.SkipDecoding``) and only
  the sampled frames are decoded (PIL). It must be a ``tfds.features.Video``
  (or a Sequence of Images) with encoded frames; the label an integer.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               video_key: str = 'video', label_key: str = 'label'):
    self._name = name
    self._split = split
    self._data_dir = data_dir
    self._video_key = video_key
    self._label_key = label_key
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      tfds = import_tfds()
      self._source = tfds.data_source(
          self._name, split=self._split, data_dir=self._data_dir,
          download=False,
          decoders={self._video_key: _skip_decoding(tfds)})
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_source'] = None
    state['_last'] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (f'TfdsSource(name={self._name!r}, split={self._split!r}, '
            f'num_videos={self._len})')

  def name(self, i: int) -> str:
    return f'tfds:{self._name}/{self._split}[{i}]'

  def _element(self, i: int):
    cached = getattr(self, '_last', None)
    if cached is not None and cached[0] == int(i):
      return cached[1]
    try:
      element = self._open()[int(i)]
      self._last = (int(i), element)
      return element
    except Exception as e:  # pylint: disable=broad-except
      raise decode.BadVideoError(f'{self.name(i)}: cannot read record '
                                 f'({type(e).__name__}: {e})') from e

  def label(self, i: int) -> int:
    return int(self._element(i)[self._label_key])

  def num_frames(self, i: int) -> int:
    return len(self._element(i)[self._video_key])

  def read(self, i: int, frame_indices_fn: FrameIndicesFn) -> np.ndarray:
    encoded = self._element(i)[self._video_key]
    indices = np.asarray(frame_indices_fn(len(encoded)), np.int64)
    cache = {}
    frames = []
    for k in indices.reshape(-1):
      k = int(k)
      if k not in cache:
        data = encoded[k]
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and (
            data.ndim == 3):
          cache[k] = data  # already decoded
        else:
          try:
            cache[k] = decode.decode_image_bytes(bytes(data))
          except decode.BadVideoError as e:
            raise decode.BadVideoError(f'{self.name(i)} frame {k}: {e}'
                                       ) from e
      frames.append(cache[k])
    return np.stack(frames)
