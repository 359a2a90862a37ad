"""Pallas kernels for the DTF fixed-stencil ops, with ``jax.custom_vjp`` wrappers.

Ops (channels-last, K odd, dilation d, same padding ``p = (d(K-1)+1)//2``, taps ``k = kh*K + kw``
at displacement ``(kh*d - p, kw*d - p)``, ``t⁻ = max(t-1, 0)``, zero padding):

* ``temporal_correlation(x (N,T,H,W,C), weight (T,K,K,C))`` -> ``(N,T,H,W,G*K*K)``:
  ``r[t,p,g*KK+k] = sum_{c in g} weight[t,k,c] * x[t⁻,p,c] * x̂[t,p+δ_k,c]``;
* ``temporal_aggregation(x, attn (N,T,H,W,K*K))`` -> ``(N,T,H,W,C)``:
  ``m[t,p,c] = sum_k attn[t,p,k] * x̂[t,p+δ_k,c]``;
* ``frame_wise_aggregation(x, weight)`` -> ``(u, r)``: steps 1-4 of the DTF block (SPEC.md 3.2)
  in one kernel: ``r`` = correlation, ``a = softmax_k(r)``, ``m_t = aggregation(x_t, a_t)``,
  ``u_t = x_t + m_{t+1}`` (``t < T-1``), ``u_{T-1} = x_{T-1}``.

Backend: the Pallas **Triton** backend (see kernels/README.md for why not Mosaic GPU). Every
kernel views ``(N, T, H, W, C)`` as ``(N*T*H*W, C)``; a program owns a band of ``block_rows``
positions of one frame plane (``kernels._common``) and vectorises over ``block_channels``
contiguous channels. Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype.

Backward passes use only gathers (no atomics): the input gradient of a fixed stencil is itself a
stencil over the output cotangent (position ``p'`` collects the taps ``p' - δ_k`` that read it).
Reductions over channels (correlation output, aggregation-weight gradient) or over positions
(correlation-weight gradient) write per-program float32 partial sums that XLA adds up; they are
``K*K/C`` times smaller than ``x`` (or ``T*K*K*C`` per band), so they cost little traffic and buy
parallelism and determinism.

Interpret mode (``interpret=True``) runs the same kernel bodies on CPU; that is how the tests prove
them against the XLA reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl

from kernels import _common as cm

F32 = cm.F32


# ================================================================================================
# Block sizes.
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class LocalTiles:
  """Block sizes of the DTF kernels; ``for_shape`` derives the defaults from the problem shape.

  Attributes:
    block_rows: positions of the ``H*W`` plane per program (a power of two; the whole frame when
      ``H*W <= 512`` and the grid is large enough).
    block_channels: channels per vector chunk (a power of two; divides ``C/groups`` when
      ``groups > 1``).
    channel_splits: programs that share one channel reduction (correlation forward, aggregation
      weight gradient); their float32 partial sums are added by XLA. Chosen to give the GPU at least
      ~2 waves of programs on 132 SMs.
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
        raise ValueError(f"LocalTiles: {name}={value} must be a power of two (Triton blocks).")
    if self.channel_splits < 1 or self.num_warps < 1:
      raise ValueError(f"LocalTiles: channel_splits={self.channel_splits} and "
                       f"num_warps={self.num_warps} must be >= 1.")

  @classmethod
  def for_shape(cls, shape, groups: int = 1, min_programs: int = 264) -> 'LocalTiles':
    """Default tiles for a feature map of ``shape`` ``(N, T, H, W, C)``."""
    g = cm.Geometry.of(shape)
    return cls(*cm.default_tiles(g.plane, g.batch, g.channels // groups, groups, 9,
                                 max_rows=512, budget=8192, min_programs=min_programs))

  def bands(self, g: cm.Geometry) -> int:
    return cm.cdiv(g.plane, self.block_rows)

  def chunks(self, channels: int) -> int:
    return cm.cdiv(channels, self.block_channels)


def _tiles(x_shape, groups: int, tiles: LocalTiles | None) -> LocalTiles:
  return LocalTiles.for_shape(x_shape, groups) if tiles is None else tiles


