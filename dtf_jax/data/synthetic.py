"""A small synthetic video dataset whose labels only order-aware models can learn.

Each video has exactly ``clip_length`` frames (so clip sampling is offset 0),
made of ``G = clip_length / group_size`` groups of ``group_size`` identical
frames (content changes only between groups: the C2D stem folds each group of
4 frames into one time step and C2D never mixes time steps afterwards).

Content: a smooth random background texture (fixed per video) plus fresh pixel
noise per group, and two shapes: a light disc ``A`` shown in the first ``G/2``
groups and a dark square ``B`` shown in the last ``G/2`` groups (random light /
dark colours; distinct in shape and brightness so colour jitter and grayscale
keep them apart). Each
shape moves vertically by a fixed step ``s`` between consecutive groups, either
down or up::

    label = 2 * (A moves down) + (B moves down)        (4 classes)

Why an order-blind model is at chance: the vertical positions of a shape are
``u, u+s, ..`` (down) or the same positions in reverse (up), with the lowest
position ``u`` drawn from the same range either way, and every other quantity
(x positions, colours, background, noise) is drawn independently of the label.
So the *set* of groups (what a model that pools over time without mixing time
steps sees) has the same distribution for all four labels; only the order of
the groups tells them apart. Motion is vertical so horizontal flips keep the
label. Each group is encoded as its own closed GOP with a constant quantiser,
so no group's compression depends on another group.

Files (CSV lists, see lists.py)::

    <cache_dir>/<hash of parameters>/{train,val}/<index>.mp4
    <cache_dir>/<hash of parameters>/{train,val}.csv   (path,label,num_frames)

Generation is race-safe: a process writes into a temporary directory next to
the final one and renames it into place; a process that loses the race uses the
winner's copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from dtf_jax.data import encode
from dtf_jax.data.lists import VideoEntry, write_csv_list

GENERATOR_VERSION = 2
NUM_CLASSES = 4
_DONE = 'COMPLETE.json'


def synthetic_params(cfg) -> dict:
  """The parameters that determine the generated files (hashed for the dir)."""
  s = cfg.synthetic
  params = {
      'version': GENERATOR_VERSION,
      'num_train': int(s.num_train),
      'num_val': int(s.num_val),
      'height': int(s.height),
      'width': int(s.width),
      'group_size': int(s.group_size),
      'clip_length': int(cfg.clip_length),
      'seed': int(s.seed),
      'noise': float(s.noise),
  }
  if params['height'] % 2 or params['width'] % 2 or min(
      params['height'], params['width']) < 16:
    raise ValueError(
        f"synthetic frame size must be even and >= 16, got "
        f"{params['height']}x{params['width']}.")
  num_groups, rem = divmod(params['clip_length'], params['group_size'])
  if rem or num_groups < 4 or num_groups % 2:
    raise ValueError(
        f"synthetic videos need clip_length ({params['clip_length']}) to be "
        f"an even number >= 4 of groups of group_size "
        f"({params['group_size']}) frames.")
  if int(s.num_classes) != NUM_CLASSES:
    raise ValueError(f'the synthetic dataset has {NUM_CLASSES} classes, got '
                     f'synthetic.num_classes={s.num_classes}.')
  if params['num_train'] < 1 or params['num_val'] < 1:
    raise ValueError('synthetic.num_train and num_val must be >= 1.')
  return params


def default_cache_dir() -> str:
  base = os.environ.get('DTF_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'dtf_jax')
  return os.path.join(base, 'synthetic')


def dataset_dir(cfg) -> str:
  params = synthetic_params(cfg)
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()
                          ).hexdigest()[:16]
  parent = cfg.synthetic.cache_dir or default_cache_dir()
  return os.path.join(os.path.expanduser(parent), digest)


def _texture(rng, height, width):
  """Smooth random RGB texture around a random mid-grey, float (H, W, 3)."""
  coarse = rng.normal(0.0, 1.0, (height // 8 + 2, width // 8 + 2, 3))
  channels = []
  for ch in range(3):
    img = Image.fromarray(coarse[..., ch].astype(np.float32), 'F')
    channels.append(np.asarray(img.resize((width, height), Image.BILINEAR)))
  base = rng.uniform(70, 170, size=3)
  return base + 20.0 * np.stack(channels, -1)


def _colour(rng, bright: bool):
  """A light (A) or dark (B) random colour, values in 0..255."""
  if bright:
    return rng.uniform(215, 255, size=3)
  return rng.uniform(0, 40, size=3)


def motion_groups(label: int, num_groups: int, height: int, radius: int,
                  rng: np.random.Generator):
  """Vertical centre positions of the shapes per group.

  Returns:
    (ys_a, ys_b, step): lists of ``num_groups // 2`` y positions for each shape.
  """
  n = num_groups // 2
  step = int(min(round(0.25 * height), (height - 2 * radius - 2) // (n - 1)))
  down_a, down_b = divmod(int(label), 2)
  ys = []
  for down in (down_a, down_b):
    low = int(rng.integers(radius, height - 1 - radius - (n - 1) * step + 1))
    path = [low + k * step for k in range(n)]
    ys.append(path if down else path[::-1])
  return ys[0], ys[1], step


def render_video(label: int, params: dict, rng: np.random.Generator
                 ) -> np.ndarray:
  """One synthetic video: uint8 (clip_length, H, W, 3)."""
  h, w = params['height'], params['width']
  group_size = params['group_size']
  num_groups = params['clip_length'] // group_size
  radius = max(3, int(round(0.15 * min(h, w))))
  ys_a, ys_b, _ = motion_groups(label, num_groups, h, radius, rng)
  x_a = int(rng.integers(radius, w - radius))
  x_b = int(rng.integers(radius, w - radius))
  col_a, col_b = _colour(rng, True), _colour(rng, False)
  background = _texture(rng, h, w)
  yy, xx = np.mgrid[0:h, 0:w]
  frames = []
  for g in range(num_groups):
    img = background + rng.normal(0.0, params['noise'], (h, w, 3))
    if g < num_groups // 2:
      y = ys_a[g]
      mask = (yy - y) ** 2 + (xx - x_a) ** 2 <= radius ** 2
      img[mask] = col_a
    else:
      y = ys_b[g - num_groups // 2]
      mask = (np.abs(yy - y) <= radius - 1) & (np.abs(xx - x_b) <= radius - 1)
      img[mask] = col_b
    frame = np.clip(np.round(img), 0, 255).astype(np.uint8)
    frames.extend([frame] * group_size)
  return np.stack(frames)


def write_group_video(path: str, frames: np.ndarray, group_size: int,
                      fps: int = 25) -> None:
  """Encodes frames as H.264 with one closed GOP per group of frames.

  Every group of ``group_size`` frames starts with an IDR frame and its other
  frames reference only frames of the same group (no B-frames, constant QP, no
  scene-cut keyframes), so no group's compression depends on another group.
  """
  x264_params = (f'keyint={group_size}:min-keyint={group_size}:scenecut=0:'
                 'bframes=0:open-gop=0')
  encode.write_video(path, frames, codec='libx264', pix_fmt='yuv420p',
                     fps=fps, gop_size=None,
                     options={'qp': '18', 'preset': 'veryfast',
                              'x264-params': x264_params})


def _generate(directory: str, params: dict) -> None:
  for split, count, split_id in (('train', params['num_train'], 0),
                                 ('val', params['num_val'], 1)):
    os.makedirs(os.path.join(directory, split))
    entries = []
    for i in range(count):
      rng = np.random.default_rng([params['seed'], split_id, i])
      label = i % NUM_CLASSES
      frames = render_video(label, params, rng)
      rel = f'{split}/{i:06d}.mp4'
      write_group_video(os.path.join(directory, rel), frames,
                        params['group_size'])
      entries.append(VideoEntry(rel, label, params['clip_length']))
    write_csv_list(os.path.join(directory, f'{split}.csv'), entries)
  with open(os.path.join(directory, _DONE), 'w') as f:
    json.dump(params, f, indent=1, sort_keys=True)


def ensure_synthetic_dataset(cfg) -> tuple[str, str, str]:
  """Generates the synthetic set on first use (race-safe) and returns it.

  Args:
    cfg: the data config (``cfg.synthetic`` and ``cfg.clip_length`` are read).

  Returns:
    (train_list_path, val_list_path, root): CSV lists whose paths are relative
    to ``root``.
  """
  params = synthetic_params(cfg)
  final = dataset_dir(cfg)
  done = os.path.join(final, _DONE)
  if not os.path.exists(done):
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp-', dir=parent)
    try:
      _generate(tmp, params)
      try:
        os.rename(tmp, final)
        tmp = None
      except OSError:
        if not os.path.exists(done):
          # ``final`` exists but is incomplete (e.g. a crashed older run):
          # move it aside and retry once.
          stale = tempfile.mkdtemp(prefix='.stale-', dir=parent)
          os.rename(final, os.path.join(stale, 'old'))
          os.rename(tmp, final)
          tmp = None
          shutil.rmtree(stale, ignore_errors=True)
    finally:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
  return (os.path.join(final, 'train.csv'), os.path.join(final, 'val.csv'),
          final)
