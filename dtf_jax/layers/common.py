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

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
# Convolutions and linear layers.
# ----------------------------------------------------------------------------------------------

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
      rngs=rngs,
  )


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
  """A PyTorch ``nn.Linear`` (default init unless overridden); kernel ``(in, out)``."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=kernel_init or torch_default_kernel_init(),
      bias_init=bias_init or torch_default_bias_init(in_features),
      dtype=dtype,
      rngs=rngs,
  )


def layer_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """PyTorch ``nn.LayerNorm`` (eps 1e-5, weight 1, bias 0). Statistics are computed in float32."""
  return nnx.LayerNorm(num_features, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# BatchNorm with PyTorch statistics.
# ----------------------------------------------------------------------------------------------

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
      axes = tuple(range(1, xg.ndim - 1))
      gmean = jnp.mean(xg, axis=axes, keepdims=True)
      gvar = jnp.mean(jnp.square(xg - gmean), axis=axes, keepdims=True)
      y = ((xg - gmean) * jax.lax.rsqrt(gvar + self.epsilon)).reshape(xf.shape)
      n = math.prod(xg.shape[1:-1])
      bmean = jnp.mean(gmean.reshape(-1, self.num_features), axis=0)
      bvar = jnp.mean(gvar.reshape(-1, self.num_features), axis=0) * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(bmean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(bvar)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
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
