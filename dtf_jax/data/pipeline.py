"""grain pipelines that turn a video source into batches.

Training (:class:`TrainLoader`): the unit of work is a whole batch. Global step
``s`` of epoch ``e = s // steps_per_epoch`` takes positions
``[(s mod steps_per_epoch) * G, ... + G)`` of epoch ``e``'s order (a
permutation of the ``N`` videos drawn from ``(seed, e)``, optionally padded
like PyTorch's DistributedSampler), and host ``p`` of ``P`` takes rows
``[p * G/P, (p+1) * G/P)`` of that global batch. Sample ``g`` (its global
position ``s * G + row``) draws its clip offsets and augmentation from a
generator seeded by ``(seed, g)``. So a batch is a pure function of
``(seed, step)``: the concatenation of the hosts' batches does not depend on
the number of hosts or of worker processes, leftovers of an epoch are dropped
(drop_last), and resuming needs only the next step number.

grain runs the batch function in ``num_workers`` processes
(``MapDataset.range(...).map(...).mp_prefetch(...)``; worker ``w`` computes
steps ``w, w + W, ...`` and the main process interleaves them in order).

Bad data: a sample whose video cannot be read (:class:`BadVideoError`) is
replaced by another video chosen by ``(seed, g, attempt)``; the batch row's
``num_replaced`` counts the replacements. The main-process iterator logs each
bad file once and raises :class:`BadDataError` (listing them) once more than
``max_bad_samples`` distinct files were bad.

Evaluation (:class:`EvalLoader`): every (video, clip, crop) view, in video-major
order, padded with ``valid=False`` rows to a whole number of batches on every
host; host ``p`` gets a contiguous run of batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from typing import Any

import numpy as np

from dtf_jax.data import augment
from dtf_jax.data import sampling
from dtf_jax.data.decode import BadVideoError

logger = logging.getLogger('dtf_jax.data')

_STATE_VERSION = 1
# Tags that keep the random streams of the different uses apart.
_EPOCH_TAG, _SAMPLE_TAG, _REPLACE_TAG = 0, 1, 2
_MAX_REPLACEMENT_ATTEMPTS = 20
_MAX_BAD_FILES_IN_STATE = 1000


class BadDataError(RuntimeError):
  """Too many unreadable videos; the message lists them."""


@dataclasses.dataclass(frozen=True)
class ClipOptions:
  """Everything a worker needs to turn a video into clips (picklable)."""
  clip_length: int = 16
  num_segments: int = 1
  num_steps: int = 1
  crop_size: int = 224
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  color_jitter: bool = True
  flip_prob: float = 0.5
  rand_augment: tuple[int, float] | None = None
  short_video: str = 'error'
  eval_resize: int = 224
  eval_crop_size: int = 224
  num_clips: int = 1
  num_crops: int = 1
  mean: tuple[float, float, float] = augment.IMAGENET_MEAN
  std: tuple[float, float, float] = augment.IMAGENET_STD
  video_dtype: str = 'float32'

  @property
  def frames_per_clip(self) -> int:
    return self.clip_length * self.num_segments

  def finish(self, clips: np.ndarray) -> np.ndarray:
    """uint8 clips -> the output dtype (float32 normalised, or uint8)."""
    if self.video_dtype == 'uint8':
      return clips
    return augment.normalize(clips, self.mean, self.std)


def load_train_clip(source, index: int, rng: np.random.Generator,
                    opts: ClipOptions) -> np.ndarray:
  """Reads and augments one training clip: uint8 (S*L, crop, crop, 3)."""
  name = source.name(index)

  def indices_fn(num_frames):
    return sampling.train_frame_indices(
        num_frames, opts.clip_length, opts.num_segments, opts.num_steps, rng,
        short_video=opts.short_video, video=name)

  frames = source.read(index, indices_fn)
  params = augment.sample_train_params(
      rng, frames.shape[1], frames.shape[2], scale=opts.crop_scale,
      ratio=opts.crop_ratio, color_jitter=opts.color_jitter,
      flip_prob=opts.flip_prob, rand_augment=opts.rand_augment)
  return augment.apply_train_params(frames, params, opts.crop_size)


def load_eval_views(source, index: int, clip_index: int, opts: ClipOptions
                    ) -> np.ndarray:
  """Reads test clip ``clip_index``: uint8 (num_crops, S*L, c, c, 3)."""
  name = source.name(index)

  def indices_fn(num_frames):
    return sampling.eval_frame_indices(
        num_frames, opts.clip_length, opts.num_segments, opts.num_steps,
        clip_index, opts.num_clips, short_video=opts.short_video, video=name)

  frames = source.read(index, indices_fn)
  return augment.eval_views(frames, opts.eval_resize, opts.eval_crop_size,
                            opts.num_crops)


def _sample_rng(seed: int, tag: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, tag, *map(int, keys)])


def epoch_order(seed: int, epoch: int, dataset_size: int, epoch_length: int
                ) -> np.ndarray:
  """The video order of one epoch: a seeded permutation, padded by wrapping.

  Args:
    seed: run seed.
    epoch: epoch number.
    dataset_size: N.
    epoch_length: >= N; positions past N repeat the permutation's start (as
      PyTorch's DistributedSampler pads).

  Returns:
    int64 (epoch_length,).
  """
  perm = _sample_rng(seed, _EPOCH_TAG, epoch).permutation(dataset_size)
  if epoch_length > dataset_size:
    perm = np.resize(perm, epoch_length)
  return perm


def epoch_length(dataset_size: int, num_replicas: int = 1) -> int:
  """Samples per epoch after DistributedSampler-style padding."""
  return num_replicas * math.ceil(dataset_size / num_replicas)


class _TrainBatches:
  """Global step -> this host's batch (runs in grain workers)."""

  def __init__(self, source, opts: ClipOptions, *, seed: int,
               global_batch_size: int, process_index: int,
               process_count: int, steps_per_epoch: int, epoch_len: int):
    self.source = source
    self.opts = opts
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = steps_per_epoch
    self.epoch_len = epoch_len
    self._order_cache = (None, None)

  def _order(self, epoch):
    if self._order_cache[0] != epoch:
      self._order_cache = (epoch, epoch_order(self.seed, epoch,
                                              len(self.source),
                                              self.epoch_len))
    return self._order_cache[1]

  def sample_videos(self, step: int) -> np.ndarray:
    """Video indices of this host's rows at global ``step`` (no replacement)."""
    epoch, in_epoch = divmod(int(step), self.steps_per_epoch)
    start = (in_epoch * self.global_batch_size
             + self.process_index * self.local_batch_size)
    return self._order(epoch)[start:start + self.local_batch_size]

  def _load(self, video: int, g: int, bad: list):
    n = len(self.source)
    candidate = int(video)
    for attempt in range(_MAX_REPLACEMENT_ATTEMPTS + 1):
      rng = _sample_rng(self.seed, _SAMPLE_TAG, g, attempt)
      try:
        clip = load_train_clip(self.source, candidate, rng, self.opts)
        return clip, self.source.label(candidate), attempt
      except BadVideoError as e:
        bad.append((self.source.name(candidate), str(e)))
        candidate = int(
            _sample_rng(self.seed, _REPLACE_TAG, g, attempt).integers(n))
    raise BadDataError(
        f'{_MAX_REPLACEMENT_ATTEMPTS + 1} consecutive samples could not be '
        f'read (sample {g}); last errors: '
        + '; '.join(reason for _, reason in bad[-3:]))

  def __call__(self, step: int) -> dict[str, Any]:
    step = int(step)
    videos = self.sample_videos(step)
    first = step * self.global_batch_size + (self.process_index
                                             * self.local_batch_size)
    n = self.opts.frames_per_clip
    c = self.opts.crop_size
    clips = np.empty((len(videos), n, c, c, 3), np.uint8)
    labels = np.empty((len(videos),), np.int32)
    replaced = np.zeros((len(videos),), np.int32)
    bad = []
    for row, video in enumerate(videos):
      clips[row], labels[row], replaced[row] = self._load(video, first + row,
                                                          bad)
    return {'video': self.opts.finish(clips), 'label': labels,
            'num_replaced': replaced, '_bad_files': json.dumps(bad)}


