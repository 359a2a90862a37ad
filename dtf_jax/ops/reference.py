"""Pure-``jax.numpy`` ("xla") implementations of the public ops: the oracle for every kernel.

Layouts are channels-last (SPEC.md 1.2):
  * ``x``: ``(N, T, H, W, C)`` feature map;
  * correlation ``weight``: ``(T, K, K, C)``, ``weight[t, kh, kw, c]`` = PyTorch
    ``weights_cor[c, t, kh, kw]`` / ``def_cor.weight[c, t, kh, kw]``;
  * correlation output: ``(N, T, H, W, G*K*K)``, last axis ``g*K*K + k`` with tap ``k = kh*K + kw``;
  * ``offsets``: ``(N, T, H, W, K*K, 2)``, ``offsets[..., k, 0]`` = dy (rows),
    ``offsets[..., k, 1]`` = dx (columns), in pixels;
  * aggregation weights ``attn``: ``(N, T, H, W, G*K*K)`` (``G = 1`` for the DTF ops).

Every op is stride 1 with "same" padding ``p = (d*(K-1)+1)//2`` and zero padding outside the image.

Memory: no function here materialises a K*K-fold copy of ``x``. The K*K taps are a loop
(``jax.lax.scan`` over the tap index, body under ``jax.checkpoint``): each iteration reads a shifted
window of the zero-padded ``x`` (integer taps) or gathers the four bilinear corners, one at a time,
from the ``H*W``-flattened frame with clipped indices times validity masks (deformable taps), and
reduces it into the output (or an ``x``-sized accumulator) straight away. Peak temporary memory is
therefore a few times ``x.nbytes`` independent of K, forward and backward (see tests/test_ops.py).

Precision: arithmetic runs in ``promote_types(result_type(inputs), float32)`` (float32 for
bfloat16/float16/float32 inputs, float64 under x64), outputs are cast back to ``x.dtype``.
Sampling coordinates are at least float32.

Gradients: every function is a plain differentiable JAX expression of its forward formula, so
autodiff gives the exact gradient the original backward kernels compute (SPEC.md section 2 intro).
Deformable sampling uses ``floor`` + gather (never a normalise/unnormalise round trip, SPEC.md 2.7),
so at integer coordinates the offset gradient is the one-sided derivative over ``[y0, y0 + 1]``.

The functions here assume validated arguments (see ``dtf_jax.ops.validation``); call the public
ops in ``dtf_jax.ops`` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def same_padding(kernel_size: int, dilation: int) -> int:
  """'Same' padding ``p = (d*(K-1)+1)//2`` of SPEC.md (``= d*(K-1)/2`` for odd K)."""
  return (dilation * (kernel_size - 1) + 1) // 2


