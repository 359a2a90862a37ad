"""The data configuration (an ``ml_collections.ConfigDict``)."""

from __future__ import annotations

import ml_collections

from dtf_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD

SOURCES = ('synthetic', 'video_list', 'frame_list', 'tfds')


def default_synthetic_config() -> ml_collections.ConfigDict:
  """Parameters of the built-in synthetic motion dataset (see synthetic.py).

  Fields:
    num_train, num_val: number of videos per split.
    height, width: frame size (even numbers; libx264 yuv420p).
    num_classes: 4 (fixed by the design: 2 objects x 2 directions).
    group_size: frames per static group (4 = the C2D stem's temporal stride).
    cache_dir: parent directory of the generated sets; the set lives in
      ``<cache_dir>/<hash of parameters>``. None = ``$DTF_JAX_CACHE`` or
      ``~/.cache/dtf_jax/synthetic``.
    seed: generation seed.
    noise: per-group pixel noise standard deviation (0-255 scale).
  """
  c = ml_collections.ConfigDict()
  c.num_train = 512
  c.num_val = 128
  c.height = 64
  c.width = 64
  c.num_classes = 4
  c.group_size = 4
  c.cache_dir = ml_collections.FieldReference(None, field_type=str)
  c.seed = 0
  c.noise = 8.0
  return c


def default_data_config() -> ml_collections.ConfigDict:
  """The data pipeline's configuration with documented defaults.

  Fields (SPEC.md 6.1-6.3 give the originals' values):
    source: 'synthetic' | 'video_list' (CSV/TSV list of encoded videos) |
      'frame_list' (the originals' ``<path> <num_frames> <label>`` list of JPEG
      frame folders) | 'tfds' (a TFDS dataset through ``tfds.data_source``).
    root: directory the list paths are relative to.
    train_list, val_list: list files (video_list: ``path,label[,num_frames]``
      CSV, or TSV for ``.tsv``; frame_list: SPEC.md 6.2 format).
    tfds_name, tfds_data_dir: TFDS dataset name (e.g. 'ucf101') and data dir.
    tfds_train_split, tfds_val_split: TFDS split names.
    tfds_video_key, tfds_label_key: feature names of the frames and the label.
    num_classes: number of classes (informational for the trainer; the
      synthetic source has 4).
    clip_length: frames per segment (16).
    num_segments: segments per clip (1); a clip has num_segments*clip_length
      frames.
    num_steps: stride between sampled frames (1).
    crop_size: training crop (224).
    crop_scale, crop_ratio: RandomResizedCrop ranges ((0.2, 1), (3/4, 4/3)).
    eval_resize: test-time shorter side (None = crop_size, as the original).
    eval_crop_size: test-time crop (None = crop_size).
    num_clips: test clips per video (1; SPEC's formula).
    num_crops: test crops per clip: 1 (centre) or 3 (along the longer side).
      num_clips > 1 or num_crops = 3 is an extension (SPEC.md 7.12).
    no_horizontal_flip: disable the flip (direction-sensitive datasets,
      Something-Something).
    rand_augment: RandAugment instead of jitter/grayscale/blur (False, also
      for SSv1, SPEC.md 7.13); rand_augment_num_ops / rand_augment_magnitude
      are its n and m.
    color_jitter: False switches off colour jitter, grayscale and blur (an
      off switch for the synthetic quickstart).
    short_video: 'error' (default, like the original) or 'loop' (a video with
      fewer than clip_length*num_steps frames is looped; sampling.py).
    max_bad_samples: how many distinct unreadable videos are tolerated (each is
      replaced and logged once) before the run stops with a list of them.
    legacy_label_parse: the original's drop-last-character label parse of
      frame lists (SPEC.md 7.14).
    frame_template: file name of frame k (1-based) in a frame folder.
    num_workers: grain worker processes (0 = load in the main process).
    prefetch: batches buffered per worker (or by the main-process reader
      thread when num_workers = 0).
    video_dtype: 'float32' (normalised on the host) or 'uint8' (raw pixels;
      normalise on device with ``dtf_jax.data.normalize_video``).
    sampler_num_replicas: the epoch is padded like PyTorch's
      DistributedSampler with this many replicas (1 = no padding; 4 reproduces
      the original 4-GPU epoch length floor(ceil(N/4)/b)).
    mean, std: normalisation (ImageNet).
    synthetic: the synthetic dataset's parameters.
  """
  c = ml_collections.ConfigDict()
  c.source = 'synthetic'
  c.root = ml_collections.FieldReference(None, field_type=str)
  c.train_list = ml_collections.FieldReference(None, field_type=str)
  c.val_list = ml_collections.FieldReference(None, field_type=str)
  c.tfds_name = ml_collections.FieldReference(None, field_type=str)
  c.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
  c.tfds_train_split = 'train'
  c.tfds_val_split = 'test'
  c.tfds_video_key = 'video'
  c.tfds_label_key = 'label'
  c.num_classes = 4
  c.clip_length = 16
  c.num_segments = 1
  c.num_steps = 1
  c.crop_size = 224
  c.crop_scale = (0.2, 1.0)
  c.crop_ratio = (3 / 4, 4 / 3)
  c.eval_resize = ml_collections.FieldReference(None, field_type=int)
  c.eval_crop_size = ml_collections.FieldReference(None, field_type=int)
  c.num_clips = 1
  c.num_crops = 1
  c.no_horizontal_flip = False
  c.rand_augment = False
  c.rand_augment_num_ops = 2
  c.rand_augment_magnitude = 9
  c.color_jitter = True
  c.short_video = 'error'
  c.max_bad_samples = 100
  c.legacy_label_parse = False
  c.frame_template = '%05d.jpg'
  c.num_workers = 0
  c.prefetch = 2
  c.video_dtype = 'float32'
  c.sampler_num_replicas = 1
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD
  c.synthetic = default_synthetic_config()
  return c