def _tap_source(h, w, valid, k, kernel_size: int, dilation: int, g: cm.Geometry, sign: int = 1):
  """``(plane index, mask)`` of ``p + sign*δ_k`` for a (traced) tap ``k``."""
  dy, dx = cm.tap_offset(k, kernel_size, dilation)
  return cm.shifted(h, w, valid, sign * dy, sign * dx, g.height, g.width)


# ================================================================================================
# Temporal correlation: forward.
# ================================================================================================

def _correlation_fwd_kernel(x_ref, w_ref, o_ref, *, g: cm.Geometry, kernel_size: int,
                            dilation: int, groups: int, tiles: LocalTiles, dtype):
  """Program ``(n, band, group*splits + split)``: partial correlation of one channel split.

  Loops: frames t, taps k, channel chunks of the split (a ``(block_rows,)`` accumulator).
  Refs: ``x (R, C)``, ``w (T*KK, C)``, ``o (splits*R, G*KK)``.
  """
  load_tile, _, load_row = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc, splits = tiles.block_rows, tiles.block_channels, tiles.channel_splits
  n, band, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  group, split = gs // splits, gs % splits
  group_channels = g.channels // groups
  per_split = cm.cdiv(tiles.chunks(group_channels), splits)
  c_lo = group * group_channels
  c_hi = c_lo + group_channels
  pos, h, w, valid = cm.band(band, br, g.height, g.width)

  @pl.loop(0, g.frames)
  def _(t):
    query_rows = (n * g.frames + jnp.maximum(t - 1, 0)) * g.plane + pos
    key_base = (n * g.frames + t) * g.plane

    @pl.loop(0, kk)
    def _(k):
      src, ok = _tap_source(h, w, valid, k, kernel_size, dilation, g)

      def body(i, acc):
        chans, c_ok = cm.channel_chunk(c_lo + (split * per_split + i) * bc, bc, c_hi)
        query = load_tile(x_ref, query_rows, chans, valid, c_ok)
        key = load_tile(x_ref, key_base + src, chans, ok, c_ok)
        weight = load_row(w_ref, t * kk + k, chans, c_ok)
        return acc + jnp.sum(query * key * weight[None, :], axis=1)

      acc = jax.lax.fori_loop(0, per_split, body, jnp.zeros((br,), dtype))
      cm.store_column(o_ref, split * g.rows + key_base + band * br, group * kk + k, acc, valid)


@functools.partial(jax.jit, static_argnums=tuple(range(2, 7)))
def _correlation_fwd_call(x, weight, kernel_size, dilation, groups, tiles, interpret):
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  splits = tiles.channel_splits
  dtype = cm.compute_dtype(x, weight)
  out_dtype = x.dtype if splits == 1 else dtype
  kernel = functools.partial(_correlation_fwd_kernel, g=g, kernel_size=kernel_size,
                             dilation=dilation, groups=groups, tiles=tiles, dtype=dtype)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits * g.rows, groups * kk), out_dtype),
      grid=(g.batch, tiles.bands(g), groups * splits),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='dtf_temporal_correlation_fwd',
  )(x.reshape(g.rows, g.channels), weight.reshape(g.frames * kk, g.channels))
  out = out.reshape(splits, g.batch, g.frames, g.height, g.width, groups * kk)
  return out.sum(axis=0, dtype=dtype).astype(x.dtype) if splits > 1 else out[0]


# ================================================================================================
# Temporal correlation: backward (input gradient by gathers, weight gradient by band partials).
# Shared with the fused frame-wise aggregation, which adds two more input-gradient terms.
# ================================================================================================