def _compute_dtype(*arrays) -> jnp.dtype:
  """At least float32: float32 for low-precision inputs, float64 for float64 inputs."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _scan_checkpointed(body, init, xs):
  """``jax.lax.scan`` of ``body`` (over taps or corners), rematerialised in the backward pass.

  A loop (rather than a Python unroll) bounds the live temporaries to one iteration on every
  backend (XLA:CPU schedules an unrolled version with all K*K shifted copies alive) and compiles
  the body once; ``jax.checkpoint`` keeps autodiff from stacking per-iteration residuals of x's
  size: the backward pass recomputes each iteration from the loop-invariant inputs instead.
  """
  return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), init, xs)


def _tap_positions(kernel_size: int) -> Array:
  """``(K*K, 2)`` int32 ``(kh, kw)`` of every tap ``k = kh*K + kw``: the scan input over taps.

  Precomputed (rather than ``k // K``, ``k % K`` inside the loop body, whose scalar arithmetic XLA
  fuses into every element of the window copy: measured 3x slower per tap).
  """
  k = np.arange(kernel_size * kernel_size)
  return jnp.asarray(np.stack([k // kernel_size, k % kernel_size], axis=-1), jnp.int32)


def _previous_frame(x: Array) -> Array:
  """``x[:, max(t-1, 0)]`` for every t: the query frame ``t⁻`` of the correlations."""
  return jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)


def _next_frame_or_zero(m: Array) -> Array:
  """``m[:, t+1]`` for ``t < T-1`` and 0 at ``t = T-1`` (SPEC.md 2.6 backward shift + mask)."""
  return jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)


def _pad_spatial(x: Array, padding: int) -> Array:
  return jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding), (0, 0)))


def _shifted_view(x_padded: Array, tap: Array, dilation: int, height: int, width: int) -> Array:
  """``x̂[:, :, h - p + kh*d, w - p + kw*d]`` for all (h, w): a window of the padded map.

  Args:
    x_padded: ``(N, T, H + 2p, W + 2p, C)``.
    tap: ``(2,)`` int32 ``(kh, kw)`` (traced inside the tap loop).
    dilation, height, width: d, H, W.

  Returns:
    ``(N, T, H, W, C)``.
  """
  n, t, _, _, c = x_padded.shape
  zero = jnp.zeros((), tap.dtype)
  starts = (zero, zero, tap[0] * dilation, tap[1] * dilation, zero)
  return jax.lax.dynamic_slice(x_padded, starts, (n, t, height, width, c),
                               allow_negative_indices=False)


def _per_tap_weight(weight: Array) -> Array:
  """``(T, K, K, C)`` -> ``(K*K, T, C)``: the scan input of the correlation weight."""
  t, k, _, c = weight.shape
  return jnp.moveaxis(weight.reshape(t, k * k, c), 1, 0)


def _from_per_tap(per_tap: Array) -> Array:
  """``(K*K, N, T, H, W, G)`` -> ``(N, T, H, W, G*K*K)`` with last axis ``g*K*K + k``."""
  out = jnp.moveaxis(per_tap, 0, -1)
  return out.reshape(*out.shape[:-2], -1)


def _group_sum(values: Array, groups: int) -> Array:
  """Sums ``(..., C)`` over the channels of each group: ``(..., G)``, group g = ``[gC/G, (g+1)C/G)``."""
  *lead, c = values.shape
  return values.reshape(*lead, groups, c // groups).sum(axis=-1)


# ------------------------------------------------------------------------------------------------
# Integer taps (DTF, SIFA-Swin).
# ------------------------------------------------------------------------------------------------

def _correlation(x: Array, weight: Array, kernel_size: int, dilation: int, groups: int) -> Array:
  """Temporal correlation in the compute dtype; see ``temporal_correlation``."""
  dtype = _compute_dtype(x, weight)
  x = x.astype(dtype)
  weight = weight.astype(dtype)
  _, _, height, width, _ = x.shape
  query = _previous_frame(x)
  x_padded = _pad_spatial(x, same_padding(kernel_size, dilation))

  def tap(carry, inputs):
    tap, tap_weight = inputs  # (2,), (T, C)
    key = _shifted_view(x_padded, tap, dilation, height, width)
    return carry, _group_sum(query * tap_weight[:, None, None, :] * key, groups)

  taps = _tap_positions(kernel_size)
  _, per_tap = _scan_checkpointed(tap, (), (taps, _per_tap_weight(weight)))  # (K*K, N, T, H, W, G)
  return _from_per_tap(per_tap)


def _aggregation(x: Array, attn: Array, kernel_size: int, dilation: int) -> Array:
  """Temporal aggregation in the compute dtype; see ``temporal_aggregation``."""
  dtype = _compute_dtype(x, attn)
  x = x.astype(dtype)
  attn = attn.astype(dtype)
  _, _, height, width, _ = x.shape
  x_padded = _pad_spatial(x, same_padding(kernel_size, dilation))

  def tap(out, inputs):
    tap, tap_attn = inputs  # (2,), (N, T, H, W)
    key = _shifted_view(x_padded, tap, dilation, height, width)
    return out + tap_attn[..., None] * key, None

  taps = _tap_positions(kernel_size)
  out, _ = _scan_checkpointed(tap, jnp.zeros(x.shape, dtype), (taps, jnp.moveaxis(attn, -1, 0)))
  return out


def temporal_correlation(x: Array, weight: Array, *, kernel_size: int, dilation: int,
                         groups: int) -> Array:
  """DTF temporal correlation (SPEC.md 2.1), XLA path.

  ``y[n, t, h, w, g*K*K + k] = sum_{c in g} weight[t, kh, kw, c] * x[n, t⁻, h, w, c]
  * x̂[n, t, h - p + kh*d, w - p + kw*d, c]`` with ``t⁻ = max(t-1, 0)``.

  Args:
    x: ``(N, T, H, W, C)``.
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1. groups: G dividing C.

  Returns:
    ``(N, T, H, W, G*K*K)`` in ``x.dtype``.
  """
  return _correlation(x, weight, kernel_size, dilation, groups).astype(x.dtype)


def temporal_aggregation(x: Array, attn: Array, *, kernel_size: int, dilation: int) -> Array:
  """DTF aggregation (SPEC.md 2.2 with E = Cw = 1, stride 1), XLA path.

  ``y[n, t, h, w, c] = sum_k attn[n, t, h, w, k] * x̂[n, t, h - p + kh*d, w - p + kw*d, c]``.

  Args:
    x: ``(N, T, H, W, C)``.
    attn: ``(N, T, H, W, K*K)``.
    kernel_size: K (odd). dilation: d >= 1.

  Returns:
    ``(N, T, H, W, C)`` in ``x.dtype``.
  """
  return _aggregation(x, attn, kernel_size, dilation).astype(x.dtype)


def frame_wise_aggregation(x: Array, weight: Array, *, kernel_size: int,
                           dilation: int) -> tuple[Array, Array]:
  """Steps 1-4 of the DTF block (SPEC.md 3.2), one group, XLA path.

  ``r = temporal_correlation(x, weight)``; ``a = softmax_k(r)`` (in the compute dtype, at least
  float32); ``m = temporal_aggregation(x, a)``; ``u_t = x_t + m_{t+1}`` for ``t < T-1``,
  ``u_{T-1} = x_{T-1}``.

  Args:
    x: ``(N, T, H, W, C)``.
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1.

  Returns:
    ``(u, r)``: ``u (N, T, H, W, C)`` and the raw correlation ``r (N, T, H, W, K*K)``, both in
    ``x.dtype`` (the softmax and the aggregation use the unrounded ``r``).
  """
  # Cast once: x feeds three terms, and separate casts would round each one's gradient to x.dtype
  # before summing them.
  xc = x.astype(_compute_dtype(x, weight))
  raw = _correlation(xc, weight, kernel_size, dilation, 1)
  attn = jax.nn.softmax(raw, axis=-1)
  aggregated = _aggregation(xc, attn, kernel_size, dilation)
  u = xc + _next_frame_or_zero(aggregated)
  return u.astype(x.dtype), raw.astype(x.dtype)


def temporal_correlation_aggregation(x: Array, weight: Array, *, kernel_size: int,
                                     dilation: int) -> Array:
  """SIFA-Swin's unshifted-block core (SPEC.md 3.8), one group, XLA path.

  ``rho = temporal_correlation(x, weight)`` (no normalisation), ``m = temporal_aggregation(x,
  rho)``; ``rho`` is not rounded to ``x.dtype`` in between.

  Args:
    x: ``(N, T, H, W, C)``.
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1.

  Returns:
    ``m (N, T, H, W, C)`` in ``x.dtype``.
  """
  xc = x.astype(_compute_dtype(x, weight))  # cast once (see frame_wise_aggregation)
  rho = _correlation(xc, weight, kernel_size, dilation, 1)
  return _aggregation(xc, rho, kernel_size, dilation).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Deformable taps (SIFA-ResNet).
# ------------------------------------------------------------------------------------------------

def _gather_rows(frames: Array, index: Array) -> Array:
  """``frames[n, t, index[n, t, i], :]``: ``frames (N, T, H*W, C)``, ``index (N, T, P)`` in range."""
  take = lambda frame, idx: frame.at[idx].get(mode='promise_in_bounds')
  return jax.vmap(jax.vmap(take))(frames, index)


def _bilinear_corner(py: Array, px: Array, corner: Array, height: int,
                     width: int) -> tuple[Array, Array]:
  """Row index and blend coefficient of one bilinear corner (SIFA convention, SPEC.md 2.3).

  With ``y0 = floor(py)``, ``x0 = floor(px)``, ``ly = py - y0``, ``lx = px - x0``, corner
  ``j = 2a + b`` (``a, b`` in {0, 1}) is the pixel ``(y0 + a, x0 + b)`` with blend
  ``(a ? ly : 1 - ly) * (b ? lx : 1 - lx)``. The coefficient is 0 where the corner lies outside the
  image or the point is outside the open range ``-1 < py < H``, ``-1 < px < W`` (value and gradient
  0 there). ``floor`` has zero derivative, so derivatives w.r.t. ``py, px`` are those of the blend
  with ``y0, x0`` held fixed: at integer coordinates, the one-sided derivative over ``[y0, y0+1]``.

  Args:
    py, px: ``(N, T, H, W)`` sampling rows/columns, at least float32.
    corner: ``(2,)`` int32 ``(a, b)`` of corner ``j = 2a + b``.
    height, width: H, W.

  Returns:
    ``(index, coefficient)``: ``index (N, T, H, W)`` int32 into the ``H*W``-flattened frame
    (clipped into range; out-of-image corners have coefficient 0), ``coefficient (N, T, H, W)`` in
    the dtype of ``py``.
  """
  a, b = corner[0], corner[1]
  y0f = jnp.floor(py)
  x0f = jnp.floor(px)
  ly = py - y0f
  lx = px - x0f
  # Clip before the int cast so that huge offsets cannot overflow; such points are masked anyway.
  row = jnp.clip(y0f, -1, height).astype(jnp.int32) + a
  col = jnp.clip(x0f, -1, width).astype(jnp.int32) + b
  blend = jnp.where(a == 1, ly, 1 - ly) * jnp.where(b == 1, lx, 1 - lx)
  inside = (py > -1) & (px > -1) & (py < height) & (px < width)
  valid = inside & (row >= 0) & (row < height) & (col >= 0) & (col < width)
  coefficient = jnp.where(valid, blend, 0)
  index = jnp.clip(row, 0, height - 1) * width + jnp.clip(col, 0, width - 1)
  return index, coefficient


def _sum_over_corners(frames: Array, py: Array, px: Array, accumulate, init):
  """Folds the four bilinear corners of the sampling points ``(py, px)`` into ``init``.

  One corner at a time (a loop, so at most one gathered ``(N, T, H, W, C)`` block is alive):
  ``acc <- accumulate(acc, coefficient, values)`` with ``values[n, t, h, w, :]`` the pixel of corner j
  of ``(py, px)[n, t, h, w]`` in frame ``t`` and ``coefficient (N, T, H, W)`` its blend weight
  (see ``_bilinear_corner``). With ``accumulate = acc + coefficient[..., None] * values`` the result is
  the sampling ``S`` of SPEC.md 2.3 for every channel.

  Args:
    frames: ``(N, T, H*W, C)`` frames flattened row-major over (H, W), compute dtype.
    py, px: ``(N, T, H, W)`` sampling rows/columns.
    accumulate: ``(acc, coefficient, values) -> acc``.
    init: the initial accumulator.

  Returns:
    The final accumulator.
  """
  n, t, height, width = py.shape
  c = frames.shape[-1]

  def corner(acc, j):
    index, coefficient = _bilinear_corner(py, px, j, height, width)
    values = _gather_rows(frames, index.reshape(n, t, height * width))
    values = values.reshape(n, t, height, width, c)
    return accumulate(acc, coefficient.astype(frames.dtype), values), None

  corners = jnp.asarray([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.int32)  # (a, b) of j = 2a + b
  acc, _ = _scan_checkpointed(corner, init, corners)
  return acc


def _tap_coordinates(tap_offsets: Array, tap: Array, kernel_size: int, dilation: int,
                     height: int, width: int) -> tuple[Array, Array]:
  """Sampling point of tap ``k``: ``(h - p + kh*d + dy_k, w - p + kw*d + dx_k)`` (SPEC.md 2.4).

  Args:
    tap_offsets: ``(N, T, H, W, 2)`` offsets ``(dy, dx)`` of tap ``k``.
    tap: ``(2,)`` int32 ``(kh, kw)`` of tap ``k``.
    kernel_size, dilation, height, width: K, d, H, W.

  Returns:
    ``(py, px)``, each ``(N, T, H, W)`` in ``promote_types(offsets.dtype, float32)``.
  """
  p = same_padding(kernel_size, dilation)
  coord_dtype = jnp.promote_types(tap_offsets.dtype, jnp.float32)
  start = (tap * dilation - p).astype(coord_dtype)
  rows = jnp.arange(height, dtype=coord_dtype)[:, None] + start[0]
  cols = jnp.arange(width, dtype=coord_dtype)[None, :] + start[1]
  py = rows + tap_offsets[..., 0].astype(coord_dtype)
  px = cols + tap_offsets[..., 1].astype(coord_dtype)
  return py, px


def _per_tap_offsets(offsets: Array) -> Array:
  """``(N, T, H, W, K*K, 2)`` -> ``(K*K, N, T, H, W, 2)``: the scan input of the offsets."""
  return jnp.moveaxis(offsets, -2, 0)


def deformable_correlation(x: Array, offsets: Array, weight: Array, *, kernel_size: int,
                           dilation: int, groups: int) -> Array:
  """SIFA deformable correlation (SPEC.md 2.4, stride 1), XLA path.

  ``y[n, t, h, w, g*K*K + k] = sum_{c in g} weight[t, kh, kw, c] * x[n, t⁻, h, w, c]
  * S(x[n, t, :, :, c], py_k, px_k)`` with ``py_k = h - p + kh*d + offsets[n, t, h, w, k, 0]``,
  ``px_k = w - p + kw*d + offsets[n, t, h, w, k, 1]`` and S the sampling of SPEC.md 2.3.

  Args:
    x: ``(N, T, H, W, C)``.
    offsets: ``(N, T, H, W, K*K, 2)`` as ``(dy, dx)``, shared by all groups.
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1. groups: G dividing C.

  Returns:
    ``(N, T, H, W, G*K*K)`` in ``x.dtype``.
  """
  dtype = _compute_dtype(x, weight, offsets)
  xc = x.astype(dtype)
  weight = weight.astype(dtype)
  n, t, height, width, c = x.shape
  query = _previous_frame(xc)
  frames = xc.reshape(n, t, height * width, c)

  def tap(carry, inputs):
    tap, tap_offsets, tap_weight = inputs  # (2,), (N, T, H, W, 2), (T, C)
    py, px = _tap_coordinates(tap_offsets, tap, kernel_size, dilation, height, width)
    weighted_query = query * tap_weight[:, None, None, :]

    def accumulate(acc, coefficient, values):  # sum_c weight * query * S = sum_j coef_j * (...)
      return acc + coefficient[..., None] * _group_sum(weighted_query * values, groups)

    init = jnp.zeros((n, t, height, width, groups), dtype)
    return carry, _sum_over_corners(frames, py, px, accumulate, init)

  taps = _tap_positions(kernel_size)
  _, per_tap = _scan_checkpointed(tap, (), (taps, _per_tap_offsets(offsets), _per_tap_weight(weight)))
  return _from_per_tap(per_tap).astype(x.dtype)


def deformable_aggregation(x: Array, offsets: Array, attn: Array, *, kernel_size: int,
                           dilation: int, groups: int) -> Array:
  """SIFA deformable aggregation (SPEC.md 2.5, stride 1), XLA path.

  ``y[n, t, h, w, g*C + c] = sum_k attn[n, t, h, w, g*K*K + k] * S(x[n, t, :, :, c], py_k, px_k)``:
  each group aggregates all C channels with its own K*K weights.

  Args:
    x: ``(N, T, H, W, C)``.
    offsets: ``(N, T, H, W, K*K, 2)`` as ``(dy, dx)``.
    attn: ``(N, T, H, W, G*K*K)``.
    kernel_size: K (odd). dilation: d >= 1. groups: G >= 1.

  Returns:
    ``(N, T, H, W, G*C)`` in ``x.dtype``.
  """
  dtype = _compute_dtype(x, attn, offsets)
  n, t, height, width, c = x.shape
  frames = x.astype(dtype).reshape(n, t, height * width, c)
  attn = attn.astype(dtype).reshape(n, t, height, width, groups, kernel_size * kernel_size)

  def tap(out, inputs):
    tap, tap_offsets, tap_attn = inputs  # (2,), (N, T, H, W, 2), (N, T, H, W, G)
    py, px = _tap_coordinates(tap_offsets, tap, kernel_size, dilation, height, width)

    def accumulate(acc, coefficient, values):  # acc[g, c] += attn[g] * coef_j * v_j[c]
      return acc + (tap_attn * coefficient[..., None])[..., None] * values[..., None, :]

    return _sum_over_corners(frames, py, px, accumulate, out), None

  taps = _tap_positions(kernel_size)
  init = jnp.zeros((n, t, height, width, groups, c), dtype)
  out, _ = _scan_checkpointed(tap, init, (taps, _per_tap_offsets(offsets), jnp.moveaxis(attn, -1, 0)))
  return out.reshape(n, t, height, width, groups * c).astype(x.dtype)
