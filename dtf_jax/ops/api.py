"""Public ops of dtf_jax: DTF temporal correlation/aggregation and SIFA deformable ops.

Channels-last layouts (SPEC.md 1.2); ``K`` = ``kernel_size`` (odd), ``d`` = ``dilation``, "same"
padding ``p = (d*(K-1)+1)//2``, stride 1, tap ``k = kh*K + kw``, ``t⁻ = max(t-1, 0)``,
``x̂`` = ``x`` with zero padding.

Each op validates its arguments (``dtf_jax.ops.validation``; bad input raises ``ValueError``) and
then runs the implementation chosen by ``impl`` (``dtf_jax.ops.dispatch``):
  * ``'xla'``: pure ``jax.numpy`` (``dtf_jax.ops.reference``), runs everywhere;
  * ``'pallas'``: the Pallas kernels (``kernels/``): compiled when lowered for CUDA, interpret mode
    on other platforms (slow; for tests);
  * ``'auto'``: the compiled Pallas kernels on CUDA, ``'xla'`` elsewhere.

All ops accept float32/bfloat16/float16 (and float64 under x64) inputs, compute in at least float32
and return ``x.dtype``. They are jit-able, vmap-able and differentiable w.r.t. every array argument
(the gradient is the exact gradient of the forward, as in the original CUDA kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dtf_jax.ops import dispatch
from dtf_jax.ops import validation as v

Array = jax.Array


def _checked_x_and_weight(op: str, x, weight, kernel_size, dilation, impl):
  """Validated ``(x, weight, kernel_size, dilation, impl)`` of a one-group correlation op."""
  impl = v.check_impl(op, impl)
  kernel_size = v.check_kernel_size(op, kernel_size)
  dilation = v.check_dilation(op, dilation)
  x, weight = jnp.asarray(x), jnp.asarray(weight)
  v.check_correlation_weight(op, weight, v.check_x(op, x), kernel_size)
  return x, weight, kernel_size, dilation, impl


def temporal_correlation(x: Array, weight: Array, *, kernel_size: int = 3, dilation: int = 1,
                         groups: int = 1, impl: str = 'auto') -> Array:
  """DTF temporal correlation (SPEC.md 2.1, ``CorrelationZeropad``).

  ``y[n, t, h, w, g*K*K + k] = sum_{c in group g} weight[t, kh, kw, c] * x[n, t⁻, h, w, c]
  * x̂[n, t, h - p + kh*d, w - p + kw*d, c]``

  The query is the previous frame ``t⁻`` at the un-shifted position (frame 0 correlates with
  itself); the keys are frame ``t`` in the K x K neighbourhood. Group ``g`` sums the channels
  ``[g*C/G, (g+1)*C/G)``.

  Args:
    x: ``(N, T, H, W, C)`` features.
    weight: ``(T, K, K, C)``; ``weight[t, kh, kw, c]`` is the original ``weights_cor[c, t, kh, kw]``
      (convert with ``jnp.transpose(w, (1, 2, 3, 0))``).
    kernel_size: K, odd.
    dilation: d >= 1.
    groups: G, must divide C.
    impl: ``'auto'``, ``'xla'`` or ``'pallas'``.

  Returns:
    ``(N, T, H, W, G*K*K)`` in ``x.dtype``, last axis ``g*K*K + k``.
  """
  op = 'temporal_correlation'
  impl = v.check_impl(op, impl)
  kernel_size = v.check_kernel_size(op, kernel_size)
  dilation = v.check_dilation(op, dilation)
  groups = v.check_groups(op, groups)
  x, weight = jnp.asarray(x), jnp.asarray(weight)
  x_shape = v.check_x(op, x)
  v.check_channels_divisible(op, x_shape, groups)
  v.check_correlation_weight(op, weight, x_shape, kernel_size)
  return dispatch.temporal_correlation(x, weight, kernel_size=kernel_size, dilation=dilation,
                                       groups=groups, impl=impl)


def temporal_aggregation(x: Array, attn: Array, *, kernel_size: int = 3, dilation: int = 1,
                         impl: str = 'auto') -> Array:
  """DTF aggregation (SPEC.md 2.2 with one head and one weight row, ``Aggregation``).

  ``y[n, t, h, w, c] = sum_k attn[n, t, h, w, k] * x̂[n, t, h - p + kh*d, w - p + kw*d, c]``

  Every channel uses the same K*K weights; each frame aggregates its own neighbourhood.

  Args:
    x: ``(N, T, H, W, C)`` features.
    attn: ``(N, T, H, W, K*K)`` weights per tap.
    kernel_size: K, odd.
    dilation: d >= 1.
    impl: ``'auto'``, ``'xla'`` or ``'pallas'``.

  Returns:
    ``(N, T, H, W, C)`` in ``x.dtype``.
  """
  op = 'temporal_aggregation'
  impl = v.check_impl(op, impl)
  kernel_size = v.check_kernel_size(op, kernel_size)
  dilation = v.check_dilation(op, dilation)
  x, attn = jnp.asarray(x), jnp.asarray(attn)
  x_shape = v.check_x(op, x)
  v.check_attention(op, attn, x_shape, kernel_size, 1)
  return dispatch.temporal_aggregation(x, attn, kernel_size=kernel_size, dilation=dilation,
                                       impl=impl)


def temporal_correlation_aggregation(x: Array, weight: Array, *, kernel_size: int = 3,
                                     dilation: int = 1, impl: str = 'auto') -> Array:
  """Aggregation of ``x`` weighted by its own temporal correlation, one group (SIFA-Swin, SPEC.md 3.8).

  ``rho = temporal_correlation(x, weight)`` (``(N, T, H, W, K*K)``, not normalised),
  ``m = temporal_aggregation(x, rho)``: the core of the SIFA-Swin unshifted blocks' inter-frame
  attention. One op so that the XLA path can fuse both and keep only ``x`` and ``rho`` for the
  backward (``dtf_jax.ops.frame_wise``).

  Args:
    x: ``(N, T, H, W, C)`` features.
    weight: ``(T, K, K, C)`` correlation weight (see ``temporal_correlation``).
    kernel_size: K, odd.
    dilation: d >= 1.
    impl: ``'auto'``, ``'xla'`` or ``'pallas'`` (the correlation and aggregation kernels in
      sequence, ``rho`` rounded to ``x.dtype`` between them; the XLA path does not round it).

  Returns:
    ``(N, T, H, W, C)`` in ``x.dtype``.
  """
  op = 'temporal_correlation_aggregation'
  x, weight, kernel_size, dilation, impl = _checked_x_and_weight(
      op, x, weight, kernel_size, dilation, impl)
  return dispatch.temporal_correlation_aggregation(x, weight, kernel_size=kernel_size,
                                                   dilation=dilation, impl=impl)


def deformable_correlation(x: Array, offsets: Array, weight: Array, *, kernel_size: int = 3,
                           dilation: int = 1, groups: int = 1, impl: str = 'auto') -> Array:
  """SIFA deformable correlation (SPEC.md 2.4, ``defcor``), stride 1.

  ``y[n, t, h, w, g*K*K + k] = sum_{c in group g} weight[t, kh, kw, c] * x[n, t⁻, h, w, c]
  * S(x[n, t, :, :, c], h - p + kh*d + dy_k, w - p + kw*d + dx_k)``

  with ``(dy_k, dx_k) = offsets[n, t, h, w, k]`` and ``S`` the bilinear sampling of SPEC.md 2.3:
  0 if ``py <= -1``, ``px <= -1``, ``py >= H`` or ``px >= W``; otherwise the bilinear blend of the
  four corners around ``(floor(py), floor(px))`` with corners outside the image counting 0. The
  offset gradient at integer coordinates is the one-sided derivative over ``[y0, y0 + 1]``.
  The query is the previous frame ``t⁻`` at the un-shifted ``(h, w)``; the keys are frame ``t`` at
  the deformed points. The offsets are shared by all groups.

  Args:
    x: ``(N, T, H, W, C)`` features.
    offsets: ``(N, T, H, W, K*K, 2)`` displacements in pixels, last axis ``(dy, dx)`` (the original
      ``(N, 2*K*K, T, H, W)`` channel ``2k`` is ``dy_k``, ``2k+1`` is ``dx_k``).
    weight: ``(T, K, K, C)``; ``weight[t, kh, kw, c]`` is the original ``def_cor.weight[c, t, kh, kw]``.
    kernel_size: K, odd.
    dilation: d >= 1.
    groups: G, must divide C.
    impl: ``'auto'``, ``'xla'`` or ``'pallas'``.

  Returns:
    ``(N, T, H, W, G*K*K)`` in ``x.dtype``, last axis ``g*K*K + k``.
  """
  op = 'deformable_correlation'
  impl = v.check_impl(op, impl)
  kernel_size = v.check_kernel_size(op, kernel_size)
  dilation = v.check_dilation(op, dilation)
  groups = v.check_groups(op, groups)
  x, offsets, weight = jnp.asarray(x), jnp.asarray(offsets), jnp.asarray(weight)
  x_shape = v.check_x(op, x)
  v.check_channels_divisible(op, x_shape, groups)
  v.check_offsets(op, offsets, x_shape, kernel_size)
  v.check_correlation_weight(op, weight, x_shape, kernel_size)
  return dispatch.deformable_correlation(x, offsets, weight, kernel_size=kernel_size,
                                         dilation=dilation, groups=groups, impl=impl)


def deformable_aggregation(x: Array, offsets: Array, attn: Array, *, kernel_size: int = 3,
                           dilation: int = 1, groups: int = 1, impl: str = 'auto') -> Array:
  """SIFA deformable aggregation (SPEC.md 2.5, ``defagg``), stride 1.

  ``y[n, t, h, w, g*C + c] = sum_k attn[n, t, h, w, g*K*K + k]
  * S(x[n, t, :, :, c], h - p + kh*d + dy_k, w - p + kw*d + dx_k)``

  Each group aggregates **all** C channels with its own K*K weights (output channel ``g*C + c``);
  sampling (``S``, offsets) as in ``deformable_correlation``, on the same frame ``t``.

  Args:
    x: ``(N, T, H, W, C)`` features.
    offsets: ``(N, T, H, W, K*K, 2)`` displacements in pixels, last axis ``(dy, dx)``.
    attn: ``(N, T, H, W, G*K*K)`` weights, last axis ``g*K*K + k``.
    kernel_size: K, odd.
    dilation: d >= 1.
    groups: G >= 1.
    impl: ``'auto'``, ``'xla'`` or ``'pallas'``.

  Returns:
    ``(N, T, H, W, G*C)`` in ``x.dtype``.
  """
  op = 'deformable_aggregation'
  impl = v.check_impl(op, impl)
  kernel_size = v.check_kernel_size(op, kernel_size)
  dilation = v.check_dilation(op, dilation)
  groups = v.check_groups(op, groups)
  x, offsets, attn = jnp.asarray(x), jnp.asarray(offsets), jnp.asarray(attn)
  x_shape = v.check_x(op, x)
  v.check_offsets(op, offsets, x_shape, kernel_size)
  v.check_attention(op, attn, x_shape, kernel_size, groups)
  return dispatch.deformable_aggregation(x, offsets, attn, kernel_size=kernel_size,
                                         dilation=dilation, groups=groups, impl=impl)


def frame_wise_aggregation(x: Array, weight: Array, *, kernel_size: int = 3, dilation: int = 1,
                           impl: str = 'auto') -> tuple[Array, Array]:
  """Fused steps 1-4 of the DTF block (SPEC.md 3.2), one group.

  1. ``r = temporal_correlation(x, weight)`` (raw correlation, ``(N, T, H, W, K*K)``);
  2. ``a = softmax_k(r)`` over the K*K taps, in at least float32;
  3. ``m = temporal_aggregation(x, a)``;
  4. ``u_t = x_t + m_{t+1}`` for ``t < T-1``, ``u_{T-1} = x_{T-1}`` (SPEC.md 2.6 backward shift).

  Args:
    x: ``(N, T, H, W, C)`` features.
    weight: ``(T, K, K, C)`` correlation weight (``weights_cor`` transposed, see
      ``temporal_correlation``).
    kernel_size: K, odd.
    dilation: d >= 1.
    impl: ``'auto'``, ``'xla'`` or ``'pallas'``.

  Returns:
    ``(u, r)``: ``u (N, T, H, W, C)`` and ``r (N, T, H, W, K*K)``, both in ``x.dtype``; steps 2-4
    use the unrounded ``r``.
  """
  op = 'frame_wise_aggregation'
  x, weight, kernel_size, dilation, impl = _checked_x_and_weight(
      op, x, weight, kernel_size, dilation, impl)
  return dispatch.frame_wise_aggregation(x, weight, kernel_size=kernel_size, dilation=dilation,
                                         impl=impl)
