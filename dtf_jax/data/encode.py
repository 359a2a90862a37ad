"""Writing videos with PyAV (synthetic data, benchmarks and tests)."""

from __future__ import annotations

import fractions
from typing import Sequence

import numpy as np


def write_video(path: str, frames: np.ndarray, *, codec: str = 'libx264',
                pix_fmt: str = 'yuv420p', fps: int = 25,
                gop_size: int | None = 12,
                pts_ms: Sequence[int] | None = None,
                options: dict[str, str] | None = None,
                container_format: str | None = None) -> None:
  """Encodes uint8 RGB frames (T, H, W, 3) into a video file.

  Args:
    path: output file; the container is chosen from the extension unless
      ``container_format`` is given.
    frames: uint8 (T, H, W, 3).
    codec: encoder name ('libx264', 'libvpx-vp9', 'mpeg4', 'mjpeg', ...).
    pix_fmt: encoder pixel format ('yuv420p' needs even sizes; 'yuv444p'
      allows odd sizes with libx264).
    fps: nominal frame rate.
    gop_size: keyframe interval (None: the encoder's default).
    pts_ms: per-frame presentation times in milliseconds for a variable frame
      rate (strictly increasing); None = constant ``fps``.
    options: encoder options, e.g. {'qp': '0'}.
    container_format: e.g. 'mp4', 'matroska', 'avi'.
  """
  import av  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames must be uint8 (T, H, W, 3), got {frames.dtype} '
                     f'{frames.shape}.')
  if pts_ms is not None and len(pts_ms) != len(frames):
    raise ValueError(f'pts_ms has {len(pts_ms)} entries for {len(frames)} '
                     'frames.')
  with av.open(path, 'w', format=container_format) as container:
    stream = container.add_stream(codec, rate=fps, options=options or {})
    stream.width = frames.shape[2]
    stream.height = frames.shape[1]
    stream.pix_fmt = pix_fmt
    stream.codec_context.thread_count = 1
    if gop_size is not None:
      stream.codec_context.gop_size = gop_size
    time_base = None
    if pts_ms is not None:
      time_base = fractions.Fraction(1, 1000)
      stream.codec_context.time_base = time_base
      stream.time_base = time_base
    for i, frame in enumerate(frames):
      vf = av.VideoFrame.from_ndarray(frame, format='rgb24')
      if time_base is not None:
        vf.pts = int(pts_ms[i])
        vf.time_base = time_base
      for packet in stream.encode(vf):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
