"""PyTorch reference of the DTF block (SPEC.md 3.2), written from the spec with the originals'
parameter names, so ``state_dict()`` keys are those of SPEC.md 5.1:

``weights_cor (C, T, 3, 3)`` [frozen], ``filter_g.weight (2CF/16, (C+9)T, 1, 1)``,
``linear1.complex_weight (C, C, 2)``, ``alpha1 (1, C, 1, 1, 1)``, ``bias (1, C, 1, 1, 1)``,
``norm1.norm.{running_mean, running_var, num_batches_tracked}``.

Input / output ``(B, C, T, H, W)``. The custom ops are the torch formulas of
``torch_reference.temporal_ops``; the spectral part uses torch's native complex tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_reference import temporal_ops as tops


class FFTLinear(nn.Module):
  """``V[:, o] = sum_c (cw[o,c,0] + i cw[o,c,1]) * P[:, c]`` on ``(B, C, F, H, W)`` complex input."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__()
    self.complex_weight = nn.Parameter(torch.randn(out_features, in_features, 2) * 0.02)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    w = torch.complex(self.complex_weight[..., 0], self.complex_weight[..., 1])
    return torch.einsum("oc,bcfhw->bofhw", w, x)


class FFTBatchNorm(nn.Module):
  """Affine-less BatchNorm3d over real and imaginary parts with shared statistics."""

  def __init__(self, dim: int):
    super().__init__()
    self.norm = nn.BatchNorm3d(dim, affine=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    f = x.shape[2]
    both = self.norm(torch.cat([x.real, x.imag], dim=2))  # (B, C, 2F, H, W)
    return torch.complex(both[:, :, :f], both[:, :, f:])


class DTFBlock(nn.Module):
  """Dynamic temporal filtering (SPEC.md 3.2) on ``(B, C, T, H, W)``."""

  def __init__(self, dim: int, clip_len: int, kernel_size: int = 3, factor_g: int = 16):
    super().__init__()
    self.dim, self.clip_len, self.kernel_size, self.factor_g = dim, clip_len, kernel_size, factor_g
    freqs = clip_len // 2 + 1
    taps = kernel_size * kernel_size
    self.weights_cor = nn.Parameter(torch.full((dim, clip_len, kernel_size, kernel_size), 1.0 / dim),
                                    requires_grad=False)
    self.filter_g = nn.Conv2d((dim + taps) * clip_len, 2 * dim * freqs // factor_g, 1, bias=False)
    nn.init.kaiming_normal_(self.filter_g.weight, mode="fan_out", nonlinearity="relu")
    self.linear1 = FFTLinear(dim, dim)
    self.alpha1 = nn.Parameter(torch.zeros(1, dim, 1, 1, 1))
    self.bias = nn.Parameter(torch.zeros(1, dim, 1, 1, 1))
    self.norm1 = FFTBatchNorm(dim)

  def frame_wise_aggregation(self, x: torch.Tensor):
    """Steps 1-4: raw correlation ``r (B, K*K, T, H, W)`` and ``u = x + next-frame(m)``."""
    b, c, t, h, w = x.shape
    r = tops.temporal_correlation(x, self.weights_cor)
    attn = torch.softmax(r, dim=1)
    # Frames folded into the batch, b-major: (B*T, C, H, W).
    x_frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    a_frames = attn.transpose(1, 2).reshape(b * t, -1, h, w)
    m = tops.frame_aggregation(x_frames, a_frames, self.kernel_size)
    m = m.reshape(b, t, c, h, w).transpose(1, 2)
    return x + tops.next_frame_or_zero(m), r

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    assert t == self.clip_len, (t, self.clip_len)
    freqs = t // 2 + 1
    u, r = self.frame_wise_aggregation(x)
    spectrum = torch.fft.rfft(u, dim=2, norm="ortho")  # (B, C, F, H, W)
    z = torch.cat([u, r], dim=1).reshape(b, -1, h, w)  # feature j*T + t
    phi = self.filter_g(z)  # (B, O, H, W)
    psi = phi.repeat_interleave(self.factor_g, dim=1).reshape(b, c, freqs, 2, h, w)
    psi = torch.complex(psi[:, :, :, 0], psi[:, :, :, 1])  # (B, C, F, H, W)
    v = self.norm1(self.linear1(spectrum * psi))
    y = torch.fft.irfft(v * self.alpha1, n=t, dim=2, norm="ortho")
    return x + y + self.bias
