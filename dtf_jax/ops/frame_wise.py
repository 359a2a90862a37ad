"""DTF frame-wise aggregation (steps 1-4 of SPEC.md 3.2) for XLA, with a hand-written backward.

The ``'xla'`` implementation of ``dtf_jax.ops.frame_wise_aggregation``, and (the same taps and
backward without the softmax, the residual and the frame shift) of
``dtf_jax.ops.temporal_correlation_aggregation``, SIFA-Swin's correlation + aggregation. Same values as the
autodiff oracle ``dtf_jax.ops.reference.frame_wise_aggregation`` (tests/test_ops.py compares both
with float64 NumPy loops, and their gradients with each other), but laid out for XLA:CPU:

* the K*K taps are unrolled, not a loop: each of the elementwise tap sums below is one fusion that
  reads the shifted windows of a few padded arrays and writes its result once, instead of K*K
  passes over an ``x``-sized loop carry;
* the backward is ``jax.custom_vjp``: it keeps ``x`` and the softmax weights ``a`` (``K*K / C`` of
  ``x``'s size) and computes, with ``q = x[t⁻]`` (previous frame), ``dm = du`` shifted one frame
  later and ``w_k = weight[:, kh, kw, :]``::

    da_k  = sum_c dm * x̂_k                              (a channel sum per tap)
    dr'   = dr + a * (da - sum_k a * da)                 (softmax backward)
    dq    = sum_k dr'_k * w_k * x̂_k                      (one fusion)
    dx    = du + sum_k (a_k * dm + dr'_k * w_k * q)[p - off_k] + (dq moved back to its frame)
    dw_k  = sum_{n, h, w} dr'_k * q * x̂_k

  where ``x̂_k`` is the window of the zero-padded ``x`` at tap k's offset; the scatter of each
  tap's contribution back to ``p + off_k`` is written as a gather from ``p - off_k`` of the padded
  contributions, so it too is one fusion. Autodiff of the tap loop instead writes each tap's
  gradient into an ``x``-sized padded accumulator (a dynamic-update-slice per tap) and recomputes
  the loop.

Measured (forward + backward of the op alone, float32, 2-core EPYC, alternating with the autodiff
oracle in one process, ``benchmarks/README.md``): 0.59-0.73x of its time at the four DTF-ResNet50
stages, 0.68-0.77x at the four Swin-S stages, XLA temporary memory 1-3% lower.

Memory: no K*K-fold copy of ``x``: the residuals are ``x`` and ``a``; the elementwise tap sums are
single fusions, and the channel sums run one tap at a time (``_tap_sums``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dtf_jax.ops import reference

Array = jax.Array


def _window(padded: Array, row: int, col: int, height: int, width: int) -> Array:
  """``padded[:, :, row:row + H, col:col + W]``: a static window of a padded ``(N, T, ., ., C)``."""
  return padded[:, :, row:row + height, col:col + width]


def _pad(a: Array, kernel_size: int, dilation: int) -> Array:
  """Zero 'same' padding of H and W for the taps."""
  return reference._pad_spatial(a, reference.same_padding(kernel_size, dilation))


def _taps(kernel_size: int, dilation: int):
  """Window starts in the padded map of tap i = kh*K + kw (read at ``p + off_i``) and of its
  adjoint (read at ``p - off_i``: start ``(K-1)*d - start_i``)."""
  k, d = kernel_size, dilation
  forward = [(i // k * d, i % k * d) for i in range(k * k)]
  return forward, [((k - 1) * d - s0, (k - 1) * d - s1) for s0, s1 in forward]


def _tap_weight(weight: Array, i: int) -> Array:
  """``weight[:, kh, kw, :]`` of tap i as ``(T, 1, 1, C)``."""
  k = weight.shape[1]
  return weight[:, i // k, i % k, None, None, :]


def _previous_frame_transpose(dq: Array) -> Array:
  """Adjoint of ``reference._previous_frame`` (``q_t = x_{max(t-1, 0)}``) along axis 1."""
  if dq.shape[1] == 1:
    return dq
  first = dq[:, :1] + dq[:, 1:2]
  return jnp.concatenate([first, dq[:, 2:], jnp.zeros_like(dq[:, :1])], axis=1)


def _tap_sums(padded: Array, operands: tuple, taps, summand, height: int, width: int,
              axis=-1) -> list[Array]:
  """``[summand(i, window_i, *operands).sum(axis) for each tap i]``, one tap after the other.

  XLA:CPU hands these sums to YNNPACK, which needs each shifted window (and each broadcast
  operand) as an array of its own; left alone, XLA's scheduler creates those of all K*K taps
  before the first sum (K*K copies of ``x`` alive). Threading ``padded`` and ``operands``
  through an optimisation barrier with each tap's sum makes every tap's inputs depend on the
  previous tap's result, so one tap's temporaries are alive at a time.
  """
  sums = []
  for i, start in enumerate(taps):
    total = jnp.sum(summand(i, _window(padded, *start, height, width), *operands), axis=axis)
    padded, operands, total = jax.lax.optimization_barrier((padded, operands, total))
    sums.append(total)
  return sums


def _correlate(x: Array, weight: Array, kernel_size: int, dilation: int) -> Array:
  """``r_k = sum_c q * w_k * x̂_k`` with ``q = x[t⁻]``: ``(N, T, H, W, K*K)``."""
  _, _, height, width, _ = x.shape
  taps, _ = _taps(kernel_size, dilation)
  return jnp.stack(_tap_sums(
      _pad(x, kernel_size, dilation), (reference._previous_frame(x), weight), taps,
      lambda i, key, query, weight: query * _tap_weight(weight, i) * key,
      height, width), axis=-1)


def _aggregate(x: Array, attn: Array, kernel_size: int, dilation: int) -> Array:
  """``m = sum_k a_k * x̂_k`` (one fusion): ``(N, T, H, W, C)``."""
  _, _, height, width, _ = x.shape
  padded = _pad(x, kernel_size, dilation)
  taps, _ = _taps(kernel_size, dilation)
  return functools.reduce(jnp.add, [
      attn[..., i, None] * _window(padded, *s, height, width) for i, s in enumerate(taps)])


def _correlation_aggregation_gradients(x, weight, attn, dm, logits_cotangent, kernel_size,
                                       dilation):
  """Gradients of ``m = aggregate(x, a)`` with ``a = f(correlate(x, weight))``.

  Args:
    x, weight: the op's inputs (compute dtype); attn: ``a`` as the forward computed it.
    dm: cotangent of ``m``.
    logits_cotangent: ``dattn -> dr'``, the cotangent of the correlation ``r`` given that of
      ``a`` (the softmax backward plus any cotangent on ``r`` itself; the identity without one).

  Returns:
    ``(dx, dweight)``: every path through the taps and the previous-frame query.
  """
  _, _, height, width, _ = x.shape
  pad = lambda a: _pad(a, kernel_size, dilation)
  query = reference._previous_frame(x)
  padded = pad(x)
  taps, back = _taps(kernel_size, dilation)
  dattn = jnp.stack(_tap_sums(padded, (dm,), taps, lambda i, key, dm: dm * key, height, width),
                    axis=-1)
  draw = logits_cotangent(dattn)
  dquery = functools.reduce(jnp.add, [
      draw[..., i, None] * _tap_weight(weight, i) * _window(padded, *s, height, width)
      for i, s in enumerate(taps)])
  dm_padded, query_padded = pad(dm), pad(query)
  attn_padded, draw_padded = pad(attn), pad(draw)
  dx_taps = functools.reduce(jnp.add, [
      _window(attn_padded[..., i:i + 1], *s, height, width) * _window(dm_padded, *s, height, width)
      + _window(draw_padded[..., i:i + 1], *s, height, width) * _tap_weight(weight, i)
      * _window(query_padded, *s, height, width)
      for i, s in enumerate(back)])
  dweight = jnp.stack(_tap_sums(
      padded, (draw, query), taps, lambda i, key, draw, query: draw[..., i, None] * query * key,
      height, width, axis=(0, 2, 3)), axis=1)  # (T, K*K, C)
  return dx_taps + _previous_frame_transpose(dquery), dweight.reshape(weight.shape)


def _forward(x: Array, weight: Array, kernel_size: int, dilation: int):
  """``(u, r, a)`` in the dtype of ``x`` (the compute dtype)."""
  raw = _correlate(x, weight, kernel_size, dilation)
  attn = jax.nn.softmax(raw, axis=-1)
  aggregated = _aggregate(x, attn, kernel_size, dilation)
  return x + reference._next_frame_or_zero(aggregated), raw, attn


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _frame_wise_aggregation(x: Array, weight: Array, kernel_size: int,
                            dilation: int) -> tuple[Array, Array]:
  u, raw, _ = _forward(x, weight, kernel_size, dilation)
  return u, raw


def _frame_wise_aggregation_fwd(x, weight, kernel_size, dilation):
  u, raw, attn = _forward(x, weight, kernel_size, dilation)
  return (u, raw), (x, weight, attn)


def _frame_wise_aggregation_bwd(kernel_size, dilation, residuals, cotangents):
  x, weight, attn = residuals
  du, draw = cotangents
  # u_t = x_t + m_{t+1}: the aggregate m of frame t receives the gradient of u_{t-1} (none at t=0).
  dm = jnp.concatenate([jnp.zeros_like(du[:, :1]), du[:, :-1]], axis=1)
  softmax_backward = lambda dattn: draw + attn * (
      dattn - jnp.sum(attn * dattn, axis=-1, keepdims=True))
  dx, dweight = _correlation_aggregation_gradients(x, weight, attn, dm, softmax_backward,
                                                   kernel_size, dilation)
  return du + dx, dweight


_frame_wise_aggregation.defvjp(_frame_wise_aggregation_fwd, _frame_wise_aggregation_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _correlation_aggregation(x: Array, weight: Array, kernel_size: int, dilation: int) -> Array:
  return _aggregate(x, _correlate(x, weight, kernel_size, dilation), kernel_size, dilation)


def _correlation_aggregation_fwd(x, weight, kernel_size, dilation):
  rho = _correlate(x, weight, kernel_size, dilation)
  return _aggregate(x, rho, kernel_size, dilation), (x, weight, rho)


def _correlation_aggregation_bwd(kernel_size, dilation, residuals, dm):
  x, weight, rho = residuals
  return _correlation_aggregation_gradients(x, weight, rho, dm, lambda drho: drho, kernel_size,
                                            dilation)


_correlation_aggregation.defvjp(_correlation_aggregation_fwd, _correlation_aggregation_bwd)


def temporal_correlation_aggregation(x: Array, weight: Array, *, kernel_size: int,
                                     dilation: int) -> Array:
  """Aggregation of ``x`` with its own (unnormalised) temporal correlation, one group.

  Same contract as ``reference.temporal_correlation_aggregation``: ``x (N, T, H, W, C)``,
  ``weight (T, K, K, C)``, returns ``(N, T, H, W, C)`` in ``x.dtype``, arithmetic in at least
  float32 (the correlation is not rounded to ``x.dtype`` between the two steps). The backward
  keeps ``x`` and the correlation ``rho`` (``K*K / C`` of ``x``'s size) and is the frame-wise
  backward above without the softmax; XLA drops the weight gradient where nothing uses it (the
  SIFA blocks' frozen weight).
  """
  dtype = reference._compute_dtype(x, weight)
  m = _correlation_aggregation(x.astype(dtype), weight.astype(dtype), kernel_size, dilation)
  return m.astype(x.dtype)


def frame_wise_aggregation(x: Array, weight: Array, *, kernel_size: int,
                           dilation: int) -> tuple[Array, Array]:
  """Steps 1-4 of the DTF block, one group; same contract as ``reference.frame_wise_aggregation``.

  Args:
    x: ``(N, T, H, W, C)``.
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1.

  Returns:
    ``(u (N, T, H, W, C), r (N, T, H, W, K*K))`` in ``x.dtype``; arithmetic in at least float32.
  """
  dtype = reference._compute_dtype(x, weight)
  u, raw = _frame_wise_aggregation(x.astype(dtype), weight.astype(dtype), kernel_size, dilation)
  return u.astype(x.dtype), raw.astype(x.dtype)