def _correlation_bwd_kernel(*refs, g: cm.Geometry, kernel_size: int, dilation: int, groups: int,
                            tiles: LocalTiles, fused: bool, weight_grad: bool, dtype):
  """Program ``(n, band, chunk)``: input gradient of one channel chunk, all frames.

  Correlation terms (``dr`` the output cotangent, ``W`` the weight):
    ``dx[s,p] += sum_k W[s,k] dr[s,p-δ_k,k] x[s⁻,p-δ_k]``       (keys of frame s),
    ``dx[s,p] += sum_k W[s+1,k] dr[s+1,p,k] x[s+1,p+δ_k]``       (query of frame s+1),
    ``dx[0,p] += sum_k W[0,k] dr[0,p,k] x[0,p+δ_k]``             (self-correlation of frame 0).
  Fused frame-wise aggregation adds ``du[s,p] + sum_k a[s,p-δ_k,k] du[s-1,p-δ_k]`` (s >= 1).
  Weight gradient (optional): ``dW[t,k] += sum_{p in band} dr[t,p,k] x[t⁻,p] x̂[t,p+δ_k]``.

  Refs: ``x (R, C)``, ``w (T*KK, C)``, ``dr (R, G*KK)``, [fused: ``du (R, C)``, ``a (R, KK)``],
  outputs ``dx (R, C)``, [``dw_partial (N*bands*T*KK, C)``].
  """
  if fused:
    x_ref, w_ref, dr_ref, du_ref, a_ref, *outs = refs
  else:
    x_ref, w_ref, dr_ref, *outs = refs
  dx_ref = outs[0]
  load_tile, load_column, load_row = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc = tiles.block_rows, tiles.block_channels
  n, band, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  chans, c_ok = cm.channel_chunk(chunk * bc, bc, g.channels)
  dr_col = (chunk * bc) // (g.channels // groups) * kk  # First column of this chunk's group.
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  frame = lambda t: (n * g.frames + t) * g.plane
  tile = lambda t, src, ok: load_tile(x_ref, frame(t) + src, chans, ok, c_ok)
  weight_row = lambda t, k: load_row(w_ref, t * kk + k, chans, c_ok)
  dr_column = lambda t, src, ok, k: load_column(dr_ref, frame(t) + src, dr_col + k, ok)
  source = lambda k, sign: _tap_source(h, w, valid, k, kernel_size, dilation, g, sign)

  @pl.loop(0, g.frames)
  def _(s):
    previous = jnp.maximum(s - 1, 0)

    def keys_of_s(k, acc):
      src, ok = source(k, -1)
      return acc + weight_row(s, k)[None, :] * (dr_column(s, src, ok, k)[:, None]
                                                * tile(previous, src, ok))

    acc = jax.lax.fori_loop(0, kk, keys_of_s, jnp.zeros((br, bc), dtype))
    # Frame s is the query of frame s+1 (if any) and, for s = 0, of frame 0 itself. Masked-off
    # loads (the wrong s) move no data.
    for t, use in ((jnp.minimum(s + 1, g.frames - 1), s + 1 < g.frames), (0, s == 0)):
      def query_of_t(k, acc, t=t, use=use):
        src, ok = source(k, +1)
        return acc + weight_row(t, k)[None, :] * (dr_column(t, pos, valid & use, k)[:, None]
                                                  * tile(t, src, ok & use))
      acc = jax.lax.fori_loop(0, kk, query_of_t, acc)
    if fused:
      acc += load_tile(du_ref, frame(s) + pos, chans, valid, c_ok)

      def aggregation_of_s(k, acc):  # u_{s-1} = x_{s-1} + m_s: m_s's cotangent is du_{s-1}.
        src, ok = source(k, -1)
        ok = ok & (s >= 1)
        attn = load_column(a_ref, frame(s) + src, k, ok)
        return acc + attn[:, None] * load_tile(du_ref, frame(previous) + src, chans, ok, c_ok)

      acc = jax.lax.fori_loop(0, kk, aggregation_of_s, acc)
    cm.store_tile(dx_ref, frame(s) + band * br, chunk * bc, acc, valid, c_ok)

  if weight_grad:
    @pl.loop(0, g.frames)
    def _(t):
      query = tile(jnp.maximum(t - 1, 0), pos, valid)
      first_row = ((n * tiles.bands(g) + band) * g.frames + t) * kk

      @pl.loop(0, kk)
      def _(k):
        src, ok = source(k, +1)
        vec = jnp.sum(dr_column(t, pos, valid, k)[:, None] * query * tile(t, src, ok), axis=0)
        cm.store_row(outs[1], first_row + k, chunk * bc, vec, c_ok)


