"""Probe: can the DTF stencil kernels move from the Pallas Triton backend to Mosaic GPU?

The shipped DTF kernels (kernels/dtf_local.py) use the Pallas Triton backend; this script is the
experiment behind that choice (kernels/README.md, "Backends"). It writes the simplest DTF kernel,
``temporal_aggregation`` forward (``m[p] = sum_k a[p,k] x̂[p+δ_k]``), for Mosaic GPU in the
formulation that its layout system accepts:

* a program owns 64 consecutive positions of the flattened ``H*W`` plane (WGMMA row layout) and a
  chunk of channels; one TMA copy brings the band plus a halo of ``W+1`` rows into SMEM;
* each tap is a shifted SMEM window loaded into the WGMMA layout, weighted by a row vector
  (``Layout.WGMMA.reduce(1)``) broadcast with ``lax.broadcast_in_dim``; image-border wrap-around
  of the flattened plane is masked per position.

What it reports on this CPU-only machine:

1. ``--mode lower`` (default): both variants lower for CUDA (``mosaic_gpu_v2`` custom call).
2. ``--mode interpret``: Mosaic GPU interpret mode on CPU. The ``padded`` variant (XLA pads the
   frames so every TMA window is in bounds) matches the reference; the ``oob`` variant (window
   starting at ``-halo``, relying on TMA's zero fill for rows outside the frame) does **not**: the
   interpreter does not model TMA out-of-bounds fill. So the zero padding and ragged edges of the
   Mosaic kernel cannot be proven on CPU, and padding in XLA costs two extra passes over ``x``.
   On a GPU, ``--mode interpret`` is replaced by ``--mode run``, which executes both variants and
   shows whether hardware TMA zero fill gives the right answer.

Usage::

  python benchmarks/mosaic_gpu_probe.py [--mode lower|interpret|run]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROW = plgpu.Layout.WGMMA.reduce(1)
BLOCK_ROWS = 64
BLOCK_CHANNELS = 64


def aggregation_forward(x, attn_by_tap, height: int, width: int, *, padded: bool,
                        interpret=False):
  """``x (NT, H*W, C)``, ``attn_by_tap (NT, 9, H*W)`` -> ``(NT, H*W, C)``; K = 3, d = 1."""
  frames, plane, channels = x.shape
  halo = width + 1
  rows, chans = BLOCK_ROWS, BLOCK_CHANNELS
  if padded:  # Every TMA window in bounds: frames padded by the halo (+ a ragged tail).
    x = jnp.pad(x, ((0, 0), (halo, halo + rows), (0, 0)))
  out_rows = plane + (2 * halo + rows if padded else 0)

  def body(x_gmem, a_gmem, o_gmem, x_smem, a_smem, o_smem, barrier):
    nt = jax.lax.axis_index('nt')
    start = jax.lax.axis_index('band') * rows
    chunk = jax.lax.axis_index('chunk') * chans
    window = pl.ds(start if padded else start - halo, rows + 2 * halo)
    plgpu.copy_gmem_to_smem(x_gmem.at[nt, window, pl.ds(chunk, chans)], x_smem, barrier.at[0],
                            oob_mode=plgpu.OOBFillMode.ZEROS)
    plgpu.copy_gmem_to_smem(a_gmem.at[nt, :, pl.ds(start, rows)], a_smem, barrier.at[0],
                            oob_mode=plgpu.OOBFillMode.ZEROS)
    plgpu.barrier_wait(barrier.at[0])
    pos = start + plgpu.broadcasted_iota(jnp.int32, (rows,), 0, layout=ROW)
    h, w = pos // width, pos % width
    acc = plgpu.layout_cast(jnp.full((rows, chans), 0, jnp.float32), plgpu.Layout.WGMMA)
    for k in range(9):
      dy, dx = k // 3 - 1, k % 3 - 1
      inside = (h + dy >= 0) & (h + dy < height) & (w + dx >= 0) & (w + dx < width)
      weight = jnp.where(inside, plgpu.load(a_smem.at[k], layout=ROW), 0.0)
      tap = plgpu.load(x_smem.at[pl.ds(halo + dy * width + dx, rows), :],
                       layout=plgpu.Layout.WGMMA, optimized=False)
      acc = acc + jax.lax.broadcast_in_dim(weight, (rows, chans), [0]) * tap
    plgpu.store(o_smem, acc.astype(o_smem.dtype), optimized=False)
    plgpu.commit_smem()
    out_start = start + halo if padded else start
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[nt, pl.ds(out_start, rows), pl.ds(chunk, chans)])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((frames, out_rows, channels), x.dtype),
      grid=(frames, pl.cdiv(plane, rows), channels // chans),
      grid_names=('nt', 'band', 'chunk'),
      scratch_types=[plgpu.SMEM((rows + 2 * halo, chans), x.dtype),
                     plgpu.SMEM((9, rows), attn_by_tap.dtype),
                     plgpu.SMEM((rows, chans), x.dtype),
                     plgpu.Barrier(num_arrivals=2, num_barriers=1)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret)
  out = kernel(x, attn_by_tap)
  return out[:, halo:halo + plane] if padded else out


def reference(x, attn_by_tap, height, width):
  frames, plane, channels = x.shape
  grid = np.pad(x.reshape(frames, height, width, channels), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = 0
  for k in range(9):
    kh, kw = divmod(k, 3)
    out = out + (attn_by_tap[:, k].reshape(frames, height, width, 1)
                 * grid[:, kh:kh + height, kw:kw + width])
  return out.reshape(frames, plane, channels)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', choices=('lower', 'interpret', 'run'), default='lower')
  args = parser.parse_args()
  for padded in (True, False):
    name = 'padded' if padded else 'oob'
    if args.mode == 'lower':
      s = jax.ShapeDtypeStruct
      fn = functools.partial(aggregation_forward, height=56, width=56, padded=padded)
      text = jax.jit(fn).trace(s((32, 56 * 56, 64), jnp.float32),
                               s((32, 9, 56 * 56), jnp.float32)).lower(
                                   lowering_platforms=('cuda',)).as_text()
      print(f'{name}: lowered for CUDA, mosaic_gpu custom calls: {text.count("mosaic_gpu")}')
    else:
      rng = np.random.default_rng(0)
      height = width = 8
      x = rng.standard_normal((2, height * width, 64)).astype(np.float32)
      attn = rng.standard_normal((2, 9, height * width)).astype(np.float32)
      interpret = plgpu.InterpretGPUParams() if args.mode == 'interpret' else False
      fn = functools.partial(aggregation_forward, height=height, width=width, padded=padded,
                             interpret=interpret)
      err = np.abs(np.asarray(jax.jit(fn)(x, attn)) - reference(x, attn, height, width)).max()
      print(f'{name}: max |error| = {err:.3g}')


if __name__ == '__main__':
  main()
