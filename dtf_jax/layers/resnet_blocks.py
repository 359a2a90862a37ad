"""ResNet bottleneck blocks of the C2D, DTF and SIFA networks (SPEC.md 3.1, 3.3-3.5).

Channels-last: every block maps ``(N, T, H, W, C_in) -> (N, T, H', W', 4*planes)``; convolutions
have temporal kernel 1, so frames never mix except inside the DTF / SIFA operators.

Parameter paths mirror the originals' PyTorch modules: ``conv1``, ``bn1``, ``conv2``, ``bn2``,
``conv3``, ``bn3``, ``downsample/0`` (conv), ``downsample/1`` (BN), ``dtf_blk/...`` (DTF),
``conv_offset``, ``def_cor/weight`` (SIFA), ``fc1``, ``fc2`` (GBottleneck). Conv kernels are
``(kt, kh, kw, in, out)``; every conv uses Kaiming-normal fan-out init (SPEC 4.6), every Linear the
PyTorch default.

Common keyword arguments of the blocks:
  bn_group_size: per-device batch of the originals' BatchNorm (``common.BatchNorm.group_size``).
  zero_init_residual: initialise ``bn3``'s scale to 0 (the residual branch starts as zero).
  dtype: compute dtype of the convolutions (``None`` = float32); parameters stay float32, BatchNorm
    statistics are float32, and every block returns its input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax import ops
from dtf_jax.layers import common
from dtf_jax.layers.dtf_block import DTFBlock

Array = jax.Array

EXPANSION = 4
SIFA_PREV_FRAME_MODES = ("shift", "first")


def conv1x1x1(in_features: int, out_features: int, stride: int = 1, *, dtype=None,
              rngs: nnx.Rngs) -> nnx.Conv:
  """Conv3d kernel (1,1,1), stride (1,s,s), no bias, Kaiming fan-out init."""
  return common.conv3d(in_features, out_features, (1, 1, 1), strides=(1, stride, stride),
                       kernel_init=common.kaiming_normal_fan_out(), dtype=dtype, rngs=rngs)


def conv1x3x3(in_features: int, out_features: int, stride: int = 1, *, dtype=None,
              rngs: nnx.Rngs) -> nnx.Conv:
  """Conv3d kernel (1,3,3), stride (1,s,s), padding (0,1,1), no bias, Kaiming fan-out init."""
  return common.conv3d(in_features, out_features, (1, 3, 3), strides=(1, stride, stride),
                       padding=(0, 1, 1), kernel_init=common.kaiming_normal_fan_out(), dtype=dtype,
                       rngs=rngs)


def shift_to_previous(x: Array, mode: str = "shift") -> Array:
  """"Previous frame" of every frame along axis 1 (SPEC 2.6 forward shift).

  ``mode='shift'`` (intended): ``q_t = x_{t-1}`` for ``t >= 1``, ``q_0 = x_0``.
  ``mode='first'`` (what the original computed on CPU): ``q_t = x_0`` for every t.
  """
  if mode == "shift":
    return jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  if mode == "first":
    return jnp.broadcast_to(x[:, :1], x.shape)
  raise ValueError(f"sifa_prev_frame must be one of {SIFA_PREV_FRAME_MODES}, got {mode!r}")


def shift_from_next(x: Array) -> Array:
  """"Next frame" along axis 1 with a zero last frame (SPEC 2.6 backward shift + mask)."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