def validate_config(cfg) -> None:
  """Raises ValueError naming the first bad field and how to fix it."""
  if cfg.source not in SOURCES:
    raise ValueError(f'data.source must be one of {SOURCES}, got '
                     f'{cfg.source!r}.')
  for name in ('clip_length', 'num_segments', 'num_steps', 'crop_size',
               'eval_resize', 'eval_crop_size', 'num_clips',
               'sampler_num_replicas'):
    value = cfg[name]
    if name in ('eval_resize', 'eval_crop_size') and value is None:
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'data.{name} must be a positive integer, got '
                       f'{value!r}.')
  if cfg.num_crops not in (1, 3):
    raise ValueError(f'data.num_crops must be 1 or 3, got {cfg.num_crops!r}.')
  resize, crop = eval_sizes(cfg)
  if crop > resize:
    raise ValueError(
        f'data.eval_crop_size ({crop}) must not exceed data.eval_resize '
        f'({resize}), the shorter side after resizing.')
  if cfg.short_video not in ('error', 'loop'):
    raise ValueError("data.short_video must be 'error' or 'loop', got "
                     f'{cfg.short_video!r}.')
  if cfg.video_dtype not in ('float32', 'uint8'):
    raise ValueError("data.video_dtype must be 'float32' or 'uint8', got "
                     f'{cfg.video_dtype!r}.')
  if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
    raise ValueError(f'data.num_workers must be an integer >= 0, got '
                     f'{cfg.num_workers!r}.')
  if not isinstance(cfg.prefetch, int) or cfg.prefetch < 1:
    raise ValueError(f'data.prefetch must be an integer >= 1, got '
                     f'{cfg.prefetch!r}.')
  if cfg.max_bad_samples < 0:
    raise ValueError(f'data.max_bad_samples must be >= 0, got '
                     f'{cfg.max_bad_samples!r}.')
  if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
    raise ValueError(f'data.mean/std must have 3 entries (std > 0), got '
                     f'mean={cfg.mean!r}, std={cfg.std!r}.')
  try:
    cfg.frame_template % 1
  except (TypeError, ValueError):
    raise ValueError(f'data.frame_template must contain one integer '
                     f'placeholder such as %05d, got {cfg.frame_template!r}.'
                     ) from None


def eval_sizes(cfg) -> tuple[int, int]:
  """(eval_resize, eval_crop_size) with None resolved to crop_size."""
  resize = cfg.crop_size if cfg.eval_resize is None else cfg.eval_resize
  crop = cfg.crop_size if cfg.eval_crop_size is None else cfg.eval_crop_size
  return int(resize), int(crop)