def _grain_iterator(fn, start: int, stop: int, num_workers: int,
                    prefetch: int):
  """An iterator over ``fn(i)`` for ``i in range(start, stop)`` via grain."""
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.range(start, stop).map(fn)
  if num_workers > 0:
    # grain's worker processes read absl flags; outside an absl app (tests,
    # notebooks, scripts) nobody parsed them, so use the defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                              prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  else:
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                              prefetch_buffer_size=prefetch))
  return iter(ds)


class _BadSampleTracker:
  """Counts replaced samples and distinct bad files; enforces the limit."""

  def __init__(self, max_bad_samples: int):
    self.max_bad_samples = max_bad_samples
    self.num_replaced = 0
    self.bad_files: dict[str, str] = {}

  def update(self, encoded: str, num_replaced: int) -> None:
    self.num_replaced += int(num_replaced)
    for name, reason in json.loads(encoded):
      if name not in self.bad_files:
        self.bad_files[name] = reason
        logger.warning('dtf_jax.data: unreadable sample replaced: %s', reason)
    if len(self.bad_files) > self.max_bad_samples:
      listing = '\n  '.join(f'{k}: {v}' for k, v in
                            list(self.bad_files.items())[:200])
      raise BadDataError(
          f'{len(self.bad_files)} distinct videos could not be read, more '
          f'than data.max_bad_samples={self.max_bad_samples}. Fix or remove '
          'them (python -m dtf_jax.data.check_videos LIST lists unreadable '
          'videos) or raise the limit. Bad files:\n  ' + listing)


