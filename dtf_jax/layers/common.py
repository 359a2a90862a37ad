"""Shared building blocks with PyTorch semantics (init, BatchNorm statistics, DropPath).

Layout: channels-last everywhere, features ``(N, T, H, W, C)``. Parameter names follow Flax
(`kernel`, `bias`, `scale`, `mean`, `var`); the module *paths* mirror the originals' PyTorch module
paths so that checkpoint conversion is a rename + transpose (SPEC.md 1.2).

Variable types:
  * ``nnx.Param``: trained parameters.
  * ``FrozenParam``: the originals' ``requires_grad=False`` parameters (``weights_cor``,
    ``def_cor.weight``). Saved and loaded with the model, counted as parameters, never optimised.
  * ``nnx.BatchStat``: BatchNorm running statistics and ``num_batches_tracked``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array


class FrozenParam(nnx.Variable):
  """A checkpointed parameter that is never trained (PyTorch ``requires_grad=False``).

  Not a subclass of ``nnx.Param``, so optimisers built on ``nnx.Param`` skip it. Modules read it
  through ``jax.lax.stop_gradient``.
  """


# ----------------------------------------------------------------------------------------------
# Initialisers matching PyTorch.
# ----------------------------------------------------------------------------------------------

def _kernel_fans(shape) -> tuple[int, int]:
  """``(fan_in, fan_out)`` of a Flax kernel ``(*receptive, in, out)`` (PyTorch's fans)."""
  receptive = math.prod(shape[:-2])
  return shape[-2] * receptive, shape[-1] * receptive


# The samplers below draw a flat vector and reshape it: the same distribution as drawing the shape
# directly, but XLA:CPU compiles the threefry generator for a rank-4/5 shape 10-20x slower than for
# a rank-1 one (measured: ~8 s vs ~0.5 s per distinct conv-kernel shape), which dominates eager
# model construction on CPU.

def _flat_normal(key, shape, dtype, stddev):
  return (jax.random.normal(key, (math.prod(shape),), dtype) * stddev).reshape(shape)


def _flat_uniform(key, shape, dtype, bound):
  return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)


def torch_default_kernel_init():
  """PyTorch's default Linear/Conv weight init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  (``kaiming_uniform_(a=sqrt(5))``.) Flax kernels are ``(..., in, out)`` so fan_in = in * receptive.
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in, _ = _kernel_fans(shape)
    return _flat_uniform(key, shape, dtype, 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)

  return init


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return _flat_uniform(key, shape, dtype, bound)

  return init


def kaiming_normal_fan_out():
  """``nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu')``: N(0, 2/(O*prod(kernel)))."""

  def init(key, shape, dtype=jnp.float32):
    _, fan_out = _kernel_fans(shape)
    return _flat_normal(key, shape, dtype, math.sqrt(2.0 / fan_out) if fan_out > 0 else 0.0)

  return init


def normal_init(stddev: float):
  """Untruncated normal (PyTorch ``trunc_normal_(std=0.02)`` cuts at +-2 absolute: effectively none)."""

  def init(key, shape, dtype=jnp.float32):
    return _flat_normal(key, shape, dtype, stddev)

  return init


# ----------------------------------------------------------------------------------------------
# XLA scheduling hints.
# ----------------------------------------------------------------------------------------------

@jax.custom_vjp
def materialized_cotangent(x: Array) -> Array:
  """Identity whose gradient is materialised (an ``optimization_barrier`` on the cotangent).

  XLA:CPU fuses long elementwise chains of a backward pass (e.g. a residual stream's gradient
  summed over many blocks, or a normalisation's backward) into *every* consumer, including the
  transposing copies that feed weight-gradient matmuls, and then recomputes the whole chain per
  consumer in a cache-hostile transposed order. Measured on Swin-S: 43% of a training step. The
  barrier makes the cotangent a buffer computed once; the forward is untouched.
  """
  return x


def _materialized_cotangent_fwd(x):
  return x, None


def _materialized_cotangent_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


materialized_cotangent.defvjp(_materialized_cotangent_fwd, _materialized_cotangent_bwd)


def row_major_swap(x: Array) -> Array:
  """``x`` with its last two axes swapped, materialised as a row-major array.

  XLA:CPU hands a dot to YNNPACK only when both operands are row-major in the dot's own terms
  (lhs contracting on its last axis, rhs on its first); left alone, XLA folds a transpose into the
  dot's dimension numbers and the dot falls back to the slower Eigen kernel. The optimisation
  barrier keeps the transposed copy, so the dot that reads it runs in YNNPACK.
  """
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


# ----------------------------------------------------------------------------------------------
# Convolutions and linear layers.
# ----------------------------------------------------------------------------------------------

