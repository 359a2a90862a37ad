"""PyTorch reference of the video Swin networks (C2D / DTF / SIFA), written from SPEC.md.

Used by the tests (block- and network-level parity with ``dtf_jax``) and by the converter's tests.
Module names and nesting follow the originals, so ``state_dict()`` keys are those of SPEC.md 5.1
(``patch_embed.proj.weight``, ``layers.0.blocks.1.attn.qkv.weight``, ``...attn_mask``,
``layers.2.blocks.4.dtf_block.filter_g.weight``, ``...def_cor.weight``, ``fc.weight`` ...).

Layouts are the originals': video ``(N, 3, L, H, W)``, tokens ``(N*T', L_tok, C)`` with rows
``n*T' + t``. The temporal ops are plain torch formulas with the **logical** semantics of SPEC.md
2.7 (no CUDA kernels, no in-place overlapping shifts), so everything runs on CPU in float32 or
float64 and is differentiable by autograd.

Everything is constructible at reduced width/depth, e.g.::

  C2D_SIFA_SWIN_ViT(img_size=32, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 2],
                    window_size=2, num_classes=5, clip_len=2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Temporal ops as torch formulas (SPEC.md 2.1 / 2.2 / 2.4-2.5 at zero offsets), NCTHW.
# ----------------------------------------------------------------------------------------------


def _padding(kernel_size: int, dilation: int = 1) -> int:
  return (dilation * (kernel_size - 1) + 1) // 2


def _tap_views(x: torch.Tensor, kernel_size: int, dilation: int = 1):
  """Yields ``x̂[..., h - p + kh*d, w - p + kw*d]`` for every tap ``k = kh*K + kw`` (zero padded)."""
  p = _padding(kernel_size, dilation)
  height, width = x.shape[-2:]
  xp = F.pad(x, (p, p, p, p))
  for kh in range(kernel_size):
    for kw in range(kernel_size):
      yield kh, kw, xp[..., kh * dilation:kh * dilation + height, kw * dilation:kw * dilation + width]


def previous_frame(x: torch.Tensor) -> torch.Tensor:
  """``x[:, :, max(t-1, 0)]`` for ``x (N, C, T, H, W)``."""
  return torch.cat([x[:, :, :1], x[:, :, :-1]], dim=2)


def next_frame_or_zero(x: torch.Tensor) -> torch.Tensor:
  """``s_t = x_{t+1}`` for ``t < T-1``, ``s_{T-1} = 0`` (backward shift + mask, SPEC.md 2.6)."""
  return torch.cat([x[:, :, 1:], torch.zeros_like(x[:, :, :1])], dim=2)


def local_correlation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int,
                      dilation: int = 1) -> torch.Tensor:
  """One-group temporal correlation (SPEC.md 2.1): ``x (N,C,T,H,W)``, ``weight (C,T,K,K)``.

  Returns ``(N, K*K, T, H, W)``: ``sum_c W[c,t,kh,kw] * x[:,c,t-] * x̂[:,c,t,h-p+kh*d,w-p+kw*d]``.
  """
  prev = previous_frame(x)
  out = []
  for kh, kw, view in _tap_views(x, kernel_size, dilation):
    wk = weight[:, :, kh, kw][None, :, :, None, None]  # (1, C, T, 1, 1)
    out.append((wk * prev * view).sum(dim=1))
  return torch.stack(out, dim=1)


def local_aggregation(x: torch.Tensor, attn: torch.Tensor, kernel_size: int,
                      dilation: int = 1) -> torch.Tensor:
  """``y[:, c] = sum_k attn[:, k] * x̂[:, c, shifted by tap k]``; ``x (N,C,T,H,W)``, attn ``(N,K*K,T,H,W)``."""
  out = torch.zeros_like(x)
  for kh, kw, view in _tap_views(x, kernel_size, dilation):
    k = kh * kernel_size + kw
    out = out + attn[:, k:k + 1] * view
  return out


# ----------------------------------------------------------------------------------------------
# Standard Swin pieces (SPEC.md 3.6).
# ----------------------------------------------------------------------------------------------


class DropPath(nn.Module):
  """Per-sample stochastic depth ``x * floor(keep + U) / keep`` (identity in eval mode)."""

  def __init__(self, drop_prob: float = 0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1.0 - self.drop_prob
    mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype))
    return x.div(keep) * mask


class Mlp(nn.Module):

  def __init__(self, in_features, hidden_features):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


def window_partition(x, window_size):
  """``(B, H, W, C) -> (B*nW, ws, ws, C)``."""
  b, h, w, c = x.shape
  x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows, window_size, height, width):
  """``(B*nW, ws, ws, C) -> (B, H, W, C)``."""
  c = windows.shape[-1]
  x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> torch.Tensor:
  coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                      indexing="ij")).flatten(1)  # (2, N)
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
  return rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]


class WindowAttention(nn.Module):

  def __init__(self, dim, window_size, num_heads, qkv_bias=True):
    super().__init__()
    self.dim = dim
    self.window_size = window_size
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.relative_position_bias_table = nn.Parameter(
        torch.zeros((2 * window_size - 1) ** 2, num_heads))
    self.register_buffer("relative_position_index", relative_position_index(window_size))
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

  def forward(self, x, mask=None):
    b_, n, c = x.shape
    nh = self.num_heads
    qkv = self.qkv(x).reshape(b_, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * self.scale) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(n, n, nh).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.view(b_ // nw, nw, nh, n, n) + mask[None, :, None]).view(-1, nh, n, n)
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


def shifted_window_mask(height, width, window_size, shift_size):
  img = torch.zeros((1, height, width, 1))
  count = 0
  for hs in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
    for ws in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
      img[:, hs, ws, :] = count
      count += 1
  windows = window_partition(img, window_size).view(-1, window_size * window_size)
  diff = windows.unsqueeze(1) - windows.unsqueeze(2)
  return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinTransformerBlock(nn.Module):

  def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0,
               qkv_bias=True, drop_path=0.0):
    super().__init__()
    self.dim = dim
    self.input_resolution = tuple(input_resolution)
    self.num_heads = num_heads
    self.window_size = window_size
    self.shift_size = shift_size
    if min(self.input_resolution) <= self.window_size:
      self.shift_size = 0
      self.window_size = min(self.input_resolution)
    assert 0 <= self.shift_size < self.window_size
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, self.window_size, num_heads, qkv_bias)
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    mask = (shifted_window_mask(*self.input_resolution, self.window_size, self.shift_size)
            if self.shift_size > 0 else None)
    self.register_buffer("attn_mask", mask)

  def attention_residual(self, x):
    height, width = self.input_resolution
    b, l, c = x.shape
    assert l == height * width
    shortcut = x
    x = self.norm1(x).view(b, height, width, c)
    if self.shift_size > 0:
      x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
    windows = window_partition(x, self.window_size).view(-1, self.window_size ** 2, c)
    windows = self.attn(windows, mask=self.attn_mask)
    x = window_reverse(windows.view(-1, self.window_size, self.window_size, c), self.window_size,
                       height, width)
    if self.shift_size > 0:
      x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
    return shortcut + self.drop_path(x.reshape(b, height * width, c))

  def mlp_residual(self, x):
    return x + self.drop_path(self.mlp(self.norm2(x)))

  def forward(self, x):
    return self.mlp_residual(self.attention_residual(x))


class PatchMerging(nn.Module):

  def __init__(self, input_resolution, dim):
    super().__init__()
    self.input_resolution = tuple(input_resolution)
    self.dim = dim
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(4 * dim)

  def forward(self, x):
    height, width = self.input_resolution
    b, l, c = x.shape
    x = x.view(b, height, width, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
  """A stage: ``blocks`` (shift 0 / ws//2 alternating) then the optional ``downsample``."""

  block_cls = SwinTransformerBlock

  def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0,
               drop_path=(), downsample=None, **block_kwargs):
    super().__init__()
    drop_path = list(drop_path) or [0.0] * depth
    self.blocks = nn.ModuleList([
        self.block_cls(dim, input_resolution, num_heads, window_size=window_size,
                       shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                       drop_path=drop_path[i], **block_kwargs)
        for i in range(depth)])
    self.downsample = downsample(input_resolution, dim) if downsample is not None else None

  def forward(self, x):
    for blk in self.blocks:
      x = blk(x)
    if self.downsample is not None:
      x = self.downsample(x)
    return x


