"""Video input pipeline on grain: sources, clip sampling, augmentation, batches.

``dtf_jax.data`` knows nothing about models or training. It yields batches of
numpy arrays (channels-last, ``(N, T, H, W, 3)``) and a checkpointable iterator
state.

Public API::

  cfg = default_data_config()              # ml_collections.ConfigDict
  train = build_train_loader(cfg, global_batch_size=..., seed=...,
                             process_index=..., process_count=...)
  it = iter(train)                         # TrainIterator
  batch = next(it)   # {'video': f32 (B, T, H, W, 3), 'label': i32 (B,),
                     #  'num_replaced': i32 (B,)}
  state = it.get_state(); it.set_state(state)  # or grain.checkpoint handlers
  for batch in build_eval_loader(cfg, batch_size=...):
    ...              # {'video', 'label', 'video_index', 'view_index', 'valid'}
  dataset_size(cfg, 'train'); steps_per_epoch(cfg, global_batch_size)
  ensure_synthetic_dataset(cfg) -> (train_list, val_list, root)
"""

from __future__ import annotations

import numpy as np

from dtf_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dtf_jax.data.config import (default_data_config, eval_sizes,
                                 validate_config)
from dtf_jax.data.decode import BadVideoError
from dtf_jax.data.lists import ListFileError, VideoEntry, parse_list
from dtf_jax.data.pipeline import (BadDataError, ClipOptions, EvalLoader,
                                   TrainIterator, TrainLoader, epoch_length)
from dtf_jax.data.sampling import ShortVideoError
from dtf_jax.data.sources import (FrameFolderSource, TfdsSource,
                                  VideoFileSource)
from dtf_jax.data.synthetic import ensure_synthetic_dataset

__all__ = [
    'BadDataError', 'BadVideoError', 'ClipOptions', 'EvalLoader',
    'IMAGENET_MEAN', 'IMAGENET_STD', 'ListFileError', 'ShortVideoError',
    'TrainIterator', 'TrainLoader', 'build_eval_loader', 'build_source',
    'build_train_loader', 'checkpoint_handler', 'dataset_size',
    'default_data_config', 'ensure_synthetic_dataset', 'normalize_video',
    'steps_per_epoch', 'validate_config',
]

_SPLITS = ('train', 'val')


def clip_options(cfg) -> ClipOptions:
  """The picklable per-clip options derived from the config."""
  resize, crop = eval_sizes(cfg)
  return ClipOptions(
      clip_length=int(cfg.clip_length), num_segments=int(cfg.num_segments),
      num_steps=int(cfg.num_steps), crop_size=int(cfg.crop_size),
      crop_scale=tuple(float(x) for x in cfg.crop_scale),
      crop_ratio=tuple(float(x) for x in cfg.crop_ratio),
      color_jitter=bool(cfg.color_jitter),
      flip_prob=0.0 if cfg.no_horizontal_flip else 0.5,
      rand_augment=((int(cfg.rand_augment_num_ops),
                     float(cfg.rand_augment_magnitude))
                    if cfg.rand_augment else None),
      short_video=cfg.short_video, eval_resize=resize, eval_crop_size=crop,
      num_clips=int(cfg.num_clips), num_crops=int(cfg.num_crops),
      mean=tuple(float(x) for x in cfg.mean),
      std=tuple(float(x) for x in cfg.std), video_dtype=cfg.video_dtype)


def _list_and_root(cfg, split):
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
  if cfg.source == 'synthetic':
    train_list, val_list, root = ensure_synthetic_dataset(cfg)
    return (train_list if split == 'train' else val_list), root
  list_path = cfg.train_list if split == 'train' else cfg.val_list
  if not list_path:
    raise ValueError(f"data.{split}_list must be set for data.source="
                     f"{cfg.source!r}.")
  return list_path, cfg.root


def _check_short_videos(entries, cfg, list_path):
  """Fails at start-up on short videos whose frame count the list gives."""
  if cfg.short_video != 'error':
    return
  need = cfg.clip_length * cfg.num_steps
  short = [e for e in entries if e.num_frames is not None
           and e.num_frames < need]
  if short:
    shown = '\n  '.join(f'{list_path}:{e.line}: {e.path} ({e.num_frames} '
                        'frames)' for e in short[:20])
    raise ShortVideoError(
        f'{len(short)} videos in {list_path} have fewer than clip_length * '
        f"num_steps = {need} frames. Remove them, or set data.short_video="
        f"'loop' to loop their frames:\n  {shown}")