class TrainLoader:
  """Infinite training batches; ``iter()`` gives a checkpointable iterator.

  Each ``iter(loader)`` starts at step 0; restore a position with
  ``iterator.set_state(state)`` (or grain's orbax handler, see
  :class:`TrainIterator`).
  """

  def __init__(self, source, opts: ClipOptions, *, global_batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1,
               num_workers: int = 0, prefetch: int = 2,
               max_bad_samples: int = 100, sampler_num_replicas: int = 1):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'need 0 <= process_index < process_count, got '
                       f'process_index={process_index}, '
                       f'process_count={process_count}.')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
          f'global_batch_size={global_batch_size} must be a positive multiple '
          f'of process_count={process_count} (each host gets '
          'global_batch_size // process_count rows).')
    n = len(source)
    self.dataset_size = n
    self.epoch_len = epoch_length(n, sampler_num_replicas)
    self.steps_per_epoch = self.epoch_len // global_batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(
          f'the training set has {n} videos, fewer than global_batch_size='
          f'{global_batch_size}; an epoch would have no full batch.')
    self.source = source
    self.opts = opts
    self.seed = int(seed)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.process_count = process_count
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.max_bad_samples = max_bad_samples
    self.batches = _TrainBatches(
        source, opts, seed=self.seed, global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count,
        steps_per_epoch=self.steps_per_epoch, epoch_len=self.epoch_len)

  def __iter__(self) -> 'TrainIterator':
    return TrainIterator(self)

  def __repr__(self) -> str:
    return (f'TrainLoader({self.source!r}, global_batch_size='
            f'{self.global_batch_size}, process {self.process_index}/'
            f'{self.process_count}, steps_per_epoch={self.steps_per_epoch}, '
            f'num_workers={self.num_workers})')


class TrainIterator:
  """Iterator over training batches with grain-style ``get_state``/``set_state``.

  The state is small JSON (bytes): the next global step plus the bad-sample
  counters, and the seed / batch size / dataset size to check a restore
  against. It does not depend on ``num_workers`` or on the number of hosts.

  Checkpoint it with orbax through grain's handler, e.g.::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))

  (``grain.checkpoint.CheckpointHandler`` == ``grain.python
  .PyGrainCheckpointHandler``; it writes one ``process_<i>-of-<n>.json`` file
  per JAX process.)
  """

  def __init__(self, loader: TrainLoader, start_step: int = 0):
    self._loader = loader
    self._step = int(start_step)
    self._tracker = _BadSampleTracker(loader.max_bad_samples)
    self._it = None

  @property
  def step(self) -> int:
    """Global step of the next batch."""
    return self._step

  @property
  def num_replaced(self) -> int:
    """Samples replaced so far (all of this iterator's batches)."""
    return self._tracker.num_replaced

  @property
  def bad_files(self) -> dict[str, str]:
    """Distinct unreadable files seen so far -> reason."""
    return dict(self._tracker.bad_files)

  def __iter__(self) -> 'TrainIterator':
    return self

  def _ensure(self):
    if self._it is None:
      loader = self._loader
      self._it = _grain_iterator(loader.batches, self._step, sys.maxsize,
                                 loader.num_workers, loader.prefetch)
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._ensure())
    batch = dict(batch)
    self._step += 1
    self._tracker.update(batch.pop('_bad_files'), batch['num_replaced'].sum())
    return batch

  def start_prefetch(self) -> None:
    """Starts the workers now (grain's handler calls this after restore)."""
    it = self._ensure()
    if hasattr(it, 'start_prefetch'):
      it.start_prefetch()

  def close(self) -> None:
    """Stops the worker processes (a later ``next`` restarts them)."""
    if self._it is not None:
      close = getattr(self._it, 'close', None)
      if close is not None:
        close()
      self._it = None

  def get_state(self) -> bytes:
    loader = self._loader
    bad = list(self._tracker.bad_files.items())[:_MAX_BAD_FILES_IN_STATE]
    return json.dumps({
        'version': _STATE_VERSION,
        'kind': 'dtf_jax.data.TrainIterator',
        'next_step': self._step,
        'seed': loader.seed,
        'global_batch_size': loader.global_batch_size,
        'dataset_size': loader.dataset_size,
        'steps_per_epoch': loader.steps_per_epoch,
        'num_replaced': self._tracker.num_replaced,
        'bad_files': bad,
    }, indent=1).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if isinstance(state, bytes):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get('kind') != 'dtf_jax.data.TrainIterator':
      raise ValueError('set_state got a state that was not saved by a '
                       f'dtf_jax TrainIterator: {str(state)[:200]}')
    loader = self._loader
    for key, have in (('seed', loader.seed),
                      ('global_batch_size', loader.global_batch_size),
                      ('dataset_size', loader.dataset_size),
                      ('steps_per_epoch', loader.steps_per_epoch)):
      if state[key] != have:
        raise ValueError(
            f'cannot restore the data iterator: the checkpoint has {key}='
            f'{state[key]} but this loader has {key}={have}; build the '
            'loader with the same data, seed and global batch size.')
    self.close()
    self._step = int(state['next_step'])
    self._tracker.num_replaced = int(state['num_replaced'])
    self._tracker.bad_files = dict(
        (k, v) for k, v in state.get('bad_files', []))

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


