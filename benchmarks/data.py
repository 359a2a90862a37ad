"""Throughput of the video input pipeline (clips per second) on this machine.

Measures ``dtf_jax.data`` training loaders for

* the training recipe: 16 frames, RandomResizedCrop to 224 with colour jitter,
  grayscale, blur and flip, from 256x340 videos (the script writes them to a
  temporary directory both as H.264 mp4 files and as JPEG frame folders), and
* the quickstart size: the built-in synthetic set (64x64, 16 frames, crop 64,
  no colour jitter), generated into a temporary cache,

for each worker count, printing one table with the median over repeats.
The default run takes about 1-2 minutes on 2 cores.

  python benchmarks/data.py [--workers 0 1 2] [--batches 3] [--repeats 3]
      [--uint8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

import dtf_jax.data as data
from dtf_jax.data.encode import write_video


def natural_video(rng, num_frames, height, width):
  """Smooth textured frames with a moving, zooming pattern (encodes like video)."""
  coarse = rng.uniform(0, 255, (height // 16 + 3, width // 16 + 3, 3))
  big = np.stack([np.asarray(Image.fromarray(
      coarse[..., c].astype(np.float32), 'F').resize(
          (width + 64, height + 64), Image.BICUBIC)) for c in range(3)], -1)
  frames = []
  for t in range(num_frames):
    dy, dx = int(16 + 12 * np.sin(t / 9)), int(t * 0.7) % 64
    frame = big[dy:dy + height, dx:dx + width]
    frames.append(np.clip(frame + 8 * np.sin(t / 5), 0, 255))
  return np.stack(frames).astype(np.uint8)


def write_recipe_data(root, num_videos=8, num_frames=64, height=256,
                      width=340):
  """mp4 files + CSV list, and JPEG folders + frame list, of the same videos."""
  rng = np.random.default_rng(0)
  csv_rows, frame_rows = [], []
  for k in range(num_videos):
    frames = natural_video(rng, num_frames, height, width)
    name = f'video_{k:03d}.mp4'
    write_video(os.path.join(root, name), frames, gop_size=25,
                options={'crf': '23', 'preset': 'veryfast'})
    csv_rows.append(f'{name},{k % 10},{num_frames}')
    folder = os.path.join(root, 'frames', f'video {k:03d}')
    os.makedirs(folder)
    for t, f in enumerate(frames):
      Image.fromarray(f).save(os.path.join(folder, f'{t + 1:05d}.jpg'),
                              quality=90)
    frame_rows.append(f'frames/video {k:03d} {num_frames} {k % 10}')
  with open(os.path.join(root, 'train.csv'), 'w') as f:
    f.write('\n'.join(csv_rows) + '\n')
  with open(os.path.join(root, 'frames.txt'), 'w') as f:
    f.write('\n'.join(frame_rows) + '\n')


def measure(cfg, batch_size, batches, repeats):
  """(median clips/s, first-batch seconds) of a fresh training iterator."""
  loader = data.build_train_loader(cfg, global_batch_size=batch_size, seed=0)
  it = iter(loader)
  try:
    start = time.perf_counter()
    next(it)  # start-up: worker processes, imports, first batch
    first = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(batches):
        batch = next(it)
      elapsed = time.perf_counter() - start
      rates.append(batches * batch_size / elapsed)
    assert batch['video'].shape[0] == batch_size
  finally:
    it.close()
  return statistics.median(rates), first


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--batches', type=int, default=3,
                      help='batches per timed repeat')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--uint8', action='store_true',
                      help='also measure uint8 output (normalise on device)')
  args = parser.parse_args(argv)

  rows = []
  with tempfile.TemporaryDirectory(prefix='dtf_jax_bench_') as tmp:
    start = time.perf_counter()
    write_recipe_data(tmp)
    print(f'wrote recipe data in {time.perf_counter() - start:.1f}s',
          file=sys.stderr)
    recipe = data.default_data_config()
    recipe.root = tmp
    recipe.clip_length = 16
    recipe.crop_size = 224
    quick = data.default_data_config()
    quick.source = 'synthetic'
    quick.synthetic.cache_dir = os.path.join(tmp, 'cache')
    quick.synthetic.num_train = 64
    quick.synthetic.num_val = 4
    quick.crop_size = 64
    quick.color_jitter = False
    start = time.perf_counter()
    data.ensure_synthetic_dataset(quick)
    print(f'wrote synthetic data in {time.perf_counter() - start:.1f}s',
          file=sys.stderr)

    cases = []
    for source, list_name in (('video_list', 'train.csv'),
                              ('frame_list', 'frames.txt')):
      cfg = recipe.copy_and_resolve_references()
      cfg.source = source
      cfg.train_list = os.path.join(tmp, list_name)
      label = 'mp4' if source == 'video_list' else 'jpeg folders'
      cases.append((f'recipe 16x224 {label}', cfg, 8))
    cases.append(('quickstart 16x64 mp4', quick, 32))
    dtypes = ['float32', 'uint8'] if args.uint8 else ['float32']
    for name, cfg, batch_size in cases:
      for workers in args.workers:
        for dtype in dtypes:
          cfg = cfg.copy_and_resolve_references()
          cfg.num_workers = workers
          cfg.video_dtype = dtype
          rate, first = measure(cfg, batch_size, args.batches, args.repeats)
          rows.append((name, workers, dtype, batch_size, rate, first))
          print(f'  {name} workers={workers} {dtype}: {rate:.1f} clips/s',
                file=sys.stderr)

  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'\ndtf_jax.data training throughput ({os.cpu_count()} CPUs, load '
        f'average {load:.1f} at the end; median of {args.repeats} x '
        f'{args.batches} batches after 1 warm-up batch)')
  header = ('case', 'workers', 'dtype', 'batch', 'clips/s', 'ms/clip',
            'first batch s')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '|'.join('---' for _ in header) + '|')
  for name, workers, dtype, batch_size, rate, first in rows:
    print(f'| {name} | {workers} | {dtype} | {batch_size} | {rate:.1f} | '
          f'{1000 / rate:.1f} | {first:.1f} |')


if __name__ == '__main__':
  main()