def build_source(cfg, split: str = 'train'):
  """The random-access video source of a split (lists parsed and checked)."""
  validate_config(cfg)
  if cfg.source == 'tfds':
    if not cfg.tfds_name:
      raise ValueError("data.tfds_name must be set for data.source='tfds'.")
    split_name = cfg.tfds_train_split if split == 'train' else (
        cfg.tfds_val_split)
    return TfdsSource(cfg.tfds_name, split_name, cfg.tfds_data_dir,
                      cfg.tfds_video_key, cfg.tfds_label_key)
  list_path, root = _list_and_root(cfg, split)
  if cfg.source == 'frame_list':
    entries = parse_list(list_path, legacy_label_parse=cfg.legacy_label_parse)
    _check_short_videos(entries, cfg, list_path)
    return FrameFolderSource(entries, root, cfg.frame_template)
  entries = parse_list(list_path)
  _check_short_videos(entries, cfg, list_path)
  return VideoFileSource(entries, root)


def dataset_size(cfg, split: str = 'train') -> int:
  """Number of videos in a split."""
  return len(build_source(cfg, split))


def steps_per_epoch(cfg, global_batch_size: int) -> int:
  """Full global batches per epoch (drop_last; SPEC.md 6.2).

  ``floor(R * ceil(N / R) / global_batch_size)`` with ``R =
  cfg.sampler_num_replicas`` (1: ``N // global_batch_size``; the original's
  4-GPU DistributedSampler: R = 4 and per-GPU batch b gives
  ``floor(ceil(N/4) / b)``).
  """
  n = dataset_size(cfg, 'train')
  return epoch_length(n, int(cfg.sampler_num_replicas)) // global_batch_size


def build_train_loader(cfg, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1
                       ) -> TrainLoader:
  """Infinite training loader for this host.

  Args:
    cfg: data config (``default_data_config()``).
    global_batch_size: rows per step over all hosts.
    seed: run seed (epoch order, clip offsets, augmentation).
    process_index, process_count: this host and the number of hosts (JAX
      processes); each host gets ``global_batch_size // process_count`` rows.

  Returns:
    A :class:`TrainLoader`; ``iter()`` gives a :class:`TrainIterator` yielding
    ``{'video': float32 (B, T, H, W, 3) normalised (uint8 if
    cfg.video_dtype == 'uint8'), 'label': int32 (B,), 'num_replaced': int32
    (B,)}`` with ``T = num_segments * clip_length`` and ``H = W = crop_size``.
  """
  source = build_source(cfg, 'train')
  return TrainLoader(
      source, clip_options(cfg), global_batch_size=global_batch_size,
      seed=seed, process_index=process_index, process_count=process_count,
      num_workers=int(cfg.num_workers), prefetch=int(cfg.prefetch),
      max_bad_samples=int(cfg.max_bad_samples),
      sampler_num_replicas=int(cfg.sampler_num_replicas))


def build_eval_loader(cfg, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1, split: str = 'val'
                      ) -> EvalLoader:
  """Finite evaluation loader over every (video, clip, crop) view.

  Args:
    cfg: data config.
    batch_size: rows of every yielded batch on this host (per-host size).
    process_index, process_count: host sharding; every host yields
      ``len(loader)`` batches.
    split: 'val' or 'train'.

  Returns:
    An :class:`EvalLoader` (re-iterable) yielding ``{'video': float32
    (batch_size, T, c, c, 3), 'label': int32, 'video_index': int32,
    'view_index': int32 (clip * num_crops + crop), 'valid': bool}``; padding
    rows have ``valid=False`` and ``video_index=-1``.
  """
  source = build_source(cfg, split)
  return EvalLoader(
      source, clip_options(cfg), batch_size=batch_size,
      process_index=process_index, process_count=process_count,
      num_workers=int(cfg.num_workers), prefetch=int(cfg.prefetch),
      max_bad_samples=int(cfg.max_bad_samples))


def normalize_video(video, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``; numpy or jax arrays.

  For ``cfg.video_dtype == 'uint8'`` batches, call it inside the jitted step
  (the same arithmetic as the host-side normalisation).
  """
  if isinstance(video, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # pylint: disable=g-import-not-at-top
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  bias = (-mean / std).astype(np.float32)
  return video.astype(xp.float32) * scale + bias


def checkpoint_handler():
  """grain's orbax handler class for :class:`TrainIterator` (see its doc)."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointHandler
