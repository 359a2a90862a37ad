"""Shared pieces of the Pallas kernels: dtypes, tile geometry and masked row gathers.

Every kernel in this package sees its channels-last tensors as 2-D row-major matrices
``(rows, channels)``: a feature map ``(N, T, H, W, C)`` is the free reshape ``(N*T*H*W, C)`` and a
per-position tensor such as a correlation ``(N, T, H, W, G*K*K)`` is ``(N*T*H*W, G*K*K)``. A program
owns a *band*: ``block_rows`` consecutive positions ``pos`` of the row-major ``H*W`` plane of a frame
(``h = pos // W``, ``w = pos % W``), so any H and W work without padding and a band of a small
frame covers the whole frame. Channels are vectorised in chunks of ``block_channels`` contiguous
lanes. Every load is a masked gather with explicit row indices (clipped to a valid row, masked to
0), which

* expresses zero padding (a tap outside the image is masked, never read),
* handles ragged H*W and C (bands and channel chunks are powers of two, masked at the end), and
* behaves identically in Pallas interpret mode on CPU (which clamps out-of-range slice starts
  instead of masking them, so negative-offset slices cannot be used there).

These helpers are called inside kernel bodies (Triton backend) and in interpret mode alike.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

F32 = jnp.float32


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def compute_dtype(*arrays) -> jnp.dtype:
  """Arithmetic dtype of a kernel: at least float32 (float64 inputs stay float64)."""
  return jnp.promote_types(jnp.result_type(*arrays), F32)


def same_padding(kernel_size: int, dilation: int) -> int:
  """'Same' padding ``p = (d*(K-1)+1)//2`` (SPEC.md notation)."""
  return (dilation * (kernel_size - 1) + 1) // 2


def tap_displacements(kernel_size: int, dilation: int) -> tuple[tuple[int, int], ...]:
  """``(dy, dx)`` of every tap ``k = kh*K + kw``: ``(kh*d - p, kw*d - p)``."""
  p = same_padding(kernel_size, dilation)
  return tuple((kh * dilation - p, kw * dilation - p)
               for kh in range(kernel_size) for kw in range(kernel_size))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of a channels-last feature map ``(N, T, H, W, C)`` seen as ``(N*T*H*W, C)``."""
  batch: int
  frames: int
  height: int
  width: int
  channels: int

  @classmethod
  def of(cls, shape) -> 'Geometry':
    n, t, h, w, c = (int(s) for s in shape)
    return cls(n, t, h, w, c)

  @property
  def plane(self) -> int:
    return self.height * self.width

  @property
  def rows(self) -> int:
    return self.batch * self.frames * self.plane


def triton_params(num_warps: int, num_stages: int = 2) -> pl_triton.CompilerParams:
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_block_channels(channels: int, block_rows: int, budget: int = 4096,
                           minimum: int = 16) -> int:
  """Channel chunk so that a ``(block_rows, block_channels)`` tile holds ~``budget`` elements."""
  return max(min(next_pow2(channels), max(budget // block_rows, minimum)), 1)


def default_tiles(plane: int, batch: int, group_channels: int, groups: int, taps: int, *,
                  max_rows: int, budget: int, min_programs: int = 264):
  """Default ``(block_rows, block_channels, channel_splits, num_warps)`` for one op.

  * ``block_rows``: the whole frame up to ``max_rows`` positions, halved (down to 64) while the
    ``(batch, bands)`` grid has fewer than ``min_programs`` programs (~2 waves on 132 SMs);
  * ``block_channels``: a ``(block_rows, block_channels)`` tile of ~``budget`` elements (at least 16
    channels, 64 bytes of float32); with groups, a power of two dividing ``C/groups``;
  * ``channel_splits``: more programs for small grids, but at most ``C/(16*taps)`` so that the
    float32 partial sums (``taps`` values per position and split, written and read back) stay
    below ~1/4 of the traffic of ``x``.
  """
  block_rows = min(next_pow2(plane), max_rows)
  while block_rows > 64 and batch * groups * cdiv(plane, block_rows) < min_programs:
    block_rows //= 2
  block_channels = default_block_channels(group_channels, block_rows, budget)
  if groups > 1:  # Chunks must not straddle two groups.
    block_channels = min(block_channels, group_channels & -group_channels)
  chunks = cdiv(group_channels, block_channels)
  programs = batch * groups * cdiv(plane, block_rows)
  splits = max(1, min(chunks, cdiv(min_programs, programs), group_channels // (16 * taps)))
  num_warps = 4 if block_rows * block_channels <= 4096 else 8
  return block_rows, block_channels, splits, num_warps


# --------------------------------------------------------------------------------------------
# In-kernel helpers.
# --------------------------------------------------------------------------------------------

def iota(n: int) -> jax.Array:
  return jax.lax.iota(jnp.int32, n)


def band(band_index, block_rows: int, height: int, width: int):
  """Positions of a band in the row-major ``H*W`` plane.

  Returns:
    ``(pos, h, w, valid)``, each ``(block_rows,)``: ``pos`` clipped to 0 where invalid (so it is
    always a safe row offset), ``h = pos // W``, ``w = pos % W``, ``valid = pos < H*W``.
  """
  raw = band_index * block_rows + iota(block_rows)
  valid = raw < height * width
  pos = jnp.where(valid, raw, 0)
  return pos, jax.lax.div(pos, width), jax.lax.rem(pos, width), valid


def shifted(h, w, valid, dy: int, dx: int, height: int, width: int):
  """Plane index of ``(h + dy, w + dx)`` (0 where outside the image) and its in-image mask."""
  hh = h + dy
  ww = w + dx
  ok = valid & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
  return jnp.where(ok, hh * width + ww, 0), ok


def channel_chunk(start, block_channels: int, stop):
  """Channel indices ``start + [0, block_channels)`` (clipped) and their mask ``< stop``."""
  chans = start + iota(block_channels)
  ok = chans < stop
  return jnp.where(ok, chans, 0), ok


def load_tile(ref, rows, chans, row_ok, chan_ok, dtype=F32):
  """``ref[rows, chans]`` as a ``(len(rows), len(chans))`` tile; masked entries are 0."""
  mask = row_ok[:, None] & chan_ok[None, :]
  tile = pl_triton.load(ref.at[rows[:, None], chans[None, :]], mask=mask,
                        other=jnp.zeros((), ref.dtype))
  return tile.astype(dtype)


def load_column(ref, rows, column, row_ok, dtype=F32):
  """``ref[rows, column]`` for a static or scalar column: ``(len(rows),)``, masked entries 0."""
  column = jnp.asarray(column, jnp.int32)
  vec = pl_triton.load(ref.at[rows, column], mask=row_ok, other=jnp.zeros((), ref.dtype))
  return vec.astype(dtype)


def load_row(ref, row, chans, chan_ok, dtype=F32):
  """``ref[row, chans]`` for a scalar row: ``(len(chans),)``, masked entries 0."""
  row = jnp.asarray(row, jnp.int32)
  vec = pl_triton.load(ref.at[row, chans], mask=chan_ok, other=jnp.zeros((), ref.dtype))
  return vec.astype(dtype)


def store_tile(ref, row_start, col_start, tile, row_ok, col_ok):
  """Stores ``tile`` at ``ref[row_start:+R, col_start:+C]`` where ``row_ok x col_ok``.

  ``row_start`` and ``col_start`` are never negative here, so contiguous slices are safe in
  interpret mode too (it pads the high end).
  """
  r, c = tile.shape
  mask = row_ok[:, None] & col_ok[None, :]
  pl_triton.store(ref.at[pl.ds(row_start, r), pl.ds(col_start, c)], tile.astype(ref.dtype),
                  mask=mask)


def store_column(ref, row_start, column, vec, row_ok):
  """Stores ``vec (R,)`` at ``ref[row_start:+R, column]`` where ``row_ok``."""
  column = jnp.asarray(column, jnp.int32)
  pl_triton.store(ref.at[pl.ds(row_start, vec.shape[0]), column], vec.astype(ref.dtype),
                  mask=row_ok)


def store_row(ref, row, col_start, vec, col_ok):
  """Stores ``vec (C,)`` at ``ref[row, col_start:+C]`` where ``col_ok``."""
  row = jnp.asarray(row, jnp.int32)
  pl_triton.store(ref.at[row, pl.ds(col_start, vec.shape[0])], vec.astype(ref.dtype),
                  mask=col_ok)


def loaders(dtype):
  """``(load_tile, load_column, load_row)`` that convert to the arithmetic ``dtype``."""
  return (lambda *a: load_tile(*a, dtype=dtype), lambda *a: load_column(*a, dtype=dtype),
          lambda *a: load_row(*a, dtype=dtype))


def store_columns(ref, row_start, first_column, vecs, row_ok):
  """Stores ``vecs[j] (R,)`` at ``ref[row_start:+R, first_column + j]`` where ``row_ok``."""
  for j, vec in enumerate(vecs):
    store_column(ref, row_start, first_column + j, vec, row_ok)


def tap_offset(k, kernel_size: int, dilation: int):
  """``(dy, dx)`` of a (traced) tap index ``k = kh*K + kw``: ``(kh*d - p, kw*d - p)``."""
  p = same_padding(kernel_size, dilation)
  return (jax.lax.div(k, kernel_size) * dilation - p,
          jax.lax.rem(k, kernel_size) * dilation - p)


def select(values, index):
  """``values[index]`` for a static list of equally shaped arrays and a traced ``index``."""
  out = values[0]
  for j in range(1, len(values)):
    out = jnp.where(index == j, values[j], out)
  return out


def check_group_chunks(op: str, x_shape, groups: int, block_channels: int) -> None:
  """Channel chunks must not straddle two groups (the kernels read one group's column per chunk)."""
  group_channels = x_shape[-1] // groups
  if groups > 1 and group_channels % block_channels:
    raise ValueError(
        f"{op}: tiles.block_channels={block_channels} must divide C/groups={group_channels} "
        f"(x shape {tuple(x_shape)}, groups={groups}); use a power of two dividing "
        f"{group_channels} or the default tiles.")