class Bottleneck(nnx.Module):
  """torchvision-v1.5 bottleneck (stride on the 3x3), expansion 4 (SPEC 3.1).

  ``relu(bn1(conv1 x))`` -> ``relu(bn2(conv2 .))`` -> ``bn3(conv3 .)``; ``relu(. + shortcut(x))``.
  ``downsample`` = ``[conv1x1x1(in, 4*planes, stride), BatchNorm]`` when ``stride != 1`` or
  ``in != 4*planes``, else identity.

  Args:
    inplanes: input channels.
    planes: bottleneck width (output channels ``4*planes``).
    stride: spatial stride of ``conv2`` and the shortcut.
  """

  def __init__(
      self,
      inplanes: int,
      planes: int,
      *,
      stride: int = 1,
      zero_init_residual: bool = False,
      bn_group_size: int | None = None,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    self.inplanes, self.planes, self.stride = inplanes, planes, stride
    width, out = planes, planes * EXPANSION
    bn = lambda c, **kw: common.BatchNorm(c, group_size=bn_group_size, **kw)
    self.conv1 = conv1x1x1(inplanes, width, dtype=dtype, rngs=rngs)
    self.bn1 = bn(width)
    self.conv2 = conv1x3x3(width, width, stride, dtype=dtype, rngs=rngs)
    self.bn2 = bn(width)
    self.conv3 = conv1x1x1(width, out, dtype=dtype, rngs=rngs)
    self.bn3 = bn(out, scale_init=0.0 if zero_init_residual else 1.0)
    if stride != 1 or inplanes != out:
      self.downsample = nnx.List([conv1x1x1(inplanes, out, stride, dtype=dtype, rngs=rngs), bn(out)])
    else:
      self.downsample = None

  def shortcut(self, x: Array) -> Array:
    if self.downsample is None:
      return x
    conv, bn = self.downsample
    return bn(conv(x))

  def _check_input(self, x: Array) -> None:
    if x.ndim != 5 or x.shape[-1] != self.inplanes:
      raise ValueError(
          f"{type(self).__name__} expects input (N, T, H, W, {self.inplanes}), got shape {x.shape}")

  def branch_out(self, x: Array) -> Array:
    """``relu(bn2(conv2(relu(bn1(conv1 x)))))`` (overridden by the DTF bottleneck)."""
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    return jax.nn.relu(self.bn2(self.conv2(out)))

  def __call__(self, x: Array) -> Array:
    self._check_input(x)
    out = self.bn3(self.conv3(self.branch_out(x)))
    return jax.nn.relu(out + self.shortcut(x))


class DTFBottleneck(Bottleneck):
  """Bottleneck with a DTF block on the raw ``conv2`` output, before ``bn2`` (SPEC 3.3).

  ``out = relu(bn2(dtf_blk(conv2(relu(bn1(conv1 x))))))``, then as ``Bottleneck``.

  Args (beyond ``Bottleneck``):
    clip_len: frames T of the block input (``dtf_blk`` is built for it).
    kernel_impl: ``'auto' | 'xla' | 'pallas'`` for the DTF ops.
  """

  def __init__(
      self,
      inplanes: int,
      planes: int,
      *,
      clip_len: int,
      stride: int = 1,
      zero_init_residual: bool = False,
      kernel_impl: str = "auto",
      bn_group_size: int | None = None,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    super().__init__(inplanes, planes, stride=stride, zero_init_residual=zero_init_residual,
                     bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)
    self.clip_len = clip_len
    self.dtf_blk = DTFBlock(planes, clip_len, kernel_impl=kernel_impl, bn_group_size=bn_group_size,
                            dtype=dtype, rngs=rngs)

  def branch_out(self, x: Array) -> Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = self.dtf_blk(self.conv2(out))
    return jax.nn.relu(self.bn2(out))


class GBottleneck(Bottleneck):
  """Bottleneck with a global-context excitation added to the residual sum (SPEC 3.5).

  ``b = bn3(conv3(.))``; ``c = fc2(relu(fc1(mean_{T,H,W} b)))``; ``relu(b + shortcut(x) + c)``.
  ``fc1: 4p -> 4p//16``, ``fc2: 4p//16 -> 4p`` with biases (PyTorch default init). The excitation
  is computed in float32.
  """

  def __init__(
      self,
      inplanes: int,
      planes: int,
      *,
      stride: int = 1,
      zero_init_residual: bool = False,
      bn_group_size: int | None = None,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    out = planes * EXPANSION
    if out // 16 < 1:
      raise ValueError(
          f"GBottleneck needs 4*planes >= 16 (fc1 has 4*planes//16 outputs), got planes={planes}")
    super().__init__(inplanes, planes, stride=stride, zero_init_residual=zero_init_residual,
                     bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)
    self.fc1 = common.linear(out, out // 16, rngs=rngs)
    self.fc2 = common.linear(out // 16, out, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    self._check_input(x)
    b = self.bn3(self.conv3(self.branch_out(x)))
    pooled = jnp.mean(b.astype(jnp.float32), axis=(1, 2, 3))  # (N, 4p)
    context = self.fc2(jax.nn.relu(self.fc1(pooled)))
    out = b.astype(jnp.float32) + self.shortcut(x).astype(jnp.float32) + context[:, None, None, None, :]
    return jax.nn.relu(out).astype(x.dtype)


class FixedCorrelationWeight(nnx.Module):
  """Holder of a frozen correlation weight at ``<path>/weight`` (the originals' ``DefCorFixW``).

  ``weight``: ``FrozenParam (T, K, K, C)`` = 1/C (PyTorch ``(C, T, K, K)``).
  """

  def __init__(self, channels: int, clip_len: int, kernel_size: int):
    self.weight = common.FrozenParam(
        jnp.full((clip_len, kernel_size, kernel_size, channels), 1.0 / channels, jnp.float32))

  def __call__(self) -> Array:
    return jax.lax.stop_gradient(self.weight[...])


class DEFLocalTransBottleneck(Bottleneck):
  """SIFA bottleneck: stand-alone inter-frame attention on the ``bn2`` output (SPEC 3.4).

  With ``o = relu(bn2(conv2(relu(bn1(conv1 x)))))`` ``(N, T, H, W, w)``:
  ``q`` = previous frame of ``o``; ``g = sigmoid(o - q)*o + o``; offsets ``conv_offset(g)``
  (``2*K*K`` channels, ``(dy_k, dx_k)`` interleaved); ``rho`` = deformable correlation of ``o``'s
  previous frame with ``o`` at the deformed taps; ``m`` = deformable aggregation of ``o`` weighted by
  ``rho`` (no softmax); ``o' = o + next-frame(m)``; ``relu(bn3(conv3 o') + shortcut(x))``.

  Args (beyond ``Bottleneck``):
    clip_len: frames T of the block input (``def_cor/weight`` is ``(T, K, K, w)``).
    kernel_size: K of the deformable window (3 in the released networks).
    sifa_prev_frame: ``'shift'`` (intended ``q_t = o_{t-1}``, default) or ``'first'``
      (``q_t = o_0``, what the original computed on CPU; SPEC 2.6 / 7.1).
    offset_zero_init: initialise ``conv_offset`` to zero (the block's own intent) instead of
      Kaiming fan-out (what the original network init actually leaves; default, SPEC 7.2).
    kernel_impl: ``'auto' | 'xla' | 'pallas'`` for the SIFA ops.

  The deformable sampling positions are computed in float32 whatever ``dtype``.
  """

  def __init__(
      self,
      inplanes: int,
      planes: int,
      *,
      clip_len: int,
      stride: int = 1,
      kernel_size: int = 3,
      sifa_prev_frame: str = "shift",
      offset_zero_init: bool = False,
      zero_init_residual: bool = False,
      kernel_impl: str = "auto",
      bn_group_size: int | None = None,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    if sifa_prev_frame not in SIFA_PREV_FRAME_MODES:
      raise ValueError(f"sifa_prev_frame must be one of {SIFA_PREV_FRAME_MODES}, got {sifa_prev_frame!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
      raise ValueError(
          f"DEFLocalTransBottleneck kernel_size must be a positive odd integer, got {kernel_size}")
    super().__init__(inplanes, planes, stride=stride, zero_init_residual=zero_init_residual,
                     bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)
    width = planes
    self.clip_len = clip_len
    self.kernel_size = kernel_size
    self.sifa_prev_frame = sifa_prev_frame
    self.kernel_impl = kernel_impl
    pad = kernel_size // 2
    self.conv_offset = common.conv3d(
        width, 2 * kernel_size * kernel_size, (1, kernel_size, kernel_size), padding=(0, pad, pad),
        kernel_init=(nnx.initializers.zeros_init() if offset_zero_init
                     else common.kaiming_normal_fan_out()),
        dtype=dtype, rngs=rngs)
    self.def_cor = FixedCorrelationWeight(width, clip_len, kernel_size)

  def inter_frame_attention(self, o: Array) -> Array:
    """``o (N, T, H, W, w) -> o + next-frame(m)`` (steps 1-5 of SPEC 3.4), in ``o.dtype``."""
    n, t, h, w, c = o.shape
    if t != self.clip_len:
      raise ValueError(
          f"DEFLocalTransBottleneck built for clip_len={self.clip_len} got {t} frames (input {o.shape}); "
          "the clip length after the stem must equal the block's clip_len")
    taps = self.kernel_size * self.kernel_size
    prev = shift_to_previous(o, self.sifa_prev_frame)
    gated = jax.nn.sigmoid(o - prev) * o + o
    offsets = self.conv_offset(gated).astype(jnp.float32).reshape(n, t, h, w, taps, 2)
    weight = self.def_cor()
    corr = ops.deformable_correlation(
        o, offsets, weight, kernel_size=self.kernel_size, dilation=1, groups=1, impl=self.kernel_impl)
    agg = ops.deformable_aggregation(
        o, offsets, corr, kernel_size=self.kernel_size, dilation=1, impl=self.kernel_impl)
    return (o + shift_from_next(agg.astype(o.dtype))).astype(o.dtype)

  def __call__(self, x: Array) -> Array:
    self._check_input(x)
    out = self.inter_frame_attention(self.branch_out(x))
    out = self.bn3(self.conv3(out))
    return jax.nn.relu(out + self.shortcut(x))