@functools.partial(jax.jit, static_argnums=tuple(range(5, 11)))
def _correlation_bwd_call(x, weight, dr, du, attn, kernel_size, dilation, groups, tiles,
                          weight_grad, interpret):
  """Returns ``(dx, dweight or None)``; ``du``/``attn`` (both or neither) select the fused terms."""
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  fused = du is not None
  bands = tiles.bands(g)
  dtype = cm.compute_dtype(x, weight, dr)
  args = [x.reshape(g.rows, g.channels), weight.reshape(g.frames * kk, g.channels),
          dr.reshape(g.rows, groups * kk)]
  if fused:
    args += [du.reshape(g.rows, g.channels), attn.reshape(g.rows, kk)]
  out_shape = [jax.ShapeDtypeStruct((g.rows, g.channels), x.dtype)]
  if weight_grad:
    out_shape.append(jax.ShapeDtypeStruct((g.batch * bands * g.frames * kk, g.channels), dtype))
  kernel = functools.partial(_correlation_bwd_kernel, g=g, kernel_size=kernel_size,
                             dilation=dilation, groups=groups, tiles=tiles, fused=fused,
                             weight_grad=weight_grad, dtype=dtype)
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(g.batch, bands, tiles.chunks(g.channels)),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='dtf_frame_wise_aggregation_bwd' if fused else 'dtf_temporal_correlation_bwd',
  )(*args)
  dx = outs[0].reshape(x.shape)
  dweight = None
  if weight_grad:
    dweight = outs[1].reshape(g.batch * bands, *weight.shape).sum(axis=0).astype(weight.dtype)
  return dx, dweight


# ================================================================================================
# Temporal aggregation: forward and backward.
# ================================================================================================

def _aggregation_fwd_kernel(x_ref, a_ref, o_ref, *, g: cm.Geometry, kernel_size: int,
                            dilation: int, tiles: LocalTiles, dtype):
  """Program ``(n*T + t, band, chunk)``: ``m[t,p] = sum_k a[t,p,k] x̂[t,p+δ_k]``."""
  load_tile, load_column, _ = cm.loaders(dtype)
  br, bc = tiles.block_rows, tiles.block_channels
  nt, band, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  chans, c_ok = cm.channel_chunk(chunk * bc, bc, g.channels)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  base = nt * g.plane

  def tap(k, acc):
    src, ok = _tap_source(h, w, valid, k, kernel_size, dilation, g)
    attn = load_column(a_ref, base + pos, k, valid)
    return acc + attn[:, None] * load_tile(x_ref, base + src, chans, ok, c_ok)

  acc = jax.lax.fori_loop(0, kernel_size * kernel_size, tap, jnp.zeros((br, bc), dtype))
  cm.store_tile(o_ref, base + band * br, chunk * bc, acc, valid, c_ok)


@functools.partial(jax.jit, static_argnums=tuple(range(2, 6)))
def _aggregation_fwd_call(x, attn, kernel_size, dilation, tiles, interpret):
  g = cm.Geometry.of(x.shape)
  kernel = functools.partial(_aggregation_fwd_kernel, g=g, kernel_size=kernel_size,
                             dilation=dilation, tiles=tiles, dtype=cm.compute_dtype(x, attn))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g.rows, g.channels), x.dtype),
      grid=(g.batch * g.frames, tiles.bands(g), tiles.chunks(g.channels)),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='dtf_temporal_aggregation_fwd',
  )(x.reshape(g.rows, g.channels), attn.reshape(g.rows, kernel_size * kernel_size))
  return out.reshape(x.shape)