class TubeletEmbed(nn.Module):
  """``Conv3d(3, D, (es, p, p), stride (es, p, p), bias)`` on rows of ``es`` frames; no LayerNorm."""

  def __init__(self, img_size=224, early_stride=4, patch_size=4, in_chans=3, embed_dim=96):
    super().__init__()
    self.img_size = img_size
    self.early_stride = early_stride
    self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(early_stride, patch_size, patch_size),
                          stride=(early_stride, patch_size, patch_size))

  def forward(self, x):
    _, _, t, h, w = x.shape
    assert t == self.early_stride and h == self.img_size and w == self.img_size
    return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Temporal Swin blocks (SPEC.md 3.7, 3.8).
# ----------------------------------------------------------------------------------------------


def _tokens_to_clip(x, clip_len, resolution):
  """``(N*T', L, C) -> (N, C, T', H', W')`` (logical view)."""
  nt, _, c = x.shape
  return x.transpose(1, 2).reshape(nt // clip_len, clip_len, c, *resolution).transpose(1, 2)


def _clip_to_tokens(x):
  """``(N, C, T', H', W') -> (N*T', L, C)``."""
  n, c, t = x.shape[:3]
  return x.transpose(1, 2).reshape(n * t, c, -1).transpose(1, 2)


def _default_dtf_block(dim, clip_len):
  # The ResNet family's torch DTF reference (SPEC.md 3.2), K = 3 as in every DTF-Swin block.
  from torch_reference.dtf_block import DTFBlock  # noqa: PLC0415
  return DTFBlock(dim, clip_len, kernel_size=3)


class DTFSwinTransformerBlock(SwinTransformerBlock):
  """Swin block + DTF block after the attention residual when ``shift_size == 0``.

  ``dtf_block_factory(dim, clip_len)`` builds the torch DTF block (default:
  ``torch_reference.dtf_block.DTFBlock``); it maps ``(N, C, T, H, W)`` to the same shape with its
  own residual.
  """

  def __init__(self, dim, input_resolution, num_heads, clip_len=4, dtf_block_factory=None,
               **kwargs):
    super().__init__(dim, input_resolution, num_heads, **kwargs)
    self.clip_len = clip_len
    self.conv = nn.Conv2d(dim, dim, kernel_size=[1, 3], padding=[0, 1], bias=False)
    self.dtf_block = (dtf_block_factory or _default_dtf_block)(dim, clip_len)
    nn.init.kaiming_normal_(self.dtf_block.filter_g.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.attention_residual(x)
    if self.shift_size == 0:
      x = _clip_to_tokens(self.dtf_block(_tokens_to_clip(x, self.clip_len, self.input_resolution)))
    return self.mlp_residual(x)


class DefCorFixW(nn.Module):
  """Holds the frozen correlation weight ``(C, T, K, K)`` = 1/C (``requires_grad=False``)."""

  def __init__(self, in_channels, times, kernel_size):
    super().__init__()
    self.kernel_size = kernel_size
    self.weight = nn.Parameter(torch.full((in_channels, times, kernel_size, kernel_size),
                                          1.0 / in_channels), requires_grad=False)

  def forward(self, x):
    """Zero-offset correlation of ``x (N, C, T, H, W)`` -> ``(N, K*K, T, H, W)``."""
    return local_correlation(x, self.weight, self.kernel_size)


class SIFASwinTransformerBlock(SwinTransformerBlock):
  """Swin block + SIFA: ``forward_rtc`` when ``shift_size == 0``, ``forward_vtc`` otherwise."""

  def __init__(self, dim, input_resolution, num_heads, K=3, clip_len=4, **kwargs):
    super().__init__(dim, input_resolution, num_heads, **kwargs)
    self.K = K
    self.clip_len = clip_len
    self.def_cor = DefCorFixW(dim, clip_len, K)
    self.conv = nn.Conv2d(dim, dim, kernel_size=[1, 3], padding=[0, 1], bias=False)
    self.tda_norm = nn.LayerNorm(dim)
    nn.init.constant_(self.tda_norm.weight, 0)
    nn.init.constant_(self.tda_norm.bias, 0)

  def forward_rtc(self, x):
    clip = _tokens_to_clip(x, self.clip_len, self.input_resolution)
    rho = self.def_cor(clip)                       # no softmax (SPEC.md 7.4)
    m = local_aggregation(clip, rho, self.K)
    s = next_frame_or_zero(m)
    return x + self.tda_norm(_clip_to_tokens(s))

  def forward_vtc(self, x):
    nt, l, c = x.shape
    n = nt // self.clip_len
    y = self.conv(x.view(n, self.clip_len, l, c).transpose(1, 3))  # (N, C, L, T') conv over T'
    return y.transpose(1, 3).reshape(nt, l, c)

  def forward(self, x):
    x = self.attention_residual(x)
    if self.shift_size == 0:
      x = self.forward_rtc(x)
    else:
      x = x + self.forward_vtc(x)
    return self.mlp_residual(x)


class DTFBasicLayer(BasicLayer):
  block_cls = DTFSwinTransformerBlock


class SIFABasicLayer(BasicLayer):
  block_cls = SIFASwinTransformerBlock


# ----------------------------------------------------------------------------------------------
# Networks (SPEC.md 4.4).
# ----------------------------------------------------------------------------------------------


class C2D_SWIN_ViT(nn.Module):  # noqa: N801 (the original's name)
  """Tubelet stem -> Swin stages -> LN -> token mean -> dropout -> fc -> mean over tubelets.

  Input ``(N, 3, L, H, W)``, output ``(N, num_classes)``. ``swin_init_stages`` controls whether the
  stage modules get the Swin ``_init_weights`` (True for the plain C2D-Swin; the originals'
  DTF/SIFA-Swin stages are rebuilt afterwards and keep PyTorch's default init).
  """

  layer_cls = BasicLayer

  def __init__(self, img_size=224, early_stride=4, patch_size=4, in_chans=3, num_classes=400,
               embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
               mlp_ratio=4.0, drop_path_rate=0.3, dropout_ratio=0.5, swin_init_stages=None,
               **layer_kwargs):
    super().__init__()
    self.early_stride = early_stride
    self.num_layers = len(depths)
    self.num_features = embed_dim * 2 ** (self.num_layers - 1)
    self.patch_embed = TubeletEmbed(img_size, early_stride, patch_size, in_chans, embed_dim)
    dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
    res = img_size // patch_size
    self.layers = nn.ModuleList()
    for i in range(self.num_layers):
      r = res // 2 ** i
      self.layers.append(self.layer_cls(
          embed_dim * 2 ** i, (r, r), depths[i], num_heads[i], window_size, mlp_ratio,
          drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
          downsample=PatchMerging if i < self.num_layers - 1 else None, **layer_kwargs))
    self.norm = nn.LayerNorm(self.num_features)
    self.drop = nn.Dropout(dropout_ratio)
    self.fc = nn.Linear(self.num_features, num_classes)
    if swin_init_stages is None:
      swin_init_stages = self.layer_cls is BasicLayer
    for name, module in self.named_children():
      if name == "patch_embed" or (name == "layers" and not swin_init_stages):
        continue
      module.apply(self._init_weights)

  @staticmethod
  def _init_weights(m):
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02)
      if m.bias is not None:
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
      nn.init.constant_(m.bias, 0)
      nn.init.constant_(m.weight, 1.0)

  def forward(self, x):
    n, c, length, h, w = x.shape
    t = length // self.early_stride
    x = x.view(n, c, t, self.early_stride, h, w).transpose(1, 2)
    x = x.reshape(n * t, c, self.early_stride, h, w)
    x = self.patch_embed(x)
    for layer in self.layers:
      x = layer(x)
    x = self.norm(x).mean(dim=1)
    x = self.fc(self.drop(x))
    return x.view(n, t, -1).mean(dim=1)


class C2D_DTF_SWIN_ViT(C2D_SWIN_ViT):  # noqa: N801
  """DTF-Swin: every stage uses ``DTFSwinTransformerBlock`` (pass ``clip_len`` = L / 4)."""

  layer_cls = DTFBasicLayer


class C2D_SIFA_SWIN_ViT(C2D_SWIN_ViT):  # noqa: N801
  """SIFA-Swin: every stage uses ``SIFASwinTransformerBlock`` (pass ``clip_len`` and ``K``)."""

  layer_cls = SIFABasicLayer


def count_parameters(model: nn.Module) -> tuple[int, int]:
  """(all parameters incl. frozen, trainable parameters)."""
  total = sum(p.numel() for p in model.parameters())
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return total, trainable

