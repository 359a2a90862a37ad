"""Pallas (Triton backend) kernels for the SIFA deformable ops, with ``jax.custom_vjp`` wrappers.

Ops (channels-last, K odd, dilation d, same padding ``p``; tap ``k = kh*K + kw`` samples frame t at
``P_k = (h - p + kh*d + dy_k, w - p + kw*d + dx_k)``, ``(dy_k, dx_k) = offsets[n,t,h,w,k]``;
``S`` is the bilinear sampling of SPEC.md 2.3 -- 0 when ``py <= -1``, ``px <= -1``, ``py >= H`` or
``px >= W``, else the blend of the four corners around ``(floor(py), floor(px))`` with corners
outside the image counting 0):

* ``deformable_correlation(x, offsets, weight (T,K,K,C))`` -> ``(N,T,H,W,G*K*K)``:
  ``r[t,p,g*KK+k] = sum_{c in g} weight[t,k,c] * x[t⁻,p,c] * S(x[t,:,:,c], P_k)``;
* ``deformable_aggregation(x, offsets, attn (N,T,H,W,G*K*K))`` -> ``(N,T,H,W,G*C)``:
  ``m[t,p,g*C+c] = sum_k attn[t,p,g*KK+k] * S(x[t,:,:,c], P_k)``.

Backend: the Pallas **Triton** backend, on purpose and kept in this module only: the bilinear taps
are data-dependent row gathers, which Mosaic GPU supports only on Blackwell. When the Pallas Triton
backend is removed, this module is the only one to port (to jax-triton); callers see only the public
functions at the bottom.

Input gradient (the one scatter in this package): ``x`` receives ``coef_j * cotangent`` at the four
corners of every sampling point. Offsets are unbounded, data-dependent reals (outputs of a
convolution), so the inverse map "which (p, k) sample this pixel" has no static bound and a gather
formulation would have to scan a window as large as the largest offset (or be approximate). The
kernels therefore scatter with float32 atomic adds into a zero-initialised float32 buffer (the same
choice as the original CUDA code; run-to-run nondeterministic at rounding level). In interpret mode
the atomic is replaced by an equivalent exact scatter-add (Pallas' interpret-mode atomic drops
duplicate indices). Everything else (offset, attention and weight gradients) is a reduction written
as per-program partial sums that XLA adds up.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels import _common as cm

F32 = cm.F32


# ================================================================================================
# Block sizes.
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class DeformableTiles:
  """Block sizes of the SIFA kernels; ``for_shape`` derives the defaults from the problem shape.

  Attributes:
    block_rows: positions of the ``H*W`` plane per program (power of two).
    block_channels: channels per chunk (power of two; divides ``C/groups`` when ``groups > 1``).
    channel_splits: programs sharing one channel reduction in the correlation forward.
    num_warps: Triton warps per program.
  """
  block_rows: int
  block_channels: int
  channel_splits: int
  num_warps: int

  def __post_init__(self):
    for name in ('block_rows', 'block_channels'):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"DeformableTiles: {name}={value} must be a power of two.")
    if self.channel_splits < 1 or self.num_warps < 1:
      raise ValueError(f"DeformableTiles: channel_splits={self.channel_splits} and "
                       f"num_warps={self.num_warps} must be >= 1.")

  @classmethod
  def for_shape(cls, shape, groups: int = 1, reduce_groups: bool = True,
                min_programs: int = 264) -> 'DeformableTiles':
    """Default tiles for ``x`` of ``shape`` ``(N, T, H, W, C)``.

    ``reduce_groups``: the op reduces channels per group (correlation); then chunks must not
    straddle groups.
    """
    g = cm.Geometry.of(shape)
    group_channels, reduced = (g.channels // groups, groups) if reduce_groups else (g.channels, 1)
    block_rows, block_channels, splits, _ = cm.default_tiles(
        g.plane, g.batch, group_channels, reduced, 9, max_rows=128, budget=2048,
        min_programs=min_programs)
    return cls(block_rows, block_channels, splits, 4)

  def bands(self, g: cm.Geometry) -> int:
    return cm.cdiv(g.plane, self.block_rows)

  def chunks(self, channels: int) -> int:
    return cm.cdiv(channels, self.block_channels)


# ================================================================================================
# In-kernel bilinear sampling (SPEC.md 2.3).
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class _Corner:
  row: jax.Array      # plane index (0 where invalid)
  ok: jax.Array       # corner inside the image and sampling point inside the open range
  coef: jax.Array     # bilinear weight (0 where not ok)
  dcoef_dy: jax.Array  # d coef / d py with the cell fixed (0 where not ok)
  dcoef_dx: jax.Array


def _corners(h, w, valid, dy, dx, base_y: int, base_x: int, g: cm.Geometry, dtype):
  """The four bilinear corners of ``(h + base_y + dy, w + base_x + dx)`` for every band position."""
  py = (h + base_y).astype(dy.dtype) + dy
  px = (w + base_x).astype(dx.dtype) + dx
  inside = valid & (py > -1) & (px > -1) & (py < g.height) & (px < g.width)
  y0f = jnp.floor(py)
  x0f = jnp.floor(px)
  ly = (py - y0f).astype(dtype)
  lx = (px - x0f).astype(dtype)
  # Clip before the int cast so huge offsets cannot overflow (such points are outside anyway).
  y0 = jnp.clip(y0f, -1, g.height).astype(jnp.int32)
  x0 = jnp.clip(x0f, -1, g.width).astype(jnp.int32)
  zero = jnp.zeros_like(ly)
  out = []
  for cy in (0, 1):
    for cx in (0, 1):
      yi, xi = y0 + cy, x0 + cx
      ok = inside & (yi >= 0) & (yi < g.height) & (xi >= 0) & (xi < g.width)
      wy = ly if cy else 1 - ly
      wx = lx if cx else 1 - lx
      sy = 1 if cy else -1
      sx = 1 if cx else -1
      out.append(_Corner(row=jnp.where(ok, yi * g.width + xi, 0), ok=ok,
                         coef=jnp.where(ok, wy * wx, zero),
                         dcoef_dy=jnp.where(ok, sy * wx, zero),
                         dcoef_dx=jnp.where(ok, wy * sx, zero)))
  return out


def _tap_corners(off_ref, rows, h, w, valid, k, kernel_size, dilation, g, dtype, coord_dtype):
  """Loads the offsets of (dynamic) tap ``k`` at ``rows`` and returns its four corners."""
  _, load_column, _ = cm.loaders(coord_dtype)
  dy = load_column(off_ref, rows, 2 * k, valid)
  dx = load_column(off_ref, rows, 2 * k + 1, valid)
  p = cm.same_padding(kernel_size, dilation)
  base_y = jax.lax.div(k, kernel_size) * dilation - p
  base_x = jax.lax.rem(k, kernel_size) * dilation - p
  return _corners(h, w, valid, dy, dx, base_y, base_x, g, dtype)


class _ScatterAdd:
  """``ref[rows, chans] += values`` with duplicates accumulating: float atomics on GPU.

  Interpret mode cannot use Pallas' ``atomic_add`` (its interpret rule keeps only one of several
  updates to the same element), so there the updates are collected and applied by one exact
  scatter-add on the whole buffer in ``flush`` (one scatter also keeps the CPU compile short).
  The index and value computations are the same in both modes.
  """

  def __init__(self, ref, interpret: bool):
    self.ref = ref
    self.interpret = interpret
    self.pending = []

  def add(self, rows, chans, row_ok, chan_ok, values):
    mask = row_ok[:, None] & chan_ok[None, :]
    values = jnp.where(mask, values, jnp.zeros((), values.dtype)).astype(self.ref.dtype)
    if self.interpret:
      self.pending.append((jnp.broadcast_to(rows[:, None], values.shape),
                           jnp.broadcast_to(chans[None, :], values.shape), values))
    else:
      pl_triton.atomic_add(self.ref, (rows[:, None], chans[None, :]), values, mask=mask)

  def flush(self):
    if self.pending:
      rows, chans, values = (jnp.concatenate([p[i].reshape(-1) for p in self.pending])
                             for i in range(3))
      self.ref[...] = self.ref[...].at[rows, chans].add(values)
      self.pending = []


# ================================================================================================
# Deformable correlation.
# ================================================================================================

def _defcor_fwd_kernel(x_ref, off_ref, w_ref, o_ref, *, g: cm.Geometry, kernel_size: int,
                       dilation: int, groups: int, tiles: DeformableTiles, dtype, coord_dtype):
  """Program ``(n, band, group*splits + split)``: partial correlation over one channel split.

  Refs: ``x (R, C)``, ``offsets (R, 2KK)``, ``w (T*KK, C)``; output ``o (splits*R, G*KK)``.
  """
  load_tile, _, load_row = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc, splits = tiles.block_rows, tiles.block_channels, tiles.channel_splits
  n, band, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  group, split = gs // splits, gs % splits
  group_channels = g.channels // groups
  per_split = cm.cdiv(tiles.chunks(group_channels), splits)
  c_lo = group * group_channels
  pos, h, w, valid = cm.band(band, br, g.height, g.width)

  @pl.loop(0, g.frames)
  def _(t):
    frame = (n * g.frames + t) * g.plane
    query_rows = (n * g.frames + jnp.maximum(t - 1, 0)) * g.plane + pos

    @pl.loop(0, kk)
    def _(k):
      corners = _tap_corners(off_ref, frame + pos, h, w, valid, k, kernel_size, dilation, g,
                             dtype, coord_dtype)

      def body(i, acc):
        chans, c_ok = cm.channel_chunk(c_lo + (split * per_split + i) * bc, bc,
                                       c_lo + group_channels)
        query = load_tile(x_ref, query_rows, chans, valid, c_ok)
        sample = jnp.zeros((br, bc), dtype)
        for c in corners:
          sample += c.coef[:, None] * load_tile(x_ref, frame + c.row, chans, c.ok, c_ok)
        weight = load_row(w_ref, t * kk + k, chans, c_ok)
        return acc + jnp.sum(query * sample * weight[None, :], axis=1)

      acc = jax.lax.fori_loop(0, per_split, body, jnp.zeros((br,), dtype))
      cm.store_column(o_ref, split * g.rows + frame + band * br, group * kk + k, acc, valid)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 8)))
def _defcor_fwd_call(x, offsets, weight, kernel_size, dilation, groups, tiles, interpret):
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  splits = tiles.channel_splits
  dtype = cm.compute_dtype(x, offsets, weight)
  kernel = functools.partial(_defcor_fwd_kernel, g=g, kernel_size=kernel_size, dilation=dilation,
                             groups=groups, tiles=tiles, dtype=dtype,
                             coord_dtype=cm.compute_dtype(offsets))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits * g.rows, groups * kk),
                                     x.dtype if splits == 1 else dtype),
      grid=(g.batch, tiles.bands(g), groups * splits),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='sifa_deformable_correlation_fwd',
  )(x.reshape(g.rows, g.channels), offsets.reshape(g.rows, 2 * kk),
    weight.reshape(g.frames * kk, g.channels))
  out = out.reshape(splits, *x.shape[:4], groups * kk)
  return out.sum(axis=0, dtype=dtype).astype(x.dtype) if splits > 1 else out[0]


def _defcor_bwd_kernel(x_ref, off_ref, w_ref, dr_ref, dx_in_ref, *outs, g: cm.Geometry,
                       kernel_size: int, dilation: int, groups: int, tiles: DeformableTiles,
                       weight_grad: bool, dtype, coord_dtype, interpret: bool):
  """Program ``(n, band, split)``: all cotangents of one channel split (loops t, k, chunks).

  With ``S_k`` the sample, ``q = x[t⁻,p]`` and ``e = dr[t,p,g*KK+k] * W[t,k]``:
  ``dx[t⁻,p] += sum_k e S_k`` and ``dx[t, corner_j] += coef_j e q`` (atomic scatter-adds);
  ``doffsets[t,p,k] += sum_c e q dS_k/d(py, px)`` (split partial);
  ``dW[t,k] += sum_p dr q S_k`` (band partial).
  Refs: ``x (R,C)``, ``offsets (R,2KK)``, ``w (T*KK,C)``, ``dr (R,G*KK)``, ``dx_in`` (aliased to
  ``dx``); outputs ``dx (R,C)`` (accumulated), ``doff (splits*R, 2KK)``,
  [``dw (N*bands*T*KK, C)``].
  """
  del dx_in_ref  # Aliased with outs[0].
  dx_ref, doff_ref = outs[0], outs[1]
  load_tile, load_column, load_row = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc, splits = tiles.block_rows, tiles.block_channels, tiles.channel_splits
  per_split = cm.cdiv(tiles.chunks(g.channels), splits)
  n, band, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)

  @pl.loop(0, g.frames)
  def _(t):
    frame = (n * g.frames + t) * g.plane
    query_frame = (n * g.frames + jnp.maximum(t - 1, 0)) * g.plane
    first_dw_row = ((n * tiles.bands(g) + band) * g.frames + t) * kk

    @pl.loop(0, kk)
    def _(k):
      corners = _tap_corners(off_ref, frame + pos, h, w, valid, k, kernel_size, dilation, g,
                             dtype, coord_dtype)

      def chunk_body(i, doff):
        chunk = split * per_split + i
        chans, c_ok = cm.channel_chunk(chunk * bc, bc, g.channels)
        dr_col = (chunk * bc) // (g.channels // groups) * kk + k  # This chunk's group, tap k.
        query = load_tile(x_ref, query_frame + pos, chans, valid, c_ok)
        values = [load_tile(x_ref, frame + c.row, chans, c.ok, c_ok) for c in corners]
        sample = functools.reduce(jnp.add, [c.coef[:, None] * v for c, v in zip(corners, values)])
        dr_k = load_column(dr_ref, frame + pos, dr_col, valid)
        d_sample = dr_k[:, None] * load_row(w_ref, t * kk + k, chans, c_ok)[None, :]
        d_key = d_sample * query
        scatter = _ScatterAdd(dx_ref, interpret)
        scatter.add(query_frame + pos, chans, valid, c_ok, d_sample * sample)
        for c in corners:
          scatter.add(frame + c.row, chans, c.ok, c_ok, c.coef[:, None] * d_key)
        scatter.flush()
        if weight_grad:
          cm.store_row(outs[2], first_dw_row + k, chunk * bc,
                       jnp.sum(dr_k[:, None] * query * sample, axis=0), c_ok)
        return tuple(
            acc + jnp.sum(d_key * functools.reduce(
                jnp.add, [getattr(c, attr)[:, None] * v for c, v in zip(corners, values)]),
                          axis=1)
            for acc, attr in zip(doff, ('dcoef_dy', 'dcoef_dx')))

      doff = jax.lax.fori_loop(0, per_split, chunk_body, (jnp.zeros((br,), dtype),) * 2)
      row = split * g.rows + frame + band * br
      cm.store_column(doff_ref, row, 2 * k, doff[0], valid)
      cm.store_column(doff_ref, row, 2 * k + 1, doff[1], valid)


@functools.partial(jax.jit, static_argnums=tuple(range(4, 10)))
def _defcor_bwd_call(x, offsets, weight, dr, kernel_size, dilation, groups, tiles, weight_grad,
                     interpret):
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  splits = tiles.channel_splits
  bands = tiles.bands(g)
  dtype = cm.compute_dtype(x, offsets, weight, dr)
  out_shape = [jax.ShapeDtypeStruct((g.rows, g.channels), dtype),
               jax.ShapeDtypeStruct((splits * g.rows, 2 * kk), dtype)]
  if weight_grad:
    out_shape.append(jax.ShapeDtypeStruct((g.batch * bands * g.frames * kk, g.channels), dtype))
  kernel = functools.partial(_defcor_bwd_kernel, g=g, kernel_size=kernel_size, dilation=dilation,
                             groups=groups, tiles=tiles, weight_grad=weight_grad, dtype=dtype,
                             coord_dtype=cm.compute_dtype(offsets), interpret=interpret)
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(g.batch, bands, splits),
      input_output_aliases={4: 0},
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='sifa_deformable_correlation_bwd',
  )(x.reshape(g.rows, g.channels), offsets.reshape(g.rows, 2 * kk),
    weight.reshape(g.frames * kk, g.channels), dr.reshape(g.rows, groups * kk),
    jnp.zeros((g.rows, g.channels), dtype))
  dx = outs[0].reshape(x.shape).astype(x.dtype)
  doff = outs[1].reshape(splits, *offsets.shape).sum(axis=0).astype(offsets.dtype)
  dweight = None
  if weight_grad:
    dweight = outs[2].reshape(g.batch * bands, *weight.shape).sum(axis=0).astype(weight.dtype)
  return dx, doff, dweight


# ================================================================================================
# Deformable aggregation.
# ================================================================================================

def _defagg_fwd_kernel(x_ref, off_ref, a_ref, o_ref, *, g: cm.Geometry, kernel_size: int,
                       dilation: int, groups: int, tiles: DeformableTiles, dtype, coord_dtype):
  """Program ``(n*T + t, band, chunk)``: ``m[t,p,g*C+c] = sum_k a[t,p,g*KK+k] S_k(p, c)``.

  The samples are shared by all groups. Refs: ``x (R,C)``, ``offsets (R,2KK)``,
  ``a (R,G*KK)``; output ``o (R, G*C)``.
  """
  load_tile, load_column, _ = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc = tiles.block_rows, tiles.block_channels
  nt, band, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  chans, c_ok = cm.channel_chunk(chunk * bc, bc, g.channels)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  frame = nt * g.plane

  def tap(k, acc):
    sample = jnp.zeros((br, bc), dtype)
    for c in _tap_corners(off_ref, frame + pos, h, w, valid, k, kernel_size, dilation, g, dtype,
                          coord_dtype):
      sample += c.coef[:, None] * load_tile(x_ref, frame + c.row, chans, c.ok, c_ok)
    return tuple(acc[grp] + load_column(a_ref, frame + pos, grp * kk + k, valid)[:, None] * sample
                 for grp in range(groups))

  acc = jax.lax.fori_loop(0, kk, tap, (jnp.zeros((br, bc), dtype),) * groups)
  for grp in range(groups):
    cm.store_tile(o_ref, frame + band * br, grp * g.channels + chunk * bc, acc[grp], valid, c_ok)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 8)))
def _defagg_fwd_call(x, offsets, attn, kernel_size, dilation, groups, tiles, interpret):
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  kernel = functools.partial(_defagg_fwd_kernel, g=g, kernel_size=kernel_size, dilation=dilation,
                             groups=groups, tiles=tiles, dtype=cm.compute_dtype(x, offsets, attn),
                             coord_dtype=cm.compute_dtype(offsets))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g.rows, groups * g.channels), x.dtype),
      grid=(g.batch * g.frames, tiles.bands(g), tiles.chunks(g.channels)),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='sifa_deformable_aggregation_fwd',
  )(x.reshape(g.rows, g.channels), offsets.reshape(g.rows, 2 * kk),
    attn.reshape(g.rows, groups * kk))
  return out.reshape(*x.shape[:4], groups * g.channels)


def _defagg_bwd_kernel(x_ref, off_ref, a_ref, dm_ref, dx_in_ref, dx_ref, doff_ref, da_ref, *,
                       g: cm.Geometry, kernel_size: int, dilation: int, groups: int,
                       tiles: DeformableTiles, dtype, coord_dtype, interpret: bool):
  """Program ``(n*T + t, band, split)``: all cotangents of one channel split (loops k, chunks).

  With ``e_k = sum_g a[t,p,g*KK+k] dm[t,p,g*C+c]``: ``dx[t, corner_j] += coef_j e_k`` (atomic
  scatter); ``doffsets[t,p,k] += sum_c e_k dS_k/d(py, px)`` and
  ``da[t,p,g*KK+k] += sum_c dm[t,p,g*C+c] S_k`` (split partials).
  Refs: ``x (R,C)``, ``offsets (R,2KK)``, ``a (R,G*KK)``, ``dm (R,G*C)``, ``dx_in`` (aliased);
  outputs ``dx (R,C)``, ``doff (splits*R, 2KK)``, ``da (splits*R, G*KK)``.
  """
  del dx_in_ref
  load_tile, load_column, _ = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc, splits = tiles.block_rows, tiles.block_channels, tiles.channel_splits
  per_split = cm.cdiv(tiles.chunks(g.channels), splits)
  nt, band, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  frame = nt * g.plane
  row = split * g.rows + frame + band * br

  @pl.loop(0, kk)
  def _(k):
    corners = _tap_corners(off_ref, frame + pos, h, w, valid, k, kernel_size, dilation, g, dtype,
                           coord_dtype)
    attn = [load_column(a_ref, frame + pos, grp * kk + k, valid) for grp in range(groups)]

    def chunk_body(i, acc):
      chans, c_ok = cm.channel_chunk((split * per_split + i) * bc, bc, g.channels)
      dm = [load_tile(dm_ref, frame + pos, grp * g.channels + chans, valid, c_ok)
            for grp in range(groups)]
      values = [load_tile(x_ref, frame + c.row, chans, c.ok, c_ok) for c in corners]
      sample = functools.reduce(jnp.add, [c.coef[:, None] * v for c, v in zip(corners, values)])
      d_sample = functools.reduce(jnp.add, [a[:, None] * d for a, d in zip(attn, dm)])
      scatter = _ScatterAdd(dx_ref, interpret)
      for c in corners:
        scatter.add(frame + c.row, chans, c.ok, c_ok, c.coef[:, None] * d_sample)
      scatter.flush()
      doff = [jnp.sum(d_sample * functools.reduce(
          jnp.add, [getattr(c, attr)[:, None] * v for c, v in zip(corners, values)]), axis=1)
              for attr in ('dcoef_dy', 'dcoef_dx')]
      dattn = [jnp.sum(d * sample, axis=1) for d in dm]
      return tuple(a + b for a, b in zip(acc, doff + dattn))

    acc = jax.lax.fori_loop(0, per_split, chunk_body, (jnp.zeros((br,), dtype),) * (2 + groups))
    cm.store_column(doff_ref, row, 2 * k, acc[0], valid)
    cm.store_column(doff_ref, row, 2 * k + 1, acc[1], valid)
    for grp in range(groups):
      cm.store_column(da_ref, row, grp * kk + k, acc[2 + grp], valid)


@functools.partial(jax.jit, static_argnums=tuple(range(4, 9)))
def _defagg_bwd_call(x, offsets, attn, dm, kernel_size, dilation, groups, tiles, interpret):
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  splits = tiles.channel_splits
  dtype = cm.compute_dtype(x, offsets, attn, dm)
  kernel = functools.partial(_defagg_bwd_kernel, g=g, kernel_size=kernel_size, dilation=dilation,
                             groups=groups, tiles=tiles, dtype=dtype,
                             coord_dtype=cm.compute_dtype(offsets), interpret=interpret)
  dx, doff, da = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((g.rows, g.channels), dtype),
                 jax.ShapeDtypeStruct((splits * g.rows, 2 * kk), dtype),
                 jax.ShapeDtypeStruct((splits * g.rows, groups * kk), dtype)),
      grid=(g.batch * g.frames, tiles.bands(g), splits),
      input_output_aliases={4: 0},
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='sifa_deformable_aggregation_bwd',
  )(x.reshape(g.rows, g.channels), offsets.reshape(g.rows, 2 * kk),
    attn.reshape(g.rows, groups * kk), dm.reshape(g.rows, groups * g.channels),
    jnp.zeros((g.rows, g.channels), dtype))
  return (dx.reshape(x.shape).astype(x.dtype),
          doff.reshape(splits, *offsets.shape).sum(axis=0).astype(offsets.dtype),
          da.reshape(splits, *attn.shape).sum(axis=0).astype(attn.dtype))


# ================================================================================================
# custom_vjp wrappers (static knobs are non-differentiable arguments).
# ================================================================================================

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _deformable_correlation(x, offsets, weight, kernel_size, dilation, groups, tiles, interpret):
  return _defcor_fwd_call(x, offsets, weight, kernel_size, dilation, groups, tiles, interpret)


def _deformable_correlation_fwd(x, offsets, weight, kernel_size, dilation, groups, tiles,
                                interpret):
  out = _defcor_fwd_call(x.value, offsets.value, weight.value, kernel_size, dilation, groups,
                         tiles, interpret)
  return out, (x.value, offsets.value, weight.value, () if weight.perturbed else None)


def _deformable_correlation_bwd(kernel_size, dilation, groups, tiles, interpret, res, dr):
  x, offsets, weight, weight_perturbed = res
  if isinstance(dr, SymbolicZero):
    dr = jnp.zeros((*x.shape[:4], groups * kernel_size ** 2), x.dtype)
  return _defcor_bwd_call(x, offsets, weight, dr, kernel_size, dilation, groups, tiles,
                          weight_perturbed is not None, interpret)


_deformable_correlation.defvjp(_deformable_correlation_fwd, _deformable_correlation_bwd,
                               symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _deformable_aggregation(x, offsets, attn, kernel_size, dilation, groups, tiles, interpret):
  return _defagg_fwd_call(x, offsets, attn, kernel_size, dilation, groups, tiles, interpret)


def _deformable_aggregation_fwd(x, offsets, attn, kernel_size, dilation, groups, tiles,
                                interpret):
  out = _defagg_fwd_call(x, offsets, attn, kernel_size, dilation, groups, tiles, interpret)
  return out, (x, offsets, attn)


def _deformable_aggregation_bwd(kernel_size, dilation, groups, tiles, interpret, res, dm):
  x, offsets, attn = res
  return _defagg_bwd_call(x, offsets, attn, dm, kernel_size, dilation, groups, tiles, interpret)


_deformable_aggregation.defvjp(_deformable_aggregation_fwd, _deformable_aggregation_bwd)


# ================================================================================================
# Public entry points (same arrays and knobs as dtf_jax.ops.reference, plus interpret/tiles).
# ================================================================================================

def deformable_correlation(x, offsets, weight, *, kernel_size: int = 3, dilation: int = 1,
                           groups: int = 1, interpret: bool = False,
                           tiles: DeformableTiles | None = None):
  """SIFA deformable correlation (SPEC.md 2.4, stride 1), Pallas Triton kernels.

  Args:
    x: ``(N, T, H, W, C)``.
    offsets: ``(N, T, H, W, K*K, 2)`` as ``(dy, dx)`` in pixels.
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1. groups: G dividing C.
    interpret: Pallas interpret mode (CPU).
    tiles: block sizes; default ``DeformableTiles.for_shape(x.shape, groups)``.

  Returns:
    ``(N, T, H, W, G*K*K)`` in ``x.dtype``.
  """
  if tiles is None:
    tiles = DeformableTiles.for_shape(x.shape, groups)
  cm.check_group_chunks('deformable_correlation', x.shape, groups, tiles.block_channels)
  return _deformable_correlation(x, offsets, weight, kernel_size, dilation, groups, tiles,
                                 interpret)


def deformable_aggregation(x, offsets, attn, *, kernel_size: int = 3, dilation: int = 1,
                           groups: int = 1, interpret: bool = False,
                           tiles: DeformableTiles | None = None):
  """SIFA deformable aggregation (SPEC.md 2.5, stride 1), Pallas Triton kernels.

  Args:
    x: ``(N, T, H, W, C)``.
    offsets: ``(N, T, H, W, K*K, 2)`` as ``(dy, dx)``.
    attn: ``(N, T, H, W, G*K*K)``.
    kernel_size: K (odd). dilation: d >= 1. groups: G >= 1.
    interpret: Pallas interpret mode. tiles: block sizes (default from the shape).

  Returns:
    ``(N, T, H, W, G*C)`` in ``x.dtype``.
  """
  if tiles is None:
    tiles = DeformableTiles.for_shape(x.shape, groups, reduce_groups=False)
  return _deformable_aggregation(x, offsets, attn, kernel_size, dilation, groups, tiles,
                                 interpret)