def _aggregation_bwd_kernel(x_ref, a_ref, dm_ref, dx_ref, da_ref, *, g: cm.Geometry,
                            kernel_size: int, dilation: int, tiles: LocalTiles, dtype):
  """Program ``(n*T + t, band, chunk)``.

  ``dx[t,p] = sum_k a[t,p-δ_k,k] dm[t,p-δ_k]`` (gather) and the chunk's partial
  ``da[t,p,k] = sum_{c in chunk} dm[t,p,c] x̂[t,p+δ_k,c]``.
  Refs: ``x, dm (R, C)``, ``a (R, KK)``; outputs ``dx (R, C)``, ``da (chunks*R, KK)``.
  """
  load_tile, load_column, _ = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc = tiles.block_rows, tiles.block_channels
  nt, band, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  chans, c_ok = cm.channel_chunk(chunk * bc, bc, g.channels)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  base = nt * g.plane

  def gather(k, dx):
    src, ok = _tap_source(h, w, valid, k, kernel_size, dilation, g, -1)
    attn = load_column(a_ref, base + src, k, ok)
    return dx + attn[:, None] * load_tile(dm_ref, base + src, chans, ok, c_ok)

  dx = jax.lax.fori_loop(0, kk, gather, jnp.zeros((br, bc), dtype))
  cm.store_tile(dx_ref, base + band * br, chunk * bc, dx, valid, c_ok)
  dm = load_tile(dm_ref, base + pos, chans, valid, c_ok)

  @pl.loop(0, kk)
  def _(k):
    src, ok = _tap_source(h, w, valid, k, kernel_size, dilation, g)
    da = jnp.sum(dm * load_tile(x_ref, base + src, chans, ok, c_ok), axis=1)
    cm.store_column(da_ref, chunk * g.rows + base + band * br, k, da, valid)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 7)))
def _aggregation_bwd_call(x, attn, dm, kernel_size, dilation, tiles, interpret):
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  chunks = tiles.chunks(g.channels)
  dtype = cm.compute_dtype(x, attn, dm)
  kernel = functools.partial(_aggregation_bwd_kernel, g=g, kernel_size=kernel_size,
                             dilation=dilation, tiles=tiles, dtype=dtype)
  dx, da = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((g.rows, g.channels), x.dtype),
                 jax.ShapeDtypeStruct((chunks * g.rows, kk), dtype)),
      grid=(g.batch * g.frames, tiles.bands(g), chunks),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='dtf_temporal_aggregation_bwd',
  )(x.reshape(g.rows, g.channels), attn.reshape(g.rows, kk), dm.reshape(g.rows, g.channels))
  da = da.reshape(chunks, *attn.shape).sum(axis=0)
  return dx.reshape(x.shape), da.astype(attn.dtype)


# ================================================================================================
# Fused frame-wise aggregation (DTF block steps 1-4): forward.
# ================================================================================================

def _frame_wise_fwd_kernel(x_ref, w_ref, u_ref, r_ref, *, g: cm.Geometry, kernel_size: int,
                           dilation: int, tiles: LocalTiles, dtype):
  """Program ``(n, band)``: all frames of one band, frame by frame.

  For each t: pass 1 (taps x channel chunks) computes ``r[t,p,k] = sum_c W[t,k,c] x[t⁻,p,c]
  x̂[t,p+δ_k,c]`` and keeps the K*K values of each position in registers; the softmax over taps
  stays in registers; pass 2 (channel chunks x taps) writes ``u[t-1,p] = x[t-1,p] +
  sum_k a[t,p,k] x̂[t,p+δ_k]`` (t >= 1), re-reading the two frames pass 1 just read (L1/L2 hits).
  Finally ``u[T-1] = x[T-1]``.
  Refs: ``x (R, C)``, ``w (T*KK, C)``; outputs ``u (R, C)``, ``r (R, KK)`` (compute dtype).
  """
  load_tile, _, load_row = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc = tiles.block_rows, tiles.block_channels
  chunks = tiles.chunks(g.channels)
  n, band = pl.program_id(0), pl.program_id(1)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  frame = lambda t: (n * g.frames + t) * g.plane
  chunk = lambda i: cm.channel_chunk(i * bc, bc, g.channels)
  source = lambda k: _tap_source(h, w, valid, k, kernel_size, dilation, g)

  @pl.loop(0, g.frames)
  def _(t):
    previous = frame(jnp.maximum(t - 1, 0))

    def correlate_tap(k, raw):
      src, ok = source(k)

      def body(i, acc):
        chans, c_ok = chunk(i)
        query = load_tile(x_ref, previous + pos, chans, valid, c_ok)
        key = load_tile(x_ref, frame(t) + src, chans, ok, c_ok)
        weight = load_row(w_ref, t * kk + k, chans, c_ok)
        return acc + jnp.sum(query * key * weight[None, :], axis=1)

      value = jax.lax.fori_loop(0, chunks, body, jnp.zeros((br,), dtype))
      cm.store_column(r_ref, frame(t) + band * br, k, value, valid)
      return tuple(jnp.where(k == j, value, old) for j, old in enumerate(raw))

    raw = jax.lax.fori_loop(0, kk, correlate_tap, (jnp.zeros((br,), dtype),) * kk)
    peak = functools.reduce(jnp.maximum, raw)
    expo = [jnp.exp(v - peak) for v in raw]
    inv = 1.0 / functools.reduce(jnp.add, expo)
    attn = [e * inv for e in expo]

    @pl.when(t >= 1)
    def _():
      def aggregate(i, carry):
        chans, c_ok = chunk(i)

        def tap(k, u):
          src, ok = source(k)
          return u + cm.select(attn, k)[:, None] * load_tile(x_ref, frame(t) + src, chans, ok,
                                                              c_ok)

        u = jax.lax.fori_loop(0, kk, tap, load_tile(x_ref, previous + pos, chans, valid, c_ok))
        cm.store_tile(u_ref, previous + band * br, i * bc, u, valid, c_ok)
        return carry

      jax.lax.fori_loop(0, chunks, aggregate, 0)

  def copy_last(i, carry):
    chans, c_ok = chunk(i)
    last = load_tile(x_ref, frame(g.frames - 1) + pos, chans, valid, c_ok)
    cm.store_tile(u_ref, frame(g.frames - 1) + band * br, i * bc, last, valid, c_ok)
    return carry

  jax.lax.fori_loop(0, chunks, copy_last, 0)


