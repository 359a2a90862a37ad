"""Roofline budget of every kernel at the real stage shapes: FLOPs, bytes and implied H100 times.

For each kernel (forward and backward launch sets) and each stage of kernels/stages.py:

* ``FLOPs``: multiply and add counted separately, per (position, channel, tap); the same math for
  every implementation (index arithmetic and the K*K softmax are not counted);
* ``min``: the minimum DRAM bytes, each input read once and each output written once;
* ``ours``: the DRAM bytes the Pallas kernels move *by design* with the default block sizes
  (``LocalTiles`` / ``DeformableTiles``): every distinct input byte once, every output once, plus
  what the design adds on purpose -- float32 partial sums over channel splits (written, read back
  and reduced by XLA), the float32 atomic buffer of the deformable input gradient (zero fill,
  write-back, cast), the small XLA epilogues (casts, the K*K softmax backward) and the second
  read of ``x``/``du`` by the two-kernel fused backward. Re-reads *between* concurrently running
  programs (the K*K shifted taps and halo rows of neighbouring bands, per-position tensors read by
  every channel chunk of a band) are assumed to hit the 50 MB L2: programs of one band and of
  neighbouring bands are adjacent in the grid, and these tensors are a few MB;
* ``no-L2``: the same design with every program's tiles fetched from DRAM (halo rows and
  per-chunk re-reads counted again): an upper bound, as a ratio to ``min``;
* ``orig``: the bytes the original CUDA/CuPy kernels (float32, one thread per output element)
  issue: every load and store of every thread, without cache reuse, plus the PyTorch glue
  around them where the op needs it (softmax, shift, add; layout copies ignored); atomics count
  8 bytes (read-modify-write);
* times on an H100: ``bytes / 3.0 TB/s`` and ``FLOPs / 60 TFLOP/s`` (float32, non-tensor-core;
  these ops have no matmul, so the 790 TFLOP/s bf16 tensor-core peak does not apply);
  the implied time is the larger of the two.

Usage::

  python benchmarks/roofline.py                    # float32 table (the original's dtype)
  python benchmarks/roofline.py --dtype bfloat16   # bf16 storage (float32 accumulation)
  python benchmarks/roofline.py --write-readme     # regenerate the tables in kernels/README.md
"""

from __future__ import annotations

import pathlib
import sys

# Run as a script from benchmarks/: keep the top-level ``kernels`` package importable.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or '.').resolve() != pathlib.Path(__file__)
               .resolve().parent]

import argparse
import dataclasses
import pathlib

from kernels import _common as cm
from kernels import dtf_local
from kernels import sifa_deformable
from kernels import stages

BANDWIDTH = 3.0e12  # bytes/s, H100 SXM copy bandwidth.
FP32_FLOPS = 60e12  # FLOP/s, H100 float32 non-tensor.
KERNEL_SIZE = 3
KK = KERNEL_SIZE * KERNEL_SIZE
F = 4  # bytes of the float32 accumulators / partial sums / original tensors.


@dataclasses.dataclass(frozen=True)
class Row:
  kernel: str
  stage: stages.Stage
  flops: float
  minimum: float
  ours: float
  original: float
  no_l2: float

  def times_us(self):
    t_flop = self.flops / FP32_FLOPS * 1e6
    return tuple(max(b / BANDWIDTH * 1e6, t_flop) for b in (self.minimum, self.ours,
                                                             self.original)) + (t_flop,)


def halo_factor(height: int, width: int, block_rows: int, pad: int = 1) -> float:
  """Sum over bands of the plane positions their K x K taps touch, divided by H*W."""
  plane = height * width
  reach = pad * width + pad
  touched = 0
  for start in range(0, plane, block_rows):
    stop = min(start + block_rows, plane)
    touched += min(plane, stop + reach) - max(0, start - reach)
  return touched / plane


def sizes(stage: stages.Stage):
  n, t, h, w, c = stage.x_shape
  positions = n * t * h * w
  return positions, positions * c, positions * KK, t * KK * c * F


def local_rows(stage: stages.Stage, e: int) -> list[Row]:
  """DTF kernels (dtf_local) at one stage; ``e`` = bytes per stored element."""
  n, t, h, w, c = stage.x_shape
  p, x, r, weight = sizes(stage)
  tiles = dtf_local.LocalTiles.for_shape(stage.x_shape)
  hf = halo_factor(h, w, tiles.block_rows)
  chunks, splits = tiles.chunks(c), tiles.channel_splits
  cast = 0 if e == F else 1  # Float32 results cast to the storage dtype by XLA.

  def partial_sums(count, size):  # Kernel writes ``count`` float32 copies, XLA sums and casts.
    return size * e if count == 1 else count * size * F * 2 + size * e

  pct = p * c * KK
  # Original (float32, issued loads): correlation thread = output element, 3 loads per channel.
  o_corr_fwd = F * (r * c * 3 + r)
  query_parts = sum(1 + (s < t - 1) + (s == 0) for s in range(t)) / t
  o_corr_bwd = F * (x * KK * 3 * query_parts + x)
  o_agg_fwd = F * x * (2 * KK + 1)
  o_agg_bwd = F * (x * (2 * KK + 1) + r * (2 * c + 1))
  return [
      Row('temporal_correlation fwd', stage, 3 * pct,
          x * e + weight + r * e,
          x * e + weight + partial_sums(splits, r),
          o_corr_fwd,
          x * e * hf + weight + partial_sums(splits, r)),
      Row('temporal_correlation bwd (dx)', stage, 6 * pct,
          x * e + r * e + weight + x * e,
          x * e + r * e + weight + x * e,
          o_corr_bwd,
          x * e * hf + r * e * hf * chunks + weight + x * e),
      Row('temporal_aggregation fwd', stage, 2 * pct,
          x * e + r * e + x * e,
          x * e + r * e + x * e,
          o_agg_fwd,
          x * e * hf + r * e * chunks + x * e),
      Row('temporal_aggregation bwd', stage, 4 * pct,
          2 * x * e + r * e + x * e + r * e,
          2 * x * e + r * e + x * e + partial_sums(chunks, r),
          o_agg_bwd,
          2 * x * e * hf + r * e * hf * chunks + x * e + partial_sums(chunks, r)),
      Row('frame_wise_aggregation fwd (fused)', stage, 5 * pct,
          x * e + weight + x * e + r * e,
          x * e + weight + x * e + r * F + cast * (r * F + r * e),
          o_corr_fwd + F * 2 * r + o_agg_fwd + F * 5 * x,
          x * e * hf + weight + x * e + r * F + cast * (r * F + r * e)),
      Row('frame_wise_aggregation bwd (2 kernels)', stage, 10 * pct,
          x * e + weight + r * e + x * e + r * e + x * e,
          # Kernel 1 (attention gradient): du, x; float32 partials over channel splits.
          2 * x * e + splits * r * F
          # XLA: sum partials, softmax backward -> dr_total, attn (float32).
          + splits * r * F + r * F + r * e + 2 * r * F
          # Kernel 2 (input gradient): x, du, dr_total, attn; writes dx.
          + 2 * x * e + 2 * r * F + weight + x * e,
          o_agg_bwd + o_corr_bwd + F * (4 * r + 2 * x + 6 * x),
          x * e + x * e * hf + 2 * splits * r * F + r * F + r * e + 2 * r * F
          + 2 * x * e * hf + 2 * r * F * hf * chunks + weight + x * e),
  ]


def deformable_rows(stage: stages.Stage, e: int) -> list[Row]:
  """SIFA kernels (sifa_deformable) at one stage."""
  n, t, h, w, c = stage.x_shape
  p, x, r, weight = sizes(stage)
  fwd_tiles = sifa_deformable.DeformableTiles.for_shape(stage.x_shape)
  agg_tiles = sifa_deformable.DeformableTiles.for_shape(stage.x_shape, reduce_groups=False)
  hf = halo_factor(h, w, fwd_tiles.block_rows)
  hf_agg = halo_factor(h, w, agg_tiles.block_rows)
  splits = fwd_tiles.channel_splits
  agg_splits = agg_tiles.channel_splits
  agg_chunks = agg_tiles.chunks(c)
  offsets = 2 * r

  def partial_sums(count, size):
    return size * e if count == 1 else count * size * F * 2 + size * e

  # Input gradient through atomics: zero-initialised float32 buffer, write-back, cast.
  atomic_dx = x * F * 2 + (0 if e == F else x * F + x * e)
  pct = p * c * KK
  return [
      Row('deformable_correlation fwd', stage, 11 * pct,
          x * e + offsets * e + weight + r * e,
          x * e + offsets * e + weight + partial_sums(splits, r),
          F * r * (6 * c + 3),
          x * e * hf + offsets * e * splits + weight + partial_sums(splits, r)),
      Row('deformable_correlation bwd', stage, 40 * pct,
          x * e + offsets * e + weight + r * e + x * e + offsets * e,
          x * e + offsets * e + r * e + weight + atomic_dx + partial_sums(splits, offsets),
          F * (x * KK * 9 + x) + 8 * x * KK * 5 + F * offsets * (6 * c + 4),
          x * e * hf + (offsets + r) * e * splits + weight + atomic_dx
          + partial_sums(splits, offsets)),
      Row('deformable_aggregation fwd', stage, 10 * pct,
          x * e + offsets * e + r * e + x * e,
          x * e + (offsets + r) * e + x * e,
          F * x * (7 * KK + 1),
          x * e * hf_agg + (offsets + r) * e * agg_chunks + x * e),
      Row('deformable_aggregation bwd', stage, 40 * pct,
          x * e + offsets * e + r * e + x * e + x * e + offsets * e + r * e,
          2 * x * e + (offsets + r) * e + atomic_dx + partial_sums(agg_splits, offsets)
          + partial_sums(agg_splits, r),
          F * (x * KK * 4 + x) + 8 * x * KK * 4 + F * x * (1 + 6 * KK) + 8 * x * KK
          + F * offsets * (6 * c + 3),
          x * e * hf_agg + x * e + (offsets + r) * e * agg_splits + atomic_dx
          + partial_sums(agg_splits, offsets) + partial_sums(agg_splits, r)),
  ]


def all_rows(e: int) -> list[Row]:
  rows = []
  for stage in stages.DTF_STAGES:
    rows += local_rows(stage, e)
  for stage in stages.SIFA_STAGES:
    rows += deformable_rows(stage, e)
  return rows


def markdown(rows: list[Row], dtype: str) -> str:
  mb = lambda b: f'{b / 1e6:,.1f}'
  lines = [
      f'Storage dtype {dtype} (float32 accumulation); batch {stages.BATCH}, K = 3. '
      f'MB = 1e6 bytes; µs on an H100 (3.0 TB/s, 60 TFLOP/s fp32); ×min = bytes / minimum.',
      '',
      '| kernel | stage (C@HxW, T) | GFLOP | min MB | ours MB (×min) | no-L2 ×min '
      '| original MB (×min) | µs min | µs ours | µs original | µs FLOPs |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for row in rows:
    t_min, t_ours, t_orig, t_flop = row.times_us()
    st = row.stage
    lines.append(
        f'| {row.kernel} | {st.model.removeprefix("c2d_")} {st.name}: {st.channels}@{st.size}, '
        f'T{st.frames} | {row.flops / 1e9:,.2f} | {mb(row.minimum)} | {mb(row.ours)} '
        f'({row.ours / row.minimum:.2f}) | {row.no_l2 / row.minimum:.2f} | {mb(row.original)} '
        f'({row.original / row.minimum:.1f}) | {t_min:,.0f} | {t_ours:,.0f} | {t_orig:,.0f} '
        f'| {t_flop:,.0f} |')
  worst = max(rows, key=lambda r: r.ours / r.minimum)
  lines += ['', f'Largest ours/min: {worst.ours / worst.minimum:.2f} ({worst.kernel}, '
            f'{worst.stage.label}).']
  return '\n'.join(lines)


def write_readme(text: str, path: pathlib.Path) -> None:
  begin, end = '<!-- roofline:begin -->', '<!-- roofline:end -->'
  content = path.read_text()
  head, rest = content.split(begin, 1)
  _, tail = rest.split(end, 1)
  path.write_text(f'{head}{begin}\n{text}\n{end}{tail}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--write-readme', action='store_true',
                      help='replace the generated tables in kernels/README.md')
  args = parser.parse_args()
  if args.write_readme:
    text = '\n\n'.join(markdown(all_rows(e), name) for name, e in (('float32', 4),
                                                                    ('bfloat16', 2)))
    write_readme(text, pathlib.Path(__file__).resolve().parents[1] / 'kernels' / 'README.md')
  else:
    print(markdown(all_rows(4 if args.dtype == 'float32' else 2), args.dtype))


if __name__ == '__main__':
  main()
