"""The DTF / SIFA custom ops as plain PyTorch formulas (SPEC.md section 2), original layouts.

Channels-first ``(N, C, T, H, W)`` tensors, weights ``(C, T, K, K)``, offsets ``(N, 2*K*K, T, H, W)``
(channel ``2k`` = row displacement, ``2k+1`` = column displacement), correlation / attention
``(N, G*K*K, T, H, W)``. Written as literal loops over the K*K taps with the **logical** semantics
(SPEC.md 2.7); everything is differentiable by autograd and runs on CPU in float32 or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_padding(kernel_size: int, dilation: int = 1) -> int:
  return (dilation * (kernel_size - 1) + 1) // 2


def previous_frame(x: torch.Tensor, mode: str = "shift") -> torch.Tensor:
  """Forward shift on dim 2 (SPEC.md 2.6): ``'shift'``: ``q_t = x_{t-1}``, ``q_0 = x_0``;
  ``'first'``: ``q_t = x_0`` (what the original computed on CPU)."""
  if mode == "shift":
    return torch.cat([x[:, :, :1], x[:, :, :-1]], dim=2)
  if mode == "first":
    return x[:, :, :1].expand_as(x)
  raise ValueError(mode)


def next_frame_or_zero(x: torch.Tensor) -> torch.Tensor:
  """Backward shift + mask on dim 2: ``s_t = x_{t+1}`` (t < T-1), ``s_{T-1} = 0``."""
  return torch.cat([x[:, :, 1:], torch.zeros_like(x[:, :, :1])], dim=2)


def shifted_taps(x: torch.Tensor, kernel_size: int, dilation: int = 1):
  """Yields ``(kh, kw, x̂[..., h-p+kh*d, w-p+kw*d])`` for every tap of a zero-padded ``(..., H, W)``."""
  p = same_padding(kernel_size, dilation)
  height, width = x.shape[-2:]
  xp = F.pad(x, (p, p, p, p))
  for kh in range(kernel_size):
    for kw in range(kernel_size):
      yield kh, kw, xp[..., kh * dilation:kh * dilation + height, kw * dilation:kw * dilation + width]


def temporal_correlation(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1) -> torch.Tensor:
  """DTF correlation (2.1), one group: ``(N, C, T, H, W)``, ``(C, T, K, K)`` -> ``(N, K*K, T, H, W)``."""
  kernel_size = weight.shape[-1]
  prev = previous_frame(x)
  out = []
  for kh, kw, view in shifted_taps(x, kernel_size, dilation):
    out.append((weight[None, :, :, kh, kw, None, None] * prev * view).sum(dim=1))
  return torch.stack(out, dim=1)


def frame_aggregation(x: torch.Tensor, attn: torch.Tensor, kernel_size: int,
                      dilation: int = 1) -> torch.Tensor:
  """DTF aggregation (2.2, one head, one weight row) on frames folded into the batch:
  ``x (M, C, H, W)``, ``attn (M, K*K, H, W)`` -> ``(M, C, H, W)``."""
  out = torch.zeros_like(x)
  for kh, kw, view in shifted_taps(x, kernel_size, dilation):
    k = kh * kernel_size + kw
    out = out + attn[:, k:k + 1] * view
  return out


def bilinear_sample(plane: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
  """SIFA sampling ``S`` (2.3), floor-based.

  Args:
    plane: ``(N, C, T, H, W)`` values.
    py, px: ``(N, T, H, W)`` sampling rows / columns (one point per output pixel).
  Returns:
    ``(N, C, T, H, W)``: ``S(plane[n, c, t], py[n, t, h, w], px[n, t, h, w])``.
  """
  n, c, t, height, width = plane.shape
  flat = plane.reshape(n, c, t, height * width)
  y0 = torch.floor(py)
  x0 = torch.floor(px)
  ly, lx = py - y0, px - x0
  y0, x0 = y0.long(), x0.long()
  inside = ((py > -1) & (px > -1) & (py < height) & (px < width)).to(plane.dtype)
  out = torch.zeros_like(plane)
  for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                      (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
    yy, xx = y0 + dy, x0 + dx
    valid = ((yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)).to(plane.dtype)
    index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).reshape(n, 1, t, height * width)
    corner = torch.gather(flat, 3, index.expand(n, c, t, height * width)).reshape(plane.shape)
    out = out + (wgt * valid)[:, None] * corner
  return out * inside[:, None]


def _deformed_points(offsets: torch.Tensor, kernel_size: int, kh: int, kw: int, dilation: int = 1):
  n, _, t, height, width = offsets.shape
  p = same_padding(kernel_size, dilation)
  k = kh * kernel_size + kw
  rows = torch.arange(height, dtype=offsets.dtype).view(1, 1, height, 1)
  cols = torch.arange(width, dtype=offsets.dtype).view(1, 1, 1, width)
  py = rows - p + kh * dilation + offsets[:, 2 * k]
  px = cols - p + kw * dilation + offsets[:, 2 * k + 1]
  return py, px


def deformable_correlation(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                           dilation: int = 1) -> torch.Tensor:
  """SIFA ``defcor`` (2.4), one group: -> ``(N, K*K, T, H, W)``."""
  kernel_size = weight.shape[-1]
  prev = previous_frame(x)
  out = []
  for kh in range(kernel_size):
    for kw in range(kernel_size):
      py, px = _deformed_points(offsets, kernel_size, kh, kw, dilation)
      sampled = bilinear_sample(x, py, px)
      out.append((weight[None, :, :, kh, kw, None, None] * prev * sampled).sum(dim=1))
  return torch.stack(out, dim=1)


def deformable_aggregation(x: torch.Tensor, offsets: torch.Tensor, attn: torch.Tensor,
                           kernel_size: int, dilation: int = 1) -> torch.Tensor:
  """SIFA ``defagg`` (2.5), one group: ``attn (N, K*K, T, H, W)`` -> ``(N, C, T, H, W)``."""
  out = torch.zeros_like(x)
  for kh in range(kernel_size):
    for kw in range(kernel_size):
      py, px = _deformed_points(offsets, kernel_size, kh, kw, dilation)
      k = kh * kernel_size + kw
      out = out + attn[:, k:k + 1] * bilinear_sample(x, py, px)
  return out