@functools.partial(jax.jit, static_argnums=tuple(range(2, 6)))
def _frame_wise_fwd_call(x, weight, kernel_size, dilation, tiles, interpret):
  """Returns ``(u, r_f32)``."""
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  dtype = cm.compute_dtype(x, weight)
  kernel = functools.partial(_frame_wise_fwd_kernel, g=g, kernel_size=kernel_size,
                             dilation=dilation, tiles=tiles, dtype=dtype)
  u, r = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((g.rows, g.channels), x.dtype),
                 jax.ShapeDtypeStruct((g.rows, kk), dtype)),
      grid=(g.batch, tiles.bands(g)),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='dtf_frame_wise_aggregation_fwd',
  )(x.reshape(g.rows, g.channels), weight.reshape(g.frames * kk, g.channels))
  return u.reshape(x.shape), r.reshape(*x.shape[:4], kk)


# ================================================================================================
# Fused frame-wise aggregation: backward, part 1 (aggregation-weight gradient).
# ================================================================================================

def _frame_wise_attn_grad_kernel(x_ref, du_ref, da_ref, *, g: cm.Geometry, kernel_size: int,
                                 dilation: int, tiles: LocalTiles, dtype):
  """Program ``(n, band, split)``: ``da[t,p,k] = sum_c du[t-1,p,c] x̂[t,p+δ_k,c]`` (t >= 1; 0 at t=0).

  ``m_t`` feeds ``u_{t-1}``, so the aggregation cotangent of frame t is ``du[t-1]``.
  Refs: ``x, du (R, C)``; output ``da (splits*R, KK)``: partial sums over channel splits.
  """
  load_tile, _, _ = cm.loaders(dtype)
  kk = kernel_size * kernel_size
  br, bc, splits = tiles.block_rows, tiles.block_channels, tiles.channel_splits
  per_split = cm.cdiv(tiles.chunks(g.channels), splits)
  n, band, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pos, h, w, valid = cm.band(band, br, g.height, g.width)
  frame = lambda t: (n * g.frames + t) * g.plane
  row = lambda t: split * g.rows + frame(t) + band * br

  @pl.loop(0, kk)
  def _(k):
    cm.store_column(da_ref, row(0), k, jnp.zeros((br,), dtype), valid)

  @pl.loop(1, g.frames)
  def _(t):
    @pl.loop(0, kk)
    def _(k):
      src, ok = _tap_source(h, w, valid, k, kernel_size, dilation, g)

      def body(i, acc):
        chans, c_ok = cm.channel_chunk((split * per_split + i) * bc, bc, g.channels)
        dm = load_tile(du_ref, frame(t - 1) + pos, chans, valid, c_ok)
        return acc + jnp.sum(dm * load_tile(x_ref, frame(t) + src, chans, ok, c_ok), axis=1)

      da = jax.lax.fori_loop(0, per_split, body, jnp.zeros((br,), dtype))
      cm.store_column(da_ref, row(t), k, da, valid)