_NDHWC = ("NDHWC", "DHWIO", "NDHWC")

# Name of the outputs of spatial (k > 1) convolutions in ``fast_conv3d`` (``jax.ad_checkpoint``).
SPATIAL_CONV_OUTPUT = "spatial_conv_output"

# Rematerialisation policies by name (``remat=`` of the ResNet builders). 'full' recomputes the
# whole block in the backward pass; 'spatial_convs' keeps the outputs of the k x k convolutions
# (the costly ones to recompute) and recomputes the 1x1 convolutions (plain matmuls), BatchNorm,
# ReLU and the residual sums from them.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "spatial_convs": jax.checkpoint_policies.save_only_these_names(SPATIAL_CONV_OUTPUT),
}


def remat_policy(remat: bool | str):
  """``(enabled, policy)`` for a model's ``remat`` option: ``False``, ``True`` (= 'full') or a
  name in ``REMAT_POLICIES``."""
  if remat is False:
    return False, None
  if remat is True:
    remat = "full"
  if not isinstance(remat, str) or remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be False, True or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  return True, REMAT_POLICIES[remat]


def _pairs(values, n):
  return tuple((1,) * n if values is None else tuple(values))


def _same_conv2d(x: Array, kernel: Array, strides: tuple[int, int], precision) -> Array:
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(
      x, kernel, strides, ((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def small_map_conv2d(x: Array, kernel: Array, precision=None, strides: tuple[int, int] = (1, 1)) -> Array:
  """'Same'-padded 2-D conv (odd kernel, padding k//2) whose backward is one matmul pair per tap.

  ``x (N, H, W, C)``, ``kernel (kh, kw, C, O)`` -> ``(N, H', W', O)`` with ``H' = ceil(H / sh)``;
  same values as ``lax.conv_general_dilated``. Meant for small feature maps with many channels
  (ResNet layer4, including its first, strided block, and SIFA's dual branch at 112-224 px: 4x4 to
  14x14 positions, 512 channels): there XLA:CPU's backward convolutions first re-lay the whole
  ``(kh, kw, C, O)`` kernel (a 9 MiB transpose that runs at ~1-2 GB/s, as long as the
  convolution itself) and run the input gradient at 70-105 GFLOP/s. Here
  ``dx = sum_k place_k(dy @ W_k^T)`` and ``dW_k = window_k(x)^T @ dy`` contract the stored kernel
  planes directly (``benchmarks/README.md``: 1.3-1.8x faster backward at these shapes);
  ``window_k`` reads the input positions tap k meets (every ``s``-th one for stride ``s``) and
  ``place_k`` is its transpose. The forward is XLA's convolution.
  """
  return _same_conv2d(x, kernel, strides, precision)


def _small_map_conv2d_fwd(x, kernel, precision, strides):
  return _same_conv2d(x, kernel, strides, precision), (x, kernel)


def _small_map_conv2d_bwd(precision, strides, residuals, g):
  x, kernel = residuals
  _, h, w, c = x.shape
  _, ho, wo, cout = g.shape
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  ph, pw = kh // 2, kw // 2
  x_padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  g_rows = g.reshape(-1, cout)
  dx, d_kernel = None, []
  for i in range(kh):
    for j in range(kw):
      # Output p reads padded input s*p + (i, j): tap (i, j)'s input window, every s-th position.
      x_window = x_padded[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      d_kernel.append(jax.lax.dot_general(x_window.reshape(-1, c), g_rows, (((0,), (0,)), ((), ())),
                                          precision=precision))  # x^T @ dy
      # dy @ W_ij^T goes back to those padded positions (interior padding s - 1 between them).
      term = jax.lax.dot_general(g, kernel[i, j], (((3,), (1,)), ((), ())), precision=precision)
      term = jax.lax.pad(term, jnp.zeros((), term.dtype), (
          (0, 0, 0), (i, h + 2 * ph - i - sh * (ho - 1) - 1, sh - 1),
          (j, w + 2 * pw - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
      dx = term if dx is None else dx + term
  dx = dx[:, ph:ph + h, pw:pw + w]  # drop the padding
  d_kernel = jnp.stack(d_kernel).reshape(kernel.shape)
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


small_map_conv2d.defvjp(_small_map_conv2d_fwd, _small_map_conv2d_bwd)


def _uses_small_map_conv(positions: int, kernel_hw: tuple[int, int], strides: tuple[int, int],
                         padding, cout: int, feature_group_count: int,
                         preferred_element_type) -> bool:
  """Whether ``fast_conv3d`` routes a (1, kh, kw) conv through ``small_map_conv2d``.

  ``positions``: output positions N*T*H'*W' of the convolution."""
  kh, kw = kernel_hw
  same = kh % 2 == 1 and kw % 2 == 1 and tuple(map(tuple, padding)) == (
      (kh // 2, kh // 2), (kw // 2, kw // 2))
  return (same and (kh, kw) != (1, 1) and feature_group_count == 1
          and preferred_element_type is None and positions <= cout)


def fast_conv3d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None,
                preferred_element_type=None, **kwargs):
  """``lax.conv_general_dilated`` for channels-last 3-D convolutions, routed to faster forms.

  Same arguments and result as ``jax.lax.conv_general_dilated`` (``nnx.Conv`` calls it through its
  ``conv_general_dilated`` hook, so parameters are untouched). XLA:CPU runs 3-D convolutions and
  their filter gradients far slower than 2-D ones or matmuls (measured 3x for a (1,3,3) conv and
  its backward), so exact rewrites are used where they apply:

  * temporal kernel 1, stride 1, no temporal padding (every C2D/DTF/SIFA ResNet conv): frames are
    folded into the batch and the conv is 2-D; a 1x1 kernel without padding becomes a matmul over
    channels (after subsampling for a spatial stride, as the strided 1x1 conv does);
  * temporal kernel == temporal stride, no temporal padding (the ResNet stem (4,7,7)/(4,2,2), the
    Swin tubelet (4,4,4)/(4,4,4)): the non-overlapping frame groups are folded into the channels
    and the conv is 2-D (a matmul when the spatial kernel also equals its stride).

  Everything else (dilation, grouped 3-D kernels, other layouts) goes to the general conv.

  The output of a convolution whose kernel is larger than 1 in any spatial/temporal axis is named
  ``SPATIAL_CONV_OUTPUT`` for the 'spatial_convs' rematerialisation policy.
  """
  y = _route_conv3d(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, precision, preferred_element_type,
                    **kwargs)
  if rhs.ndim >= 3 and any(k > 1 for k in rhs.shape[:-2]):
    y = checkpoint_name(y, SPATIAL_CONV_OUTPUT)
  return y


def _route_conv3d(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, precision, preferred_element_type, **kwargs):
  nd = lhs.ndim
  general = lambda: jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  if nd != 5 or rhs.ndim != 5 or any(v is not None for v in kwargs.values()):
    return general()
  if dimension_numbers != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NDHWC):
    return general()
  if isinstance(padding, str):
    if padding != "VALID":
      return general()
    padding = ((0, 0),) * 3
  padding = tuple(tuple(p) for p in padding)
  strides = _pairs(window_strides, 3)
  if _pairs(lhs_dilation, 3) != (1, 1, 1) or _pairs(rhs_dilation, 3) != (1, 1, 1):
    return general()
  kt, kh, kw, cin, cout = rhs.shape
  st, sh, sw = strides
  if padding[0] != (0, 0):
    return general()
  n, t, h, w, c = lhs.shape
  dot_kwargs = dict(precision=precision, preferred_element_type=preferred_element_type)

  def conv2d(x, kernel, groups):
    return jax.lax.conv_general_dilated(
        x, kernel, (sh, sw), padding[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, **dot_kwargs)

  if kt == 1 and st == 1:
    if (kh, kw) == (1, 1) and padding[1:] == ((0, 0), (0, 0)) and feature_group_count == 1:
      x = lhs[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else lhs
      y = jnp.dot(x.reshape(-1, c), rhs.reshape(cin, cout), **dot_kwargs)
      return y.reshape(x.shape[:-1] + (cout,))
    out_positions = n * t * (-(-h // sh)) * (-(-w // sw))
    if _uses_small_map_conv(out_positions, (kh, kw), (sh, sw), padding[1:], cout,
                            feature_group_count, preferred_element_type):
      y = small_map_conv2d(lhs.reshape(n * t, h, w, c), rhs[0], precision, (sh, sw))
    else:
      y = conv2d(lhs.reshape(n * t, h, w, c), rhs[0], feature_group_count)
    return y.reshape((n, t) + y.shape[1:])
  if kt == st and feature_group_count == 1:
    frames = t // kt
    x = lhs[:, :frames * kt].reshape(n * frames, kt, h, w, c)
    # channel index = tap * C + c. A concatenation, not a transpose: XLA:CPU moves the few-channel
    # (RGB) frames ~10x faster this way.
    x = jnp.concatenate([x[:, k] for k in range(kt)], axis=-1)  # (N*frames, H, W, kt*C)
    kernel = jnp.moveaxis(rhs, 0, 2).reshape(kh, kw, kt * cin, cout)
    if (kh, kw) == (sh, sw) and padding[1:] == ((0, 0), (0, 0)) and h % kh == 0 and w % kw == 0:
      patches = x.reshape(n * frames, h // kh, kh, w // kw, kw, kt * c)
      patches = jnp.swapaxes(patches, 2, 3).reshape(n * frames, h // kh, w // kw, -1)
      y = jnp.dot(patches, kernel.reshape(-1, cout), **dot_kwargs)
    else:
      y = conv2d(x, kernel, 1)
    return y.reshape((n, frames) + y.shape[1:])
  return general()


def conv3d(
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int],
    *,
    strides: Sequence[int] = (1, 1, 1),
    padding: Sequence[int] = (0, 0, 0),
    dilation: Sequence[int] = (1, 1, 1),
    groups: int = 1,
    use_bias: bool = False,
    kernel_init=None,
    dtype=None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """A PyTorch ``Conv3d`` on channels-last ``(N, T, H, W, C)`` input.

  ``padding`` is the symmetric PyTorch padding per axis (T, H, W). Kernel layout
  ``(kt, kh, kw, in/groups, out)``. Default init is PyTorch's default (override with kernel_init).
  The convolution runs through ``fast_conv3d`` (2-D convs / matmuls where that is exact).
  """
  fan_in = (in_features // groups) * math.prod(kernel_size)
  return nnx.Conv(
      in_features,
      out_features,
      tuple(kernel_size),
      strides=tuple(strides),
      padding=[(p, p) for p in padding],
      kernel_dilation=tuple(dilation),
      feature_group_count=groups,
      use_bias=use_bias,
      kernel_init=kernel_init or torch_default_kernel_init(),
      bias_init=torch_default_bias_init(fan_in),
      dtype=dtype,
      conv_general_dilated=fast_conv3d,
      rngs=rngs,
  )


def _contract_last(x: Array, kernel: Array, precision) -> Array:
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_last_axis(x: Array, kernel: Array, precision=None) -> Array:
  """``x @ kernel`` over the last axis of ``x``: ``(..., I) x (I, O) -> (..., O)``.

  Same value as ``lax.dot_general``; the backward computes the kernel gradient from a row-major
  transposed copy of the narrower of ``x`` and the output gradient ``g``: ``x^T @ g`` for
  ``I <= O``, ``(g^T @ x)^T`` otherwise. Autodiff leaves that product with both operands
  contracted over their leading (row) axis, which XLA:CPU runs in Eigen; the explicit transpose
  (``row_major_swap``, one pass over the narrower array) lets YNNPACK run it. DTF-Swin-S training
  step ~9% faster in all (A/B in one process, benchmarks/README.md).
  """
  return _contract_last(x, kernel, precision)


def _matmul_last_axis_fwd(x, kernel, precision):
  return _contract_last(x, kernel, precision), (x, kernel)


def _matmul_last_axis_bwd(precision, residuals, g):
  x, kernel = residuals
  rows = x.reshape(-1, x.shape[-1])
  g_rows = g.reshape(-1, g.shape[-1])
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  if rows.shape[1] <= g_rows.shape[1]:  # x^T (I, rows) @ g
    dkernel = jax.lax.dot_general(row_major_swap(rows), g_rows, (((1,), (0,)), ((), ())),
                                  precision=precision)
  else:  # (g^T (O, rows) @ x)^T
    dkernel = jax.lax.dot_general(row_major_swap(g_rows), rows, (((1,), (0,)), ((), ())),
                                  precision=precision).T
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul_last_axis.defvjp(_matmul_last_axis_fwd, _matmul_last_axis_bwd)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       out_sharding=None):
  """``dot_general`` for ``nnx.Linear``: ``matmul_last_axis`` for its one contraction pattern.

  Anything else (batch dimensions, another contraction, a preferred element type or an output
  sharding) goes to ``lax.dot_general`` unchanged.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
      and not lhs_batch and not rhs_batch and preferred_element_type is None
      and out_sharding is None and lhs.dtype == rhs.dtype):
    return matmul_last_axis(lhs, rhs, precision)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type,
                             out_sharding=out_sharding)


def linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    kernel_init=None,
    bias_init=None,
    dtype=None,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """A PyTorch ``nn.Linear`` (default init unless overridden); kernel ``(in, out)``.

  Its matmul is ``linear_dot_general`` (same values, a faster weight gradient on XLA:CPU).
  """
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dot_general=linear_dot_general,
      kernel_init=kernel_init or torch_default_kernel_init(),
      bias_init=bias_init or torch_default_bias_init(in_features),
      dtype=dtype,
      rngs=rngs,
  )


def _layer_norm_forward(x, scale, bias, epsilon):
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  return (xf - mean) * (inv * scale) + bias, mean, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_last_axis(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
  """``(x - mean) * rsqrt(var + eps) * scale + bias`` over the last axis (two-pass variance).

  Statistics and the result in ``promote_types(x.dtype, float32)``. The backward recomputes the
  normalised input from ``x`` and the per-row statistics (closed form, like ``batch_norm_train``),
  so no normalised copy or broadcast scale is kept alive until the backward pass.
  """
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  y, mean, inv = _layer_norm_forward(x, scale, bias, epsilon)
  return y, (x, scale, mean, inv)


def _layer_norm_bwd(epsilon, residuals, g):
  del epsilon
  (x, scale, mean, inv), g = jax.lax.optimization_barrier((residuals, g))
  dtype = mean.dtype
  xhat = (x.astype(dtype) - mean) * inv
  g = g.astype(dtype)
  lead = tuple(range(x.ndim - 1))
  dscale = jnp.sum(g * xhat, axis=lead).astype(scale.dtype)
  dbias = jnp.sum(g, axis=lead).astype(scale.dtype)
  dxhat = g * scale
  dx = inv * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
              - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale, dbias


layer_norm_last_axis.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
  """``nnx.LayerNorm`` (same parameters, attributes and values) with ``layer_norm_last_axis``.

  The plain last-axis case with scale and bias and the two-pass variance
  (``use_fast_variance = False``, as PyTorch) runs through the custom-VJP function; every other
  configuration falls back to ``nnx.LayerNorm``.
  """

  def __call__(self, x, *, mask=None):
    plain = (mask is None and not self.use_fast_variance and self.axis_name is None
             and self.scale is not None and self.bias is not None
             and tuple(np.atleast_1d(self.reduction_axes)) == (-1,)
             and tuple(np.atleast_1d(self.feature_axes)) == (-1,))
    if not plain:
      return super().__call__(x, mask=mask)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    out_dtype = jnp.result_type(x, scale, bias) if self.dtype is None else self.dtype
    return layer_norm_last_axis(x, scale, bias, self.epsilon).astype(out_dtype)


def layer_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """PyTorch ``nn.LayerNorm`` (eps 1e-5, weight 1, bias 0). Statistics are computed in float32.

  Returns a ``LayerNorm`` (an ``nnx.LayerNorm`` with a leaner backward once
  ``use_fast_variance`` is turned off, as ``swin_layer_norm`` does).
  """
  return LayerNorm(num_features, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Activations.
# ----------------------------------------------------------------------------------------------

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_exact(x: Array) -> Array:
  """PyTorch's default (exact, erf) GELU ``x * Phi(x)`` = ``jax.nn.gelu(x, approximate=False)``.

  Same value as ``jax.nn.gelu``; the backward ``g * (Phi(x) + x * phi(x))`` is recomputed from the
  saved input, so only ``x`` is kept for it (autodiff of the erfc formula kept two extra
  activation-sized intermediates per MLP alive until the backward pass: ~140 MB in Swin-S).
  """
  return 0.5 * x * jax.lax.erfc(-x * jnp.asarray(_SQRT_HALF, x.dtype))


def _gelu_fwd(x):
  return gelu_exact(x), x


def _gelu_cdf(xf: Array) -> Array:
  """``Phi(x)``, the standard normal CDF, of a float32 (or float64) array."""
  return 0.5 * jax.lax.erfc(-xf * _SQRT_HALF)


def _gelu_derivative(xf: Array, cdf: Array) -> Array:
  """``d gelu / dx = Phi(x) + x * phi(x)`` given ``cdf = Phi(x)``."""
  return cdf + xf * (jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI)


def _gelu_bwd(x, g):
  x, g = jax.lax.optimization_barrier((x, g))  # recompute here, do not keep forward values
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  return ((g.astype(dtype) * _gelu_derivative(xf, _gelu_cdf(xf))).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gelu_matmul_last_axis(h: Array, kernel: Array, precision=None) -> Array:
  """``gelu_exact(h) @ kernel`` over the last axis: ``(..., I) x (I, O) -> (..., O)``.

  The second half of a transformer MLP (GELU, then ``fc2``'s matmul) with a backward that keeps
  only ``h`` (and the kernel): the GELU output, which the kernel gradient needs, is recomputed
  from ``h`` in the backward pass together with the GELU derivative (one erfc evaluation for
  both). Separately, ``gelu_exact`` kept ``h`` and the matmul kept ``gelu(h)``: two
  activation-sized arrays per MLP alive until the backward, ~125 MB of a Swin-S training step's
  ~750 MB temporary buffer at the benchmark size (benchmarks/README.md). Same value as
  ``matmul_last_axis(gelu_exact(h), kernel)``; the kernel gradient runs through the same
  row-major product as ``matmul_last_axis``.
  """
  return _contract_last(gelu_exact(h), kernel, precision)


def _gelu_matmul_fwd(h, kernel, precision):
  return gelu_matmul_last_axis(h, kernel, precision), (h, kernel)


def _gelu_matmul_bwd(precision, residuals, g):
  # Tied to the cotangent so that the GELU is recomputed here, not kept (or CSE'd) from the forward.
  (h, kernel), g = jax.lax.optimization_barrier((residuals, g))
  hf = h.astype(jnp.promote_types(h.dtype, jnp.float32))
  # Phi(h) materialised once, shared by the recomputed GELU and its derivative (XLA would
  # otherwise evaluate the erfc polynomial once in each of their fusions).
  cdf = jax.lax.optimization_barrier(_gelu_cdf(hf))
  activation = (hf * cdf).astype(h.dtype)
  d_activation, dkernel = _matmul_last_axis_bwd(precision, (activation, kernel), g)
  dh = d_activation.astype(hf.dtype) * _gelu_derivative(hf, cdf)
  return dh.astype(h.dtype), dkernel


gelu_matmul_last_axis.defvjp(_gelu_matmul_fwd, _gelu_matmul_bwd)


def gelu_then_linear(h: Array, linear_layer: nnx.Linear) -> Array:
  """``linear_layer(gelu_exact(h))`` through ``gelu_matmul_last_axis`` where the layer allows.

  The layer's dtype promotion, precision and bias apply as in ``nnx.Linear``; a layer with a
  ``preferred_element_type`` or another ``dot_general`` than ``linear_dot_general`` (or a dtype
  promotion that would change ``h``'s dtype) is called on ``gelu_exact(h)`` unchanged.
  """
  layer = linear_layer
  bias = layer.bias[...] if layer.bias is not None else None
  x, kernel, bias = layer.promote_dtype((h, layer.kernel[...], bias), dtype=layer.dtype)
  if (layer.dot_general is not linear_dot_general or layer.preferred_element_type is not None
      or x.dtype != h.dtype):
    return layer(gelu_exact(h))
  y = gelu_matmul_last_axis(x, kernel, layer.precision)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


# ----------------------------------------------------------------------------------------------
# Pooling.
# ----------------------------------------------------------------------------------------------

def _pool_windows(x: Array) -> list[Array]:
  """The 9 taps of the 3x3 / stride-2 / pad-1 windows over axes (-3, -2), -inf padded.

  Returns 9 arrays ``(..., ceil(H/2), ceil(W/2), C)``; tap ``kh*3 + kw`` of window ``(a, b)`` is
  ``x[2a - 1 + kh, 2b - 1 + kw]``.
  """
  height, width = x.shape[-3], x.shape[-2]
  out_h, out_w = (height + 1) // 2, (width + 1) // 2
  pad = [(0, 0)] * (x.ndim - 3) + [(1, 2 * out_h - height), (1, 2 * out_w - width), (0, 0)]
  xp = jnp.pad(x, pad, constant_values=-jnp.inf)
  return [xp[..., kh:kh + 2 * out_h - 1:2, kw:kw + 2 * out_w - 1:2, :]
          for kh in range(3) for kw in range(3)]


@jax.custom_vjp
def max_pool_3x3_stride2(x: Array) -> Array:
  """PyTorch ``MaxPool(kernel 3, stride 2, padding 1)`` over axes (-3, -2) of ``(..., H, W, C)``.

  Output ``(..., ceil(H/2), ceil(W/2), C)`` (padding reads as -inf). The gradient goes to the
  *first* maximum of each window in row-major tap order, as PyTorch's CPU and CUDA kernels do.

  Written as 9 strided slices (forward) and a gather-form backward: input pixels of one row /
  column parity receive from at most two window taps each, so the input gradient is four small
  shifted sums interleaved, instead of XLA's generic select-and-scatter (index iotas, a variadic
  reduce-window and a scatter; ~10% of a C2D-ResNet training step on XLA:CPU).
  """
  windows = _pool_windows(x)
  return functools.reduce(jnp.maximum, windows)


def _max_pool_fwd(x):
  y = max_pool_3x3_stride2(x)
  return y, (x, y)


def _shift_taps(c: Array, tap: int, axis: int, size_even: int, size_odd: int) -> tuple[int, Array]:
  """Where window tap ``tap`` (0, 1, 2) of every window lands along ``axis``, in parity form.

  Input index ``2a`` (even) is tap 1 of window ``a``; input index ``2a + 1`` (odd) is tap 2 of
  window ``a`` and tap 0 of window ``a + 1``. Returns ``(parity, values)`` with ``values`` indexed
  by ``a`` (``size_even`` or ``size_odd`` entries along ``axis``).
  """
  if tap == 1:
    return 0, jax.lax.slice_in_dim(c, 0, size_even, axis=axis)
  if tap == 2:
    return 1, jax.lax.slice_in_dim(c, 0, size_odd, axis=axis)
  n = c.shape[axis]
  shifted = jax.lax.slice_in_dim(c, 1, n, axis=axis)
  missing = size_odd - (n - 1)
  if missing > 0:
    pad = [(0, 0)] * c.ndim
    pad[axis % c.ndim] = (0, missing)
    shifted = jnp.pad(shifted, pad)
  return 1, jax.lax.slice_in_dim(shifted, 0, size_odd, axis=axis)


def _max_pool_bwd(residuals, g):
  # Tied to the cotangent so that the padded windows are rebuilt here, not kept from the forward.
  (x, y), g = jax.lax.optimization_barrier((residuals, g))
  height, width = x.shape[-3], x.shape[-2]
  even_h, odd_h = (height + 1) // 2, height // 2
  even_w, odd_w = (width + 1) // 2, width // 2
  taken = None
  parts = {}
  for k, window in enumerate(_pool_windows(x)):
    first = window == y if taken is None else (window == y) & ~taken
    taken = first if taken is None else taken | first
    contribution = jnp.where(first, g, 0)
    row_parity, rows = _shift_taps(contribution, k // 3, -3, even_h, odd_h)
    col_parity, both = _shift_taps(rows, k % 3, -2, even_w, odd_w)
    key = (row_parity, col_parity)
    parts[key] = both if key not in parts else parts[key] + both

  def padded(key):  # every parity class padded to (even_h, even_w)
    part = parts[key]
    pad = [(0, 0)] * (part.ndim - 3) + [(0, even_h - part.shape[-3]),
                                        (0, even_w - part.shape[-2]), (0, 0)]
    return jnp.pad(part, pad)

  rows = [jnp.stack([padded((r, 0)), padded((r, 1))], axis=-2) for r in (0, 1)]
  full = jnp.stack(rows, axis=-4)  # (..., even_h, 2, even_w, 2, C)
  full = full.reshape(full.shape[:-5] + (2 * even_h, 2 * even_w, full.shape[-1]))
  return (full[..., :height, :width, :].astype(x.dtype),)


max_pool_3x3_stride2.defvjp(_max_pool_fwd, _max_pool_bwd)


# ----------------------------------------------------------------------------------------------
# BatchNorm with PyTorch statistics.
# ----------------------------------------------------------------------------------------------

def _batch_axes(xg: Array) -> tuple[int, ...]:
  return tuple(range(1, xg.ndim - 1))


def _batch_norm_forward(xg, scale, bias, epsilon):
  axes = _batch_axes(xg)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (xg - mean) * inv
  if scale is not None:
    y = y * scale + bias
  return y, mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(xg: Array, scale: Array | None, bias: Array | None,
                     epsilon: float) -> tuple[Array, Array, Array]:
  """Training-mode batch normalisation with a hand-written backward.

  Args:
    xg: ``(G, n, ..., C)`` float32: G groups normalised separately over every axis but the first
      and the last.
    scale, bias: ``(C,)`` affine parameters, or both None.
    epsilon: added to the (biased) variance.

  Returns:
    ``(y, mean, var)``: ``y`` like ``xg``; per-group ``mean`` and biased ``var`` with the reduced
    axes kept (size 1).

  The value and gradient are those of the plain expression ``(xg - mean) * rsqrt(var + eps)
  * scale + bias``; the backward is the closed form ``inv * (dxhat - mean(dxhat) - xhat *
  mean(dxhat * xhat))`` (two reductions and one elementwise pass, from the saved input), which XLA
  would otherwise assemble from several full-size intermediates.
  """
  y, mean, var, _ = _batch_norm_forward(xg, scale, bias, epsilon)
  return y, mean, var


def _batch_norm_train_fwd(xg, scale, bias, epsilon):
  y, mean, var, inv = _batch_norm_forward(xg, scale, bias, epsilon)
  return (y, mean, var), (xg, scale, mean, inv)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  del epsilon
  # The barrier ties the saved tensors to the incoming cotangent, so that ``xhat`` below is
  # recomputed in the backward pass: without it XLA merges it with the forward's (CSE) or hoists it
  # into the forward, keeping a normalised copy of every BatchNorm input alive until the backward.
  (xg, scale, mean, inv), cotangents = jax.lax.optimization_barrier((residuals, cotangents))
  dy, dmean, dvar = cotangents
  axes = _batch_axes(xg)
  n = math.prod(xg.shape[i] for i in axes)
  centred = xg - mean
  xhat = centred * inv
  sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
  sum_dy_xhat = jnp.sum(dy * xhat, axis=axes, keepdims=True)
  if scale is None:
    dscale = dbias = None
    dxhat_scale = 1.0
  else:
    reduce_groups = lambda v: jnp.sum(v.reshape(-1, v.shape[-1]), axis=0)
    dscale, dbias = reduce_groups(sum_dy_xhat), reduce_groups(sum_dy)
    dxhat_scale = scale
  dx = (dxhat_scale * inv) * (dy - sum_dy / n - xhat * (sum_dy_xhat / n))
  # Cotangents of the returned statistics (zero in the models, which stop their gradient).
  dx = dx + dmean / n + dvar * (2.0 / n) * centred
  return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.Module):
  """PyTorch ``BatchNorm{1,2,3}d`` on channels-last input (reduce over every axis but the last).

  * normalises with the biased batch variance, eps 1e-5;
  * running stats: ``run <- (1 - momentum) * run + momentum * batch`` with momentum 0.1 (PyTorch
    convention) and the **unbiased** variance ``var * n / (n - 1)`` for ``running_var``;
  * ``num_batches_tracked`` counts training-mode calls (int32 here, int64 in PyTorch);
  * statistics in float32 whatever the compute dtype; output cast back to the input dtype.

  ``group_size``: if set, the leading (batch) axis is split into groups of ``group_size`` samples and
  every group is normalised with its own statistics (the originals' per-GPU BatchNorm when the
  per-device batch is ``group_size``); running statistics are updated with the mean over groups of
  the per-group statistics. ``None`` (default) uses the whole (global) batch.

  Parameter names: ``scale``, ``bias`` (absent when ``affine=False``), batch stats ``mean``,
  ``var``, ``num_batches_tracked``.
  """

  def __init__(
      self,
      num_features: int,
      *,
      affine: bool = True,
      momentum: float = 0.1,
      epsilon: float = 1e-5,
      group_size: int | None = None,
      scale_init: float = 1.0,
      rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.num_features = num_features
    self.affine = affine
    self.momentum = momentum
    self.epsilon = epsilon
    self.group_size = group_size
    self.use_running_average = False
    if affine:
      self.scale = nnx.Param(jnp.full((num_features,), scale_init, jnp.float32))
      self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x: Array, *, use_running_average: bool | None = None) -> Array:
    if x.shape[-1] != self.num_features:
      raise ValueError(
          f"BatchNorm expects {self.num_features} channels on the last axis, got input of shape {x.shape}")
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    xf = x.astype(jnp.float32)
    if use_ra:
      mean, var = self.mean[...], self.var[...]
      y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      if self.group_size is not None and x.shape[0] != self.group_size:
        if x.shape[0] % self.group_size:
          raise ValueError(
              f"BatchNorm group_size={self.group_size} does not divide the batch {x.shape[0]}; "
              "use a batch that is a multiple of the per-device batch or set bn_group_size=None")
        xg = xf.reshape((x.shape[0] // self.group_size, self.group_size) + x.shape[1:])
      else:
        xg = xf[None]
      scale = self.scale[...] if self.affine else None
      bias = self.bias[...] if self.affine else None
      y, gmean, gvar = batch_norm_train(xg, scale, bias, self.epsilon)
      y = y.reshape(xf.shape)
      n = math.prod(xg.shape[1:-1])
      bmean = jnp.mean(gmean.reshape(-1, self.num_features), axis=0)
      bvar = jnp.mean(gvar.reshape(-1, self.num_features), axis=0) * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(bmean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(bvar)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
      return y.astype(x.dtype)
    if self.affine:
      y = y * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Regularisers.
# ----------------------------------------------------------------------------------------------

class DropPath(nnx.Module):
  """Stochastic depth per sample: ``x * floor(keep + U[0,1)) / keep`` (timm ``drop_path``).

  The mask is drawn per leading-axis row. Uses the ``dropout`` rng stream; inactive when
  ``deterministic`` (``model.eval()``) or ``rate == 0``.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"drop-path rate must be in [0, 1), got {rate}")
    self.rate = rate
    self.deterministic = False
    self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0) else nnx.data(None)

  def __call__(self, x: Array, *, rngs: nnx.Rngs | None = None) -> Array:
    if self.deterministic or self.rate == 0.0:
      return x
    stream = rngs["dropout"] if rngs is not None else self.rngs
    if stream is None:
      raise ValueError("DropPath with rate > 0 in training mode needs rngs (nnx.Rngs(dropout=...))")
    keep = 1.0 - self.rate
    u = jax.random.uniform(stream(), (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
    mask = jnp.floor(keep + u) / keep
    return x * mask.astype(x.dtype)


def frozen_weight(value: Array) -> FrozenParam:
  """Wrap a constant tensor as a frozen (never trained) parameter."""
  return FrozenParam(jnp.asarray(value, jnp.float32))