# --- evaluation --------------------------------------------------------------

class _EvalBatches:
  """Local batch number -> this host's eval batch (runs in grain workers)."""

  def __init__(self, source, opts: ClipOptions, *, batch_size: int,
               first_view: int, num_views: int):
    self.source = source
    self.opts = opts
    self.batch_size = batch_size
    self.first_view = first_view
    self.num_views = num_views

  def __call__(self, batch_index: int) -> dict[str, Any]:
    opts = self.opts
    views_per_video = opts.num_clips * opts.num_crops
    b = self.batch_size
    n = opts.frames_per_clip
    c = opts.eval_crop_size
    video = np.zeros((b, n, c, c, 3), np.uint8)
    label = np.zeros((b,), np.int32)
    video_index = np.full((b,), -1, np.int32)
    view_index = np.full((b,), -1, np.int32)
    valid = np.zeros((b,), np.bool_)
    bad = []
    cache = {}
    start = self.first_view + int(batch_index) * b
    for row in range(b):
      view = start + row
      if view >= self.num_views:
        continue
      vid, within = divmod(view, views_per_video)
      clip, crop = divmod(within, opts.num_crops)
      video_index[row] = vid
      view_index[row] = within
      if (vid, clip) not in cache:
        try:
          cache[(vid, clip)] = load_eval_views(self.source, vid, clip, opts)
        except BadVideoError as e:
          bad.append((self.source.name(vid), str(e)))
          cache[(vid, clip)] = None
      views = cache[(vid, clip)]
      if views is None:
        continue
      label[row] = self.source.label(vid)
      video[row] = views[crop]
      valid[row] = True
    video = opts.finish(video)
    video[~valid] = 0
    return {'video': video, 'label': label, 'video_index': video_index,
            'view_index': view_index, 'valid': valid,
            '_bad_files': json.dumps(bad)}


class EvalLoader:
  """Finite evaluation batches over every (video, clip, crop) view.

  Rows are ordered video-major (view ``v``: video ``v // (num_clips *
  num_crops)``, ``view_index = clip * num_crops + crop``). The views are
  padded to ``batch_size * process_count * len(self)`` rows; padding rows have
  ``valid=False``, ``video_index = view_index = -1``, a zero video and label
  0. Views of an unreadable video keep their indices but have ``valid=False``
  and a zero video (the file is logged and counted against
  ``max_bad_samples``).
  """

  def __init__(self, source, opts: ClipOptions, *, batch_size: int,
               process_index: int = 0, process_count: int = 1,
               num_workers: int = 0, prefetch: int = 2,
               max_bad_samples: int = 100):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'need 0 <= process_index < process_count, got '
                       f'process_index={process_index}, '
                       f'process_count={process_count}.')
    self.source = source
    self.opts = opts
    self.batch_size = batch_size
    self.num_videos = len(source)
    self.views_per_video = opts.num_clips * opts.num_crops
    self.num_views = self.num_videos * self.views_per_video
    per_round = batch_size * process_count
    self.num_batches = max(1, math.ceil(self.num_views / per_round))
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.max_bad_samples = max_bad_samples
    self.process_index = process_index
    self.batches = _EvalBatches(
        source, opts, batch_size=batch_size,
        first_view=process_index * self.num_batches * batch_size,
        num_views=self.num_views)

  def __len__(self) -> int:
    """Batches per host (the same on every host)."""
    return self.num_batches

  def __iter__(self):
    tracker = _BadSampleTracker(self.max_bad_samples)
    it = _grain_iterator(self.batches, 0, self.num_batches, self.num_workers,
                         self.prefetch)
    try:
      for batch in it:
        batch = dict(batch)
        tracker.update(batch.pop('_bad_files'), 0)
        yield batch
    finally:
      close = getattr(it, 'close', None)
      if close is not None:
        close()