@functools.partial(jax.jit, static_argnums=tuple(range(5, 10)))
def _frame_wise_bwd(x, weight, raw, du, dr, kernel_size, dilation, tiles, weight_grad,
                    interpret):
  """Cotangents ``(dx, dweight or None)`` of ``(u, r) = frame_wise_aggregation(x, weight)``."""
  g = cm.Geometry.of(x.shape)
  kk = kernel_size * kernel_size
  splits = tiles.channel_splits
  dtype = cm.compute_dtype(x, weight, du)
  kernel = functools.partial(_frame_wise_attn_grad_kernel, g=g, kernel_size=kernel_size,
                             dilation=dilation, tiles=tiles, dtype=dtype)
  da = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits * g.rows, kk), dtype),
      grid=(g.batch, tiles.bands(g), splits),
      interpret=interpret,
      compiler_params=cm.triton_params(tiles.num_warps),
      name='dtf_frame_wise_aggregation_attn_bwd',
  )(x.reshape(g.rows, g.channels), du.reshape(g.rows, g.channels))
  da = da.reshape(splits, *raw.shape).sum(axis=0)
  # Softmax backward on K*K values per position (tiny, left to XLA).
  attn = jax.nn.softmax(raw, axis=-1)
  dr_total = dr.astype(dtype) + attn * (da - jnp.sum(attn * da, axis=-1, keepdims=True))
  return _correlation_bwd_call(x, weight, dr_total, du, attn, kernel_size, dilation, 1, tiles,
                               weight_grad, interpret)


# ================================================================================================
# custom_vjp wrappers (static knobs are non-differentiable arguments).
# ================================================================================================

def _zeros_if_symbolic(ct, like_shape, dtype):
  return jnp.zeros(like_shape, dtype) if isinstance(ct, SymbolicZero) else ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _temporal_correlation(x, weight, kernel_size, dilation, groups, tiles, interpret):
  return _correlation_fwd_call(x, weight, kernel_size, dilation, groups, tiles, interpret)


def _temporal_correlation_fwd(x, weight, kernel_size, dilation, groups, tiles, interpret):
  out = _correlation_fwd_call(x.value, weight.value, kernel_size, dilation, groups, tiles,
                              interpret)
  return out, (x.value, weight.value, () if weight.perturbed else None)


def _temporal_correlation_bwd(kernel_size, dilation, groups, tiles, interpret, res, dr):
  x, weight, weight_perturbed = res
  g = cm.Geometry.of(x.shape)
  dr = _zeros_if_symbolic(dr, (*x.shape[:4], groups * kernel_size ** 2), x.dtype)
  dx, dweight = _correlation_bwd_call(x, weight, dr, None, None, kernel_size, dilation, groups,
                                      tiles, weight_perturbed is not None, interpret)
  del g
  return dx, dweight


