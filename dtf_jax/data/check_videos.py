"""Lists unreadable or too-short videos of a list file.

Usage::

  python -m dtf_jax.data.check_videos LIST [--root DIR] [--clip-length 16]
      [--num-steps 1] [--format auto|videos|frames] [--frame-template %05d.jpg]
      [--decode-all] [--legacy-label-parse]

``LIST`` is a CSV/TSV list of video files (``path,label[,num_frames]``) or a
frame list in the originals' format (``<path> <num_frames> <label>``; chosen by
extension unless ``--format`` says). For every video it checks that the file
(or every frame file) exists, that the first and last frames decode, and that
it has at least ``clip_length * num_steps`` frames; ``--decode-all`` decodes
every frame instead (slow). Problems are printed to stdout as
``<list line>\t<path>\t<problem>``; progress (count, rate, ETA) goes to stderr.
Exit status: 0 if every video is fine, 1 if any is not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from dtf_jax.data import decode
from dtf_jax.data.lists import ListFileError, is_csv_list, parse_list


class _Progress:
  """A one-line stderr progress report: done/total, rate and ETA."""

  def __init__(self, total: int, stream=None, every_s: float = 0.5):
    self.total = total
    self.stream = stream if stream is not None else sys.stderr
    self.every_s = every_s
    self.start = time.monotonic()
    self.last = 0.0

  def update(self, done: int, bad: int, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = now - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float('nan')
    self.stream.write(
        f'\rchecked {done}/{self.total} ({bad} bad) {rate:.1f} videos/s '
        f'ETA {_fmt_time(eta)}   ')
    self.stream.flush()

  def finish(self, done: int, bad: int) -> None:
    self.update(done, bad, force=True)
    self.stream.write('\n')
    self.stream.flush()


def _fmt_time(seconds: float) -> str:
  if seconds != seconds:  # NaN
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}' if h else f'{m:d}:{s:02d}'


def check_video_file(path: str, num_frames: int | None, need: int,
                     decode_all: bool = False) -> str | None:
  """Problem with an encoded video, or None if it is usable."""
  try:
    count = decode.count_video_frames(path) if os.path.isfile(path) else None
  except decode.BadVideoError as e:
    return str(e)
  if count is None:
    return 'file does not exist'
  frames = num_frames if num_frames is not None else count
  if frames < need:
    return f'too short: {frames} frames < {need}'
  if num_frames is not None and num_frames > count:
    return f'list says {num_frames} frames but the file has {count}'
  indices = np.arange(frames) if decode_all else np.array([0, frames - 1])
  try:
    decode.read_video_frames(path, lambda d: indices, num_frames)
  except decode.BadVideoError as e:
    return str(e)
  return None


def check_frame_folder(directory: str, num_frames: int, need: int,
                       template: str, decode_all: bool = False
                       ) -> str | None:
  """Problem with a frame folder, or None if it is usable."""
  if not os.path.isdir(directory):
    return 'folder does not exist'
  if num_frames < need:
    return f'too short: {num_frames} frames < {need}'
  missing = [k for k in range(1, num_frames + 1)
             if not os.path.isfile(os.path.join(directory, template % k))]
  if missing:
    return (f'{len(missing)} of {num_frames} frame files missing (first: '
            f'{template % missing[0]})')
  indices = np.arange(num_frames) if decode_all else np.array(
      [0, num_frames - 1])
  try:
    decode.read_image_frames(directory, template, indices)
  except decode.BadVideoError as e:
    return str(e)
  return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m dtf_jax.data.check_videos',
      description='List unreadable or too-short videos of a list file.')
  parser.add_argument('list', help='list file (CSV/TSV or frame list)')
  parser.add_argument('--root', default='',
                      help='directory the list paths are relative to')
  parser.add_argument('--clip-length', type=int, default=16)
  parser.add_argument('--num-steps', type=int, default=1)
  parser.add_argument('--format', choices=('auto', 'videos', 'frames'),
                      default='auto',
                      help='videos = encoded files, frames = frame folders; '
                      'auto: .csv/.tsv lists are videos, others frames')
  parser.add_argument('--frame-template', default='%05d.jpg')
  parser.add_argument('--decode-all', action='store_true',
                      help='decode every frame (slow) instead of first/last')
  parser.add_argument('--legacy-label-parse', action='store_true')
  args = parser.parse_args(argv)
  try:
    entries = parse_list(args.list,
                         legacy_label_parse=args.legacy_label_parse)
  except (ListFileError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  fmt = args.format
  if fmt == 'auto':
    fmt = 'videos' if is_csv_list(args.list) else 'frames'
  need = args.clip_length * args.num_steps
  progress = _Progress(len(entries))
  bad = 0
  for done, entry in enumerate(entries, start=1):
    path = os.path.join(args.root, entry.path)
    if fmt == 'videos':
      problem = check_video_file(path, entry.num_frames, need,
                                 args.decode_all)
    elif entry.num_frames is None:
      problem = 'frame folders need num_frames in the list'
    else:
      problem = check_frame_folder(path, entry.num_frames, need,
                                   args.frame_template, args.decode_all)
    if problem is not None:
      bad += 1
      sys.stdout.write(f'{entry.line}\t{entry.path}\t{problem}\n')
      sys.stdout.flush()
    progress.update(done, bad)
  progress.finish(len(entries), bad)
  print(f'{bad} of {len(entries)} videos have problems.', file=sys.stderr)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