_temporal_correlation.defvjp(_temporal_correlation_fwd, _temporal_correlation_bwd,
                             symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _temporal_aggregation(x, attn, kernel_size, dilation, tiles, interpret):
  return _aggregation_fwd_call(x, attn, kernel_size, dilation, tiles, interpret)


def _temporal_aggregation_fwd(x, attn, kernel_size, dilation, tiles, interpret):
  return _aggregation_fwd_call(x, attn, kernel_size, dilation, tiles, interpret), (x, attn)


def _temporal_aggregation_bwd(kernel_size, dilation, tiles, interpret, res, dm):
  x, attn = res
  return _aggregation_bwd_call(x, attn, dm, kernel_size, dilation, tiles, interpret)


_temporal_aggregation.defvjp(_temporal_aggregation_fwd, _temporal_aggregation_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _frame_wise_aggregation(x, weight, kernel_size, dilation, tiles, interpret):
  u, raw = _frame_wise_fwd_call(x, weight, kernel_size, dilation, tiles, interpret)
  return u, raw.astype(x.dtype)


def _frame_wise_aggregation_fwd(x, weight, kernel_size, dilation, tiles, interpret):
  u, raw = _frame_wise_fwd_call(x.value, weight.value, kernel_size, dilation, tiles, interpret)
  res = (x.value, weight.value, raw, () if weight.perturbed else None)
  return (u, raw.astype(x.value.dtype)), res


def _frame_wise_aggregation_bwd(kernel_size, dilation, tiles, interpret, res, cts):
  x, weight, raw, weight_perturbed = res
  du, dr = cts
  du = _zeros_if_symbolic(du, x.shape, x.dtype)
  dr = _zeros_if_symbolic(dr, raw.shape, raw.dtype)
  return _frame_wise_bwd(x, weight, raw, du, dr, kernel_size, dilation, tiles,
                         weight_perturbed is not None, interpret)


_frame_wise_aggregation.defvjp(_frame_wise_aggregation_fwd, _frame_wise_aggregation_bwd,
                               symbolic_zeros=True)


# ================================================================================================
# Public entry points (same arrays and knobs as dtf_jax.ops.reference, plus interpret/tiles).
# ================================================================================================

def temporal_correlation(x, weight, *, kernel_size: int = 3, dilation: int = 1, groups: int = 1,
                         interpret: bool = False, tiles: LocalTiles | None = None):
  """DTF temporal correlation (SPEC.md 2.1), Pallas kernels.

  Args:
    x: ``(N, T, H, W, C)`` float32/bfloat16/float16 (float64 in interpret mode).
    weight: ``(T, K, K, C)``.
    kernel_size: K (odd). dilation: d >= 1. groups: G dividing C.
    interpret: run the kernels in Pallas interpret mode (CPU).
    tiles: block sizes; default ``LocalTiles.for_shape(x.shape, groups)``.

  Returns:
    ``(N, T, H, W, G*K*K)`` in ``x.dtype`` (float32 accumulation), last axis ``g*K*K + k``.
  """
  tiles = _tiles(x.shape, groups, tiles)
  cm.check_group_chunks('temporal_correlation', x.shape, groups, tiles.block_channels)
  return _temporal_correlation(x, weight, kernel_size, dilation, groups, tiles, interpret)


def temporal_aggregation(x, attn, *, kernel_size: int = 3, dilation: int = 1,
                         interpret: bool = False, tiles: LocalTiles | None = None):
  """DTF aggregation (SPEC.md 2.2, one head), Pallas kernels.

  Args:
    x: ``(N, T, H, W, C)``.
    attn: ``(N, T, H, W, K*K)``.
    kernel_size: K (odd). dilation: d >= 1.
    interpret: Pallas interpret mode. tiles: block sizes (default from the shape).

  Returns:
    ``(N, T, H, W, C)`` in ``x.dtype``.
  """
  tiles = _tiles(x.shape, 1, tiles)
  return _temporal_aggregation(x, attn, kernel_size, dilation, tiles, interpret)


def frame_wise_aggregation(x, weight, *, kernel_size: int = 3, dilation: int = 1,
                           interpret: bool = False, tiles: LocalTiles | None = None):
  """Fused DTF block steps 1-4 (SPEC.md 3.2): one kernel forward, two kernels backward.

  Args:
    x: ``(N, T, H, W, C)``.
    weight: ``(T, K, K, C)`` correlation weight.
    kernel_size: K (odd). dilation: d >= 1.
    interpret: Pallas interpret mode. tiles: block sizes (default from the shape).

  Returns:
    ``(u, r)``: ``u (N, T, H, W, C)`` and the raw correlation ``r (N, T, H, W, K*K)``, both in
    ``x.dtype``; the softmax and aggregation use the float32 ``r``.
  """
  tiles = _tiles(x.shape, 1, tiles)
  return _frame_wise_aggregation(x, weight, kernel_size, dilation, tiles, interpret)
