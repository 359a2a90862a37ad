"""Times every public op, forward and forward+backward, for every implementation available here.

On CPU only ``impl='xla'`` is timed (the Pallas kernels run there only in interpret mode, which is
a test vehicle, not an implementation); on a GPU both ``'xla'`` and ``'pallas'`` (compiled Triton
kernels) are timed and compared. Each case is jitted, warmed up, then run ``--repeats`` times; the
table shows the median milliseconds, the achieved bandwidth ``minimum bytes / time`` (inputs read
once, outputs written once: for fwd+bwd, the inputs, the cotangent, the outputs and the input
gradients) and the ratio of each implementation's time to the first one's.

Usage::

  python benchmarks/kernel_ops.py                       # CPU: small shapes, XLA (< 2 minutes)
  python benchmarks/kernel_ops.py --shapes stages       # GPU: the real stage shapes, XLA and Pallas
  python benchmarks/kernel_ops.py --ops frame_wise_aggregation --dtype float32 --repeats 50
"""

from __future__ import annotations

import pathlib
import sys

# Run as a script from benchmarks/: keep the top-level ``kernels`` package importable.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or '.').resolve() != pathlib.Path(__file__)
               .resolve().parent]

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax import ops
from kernels import stages

OPS = ('temporal_correlation', 'temporal_aggregation', 'frame_wise_aggregation',
       'deformable_correlation', 'deformable_aggregation')
SMALL_SHAPES = ((2, 4, 14, 14, 64), (2, 4, 28, 28, 32))


def make_args(op: str, shape, dtype, rng):
  """Random arguments of ``op``: normal, the weight scaled by 1/sqrt(C), offsets of +-2 pixels."""
  scale = {'weight': 1 / np.sqrt(shape[-1]), 'offsets': 2.0}
  return tuple(jnp.asarray(scale.get(name, 1.0) * rng.standard_normal(spec.shape), spec.dtype)
               for name, spec in stages.op_argument_specs(op, shape, dtype).items())


def nbytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def time_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile.
  jax.block_until_ready(fn(*args))  # Warm up.
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - start) * 1e3)
  return statistics.median(samples)


def bench_case(op: str, shape, dtype, impl: str, repeats: int):
  rng = np.random.default_rng(0)
  args = make_args(op, shape, dtype, rng)
  forward = jax.jit(lambda *a: getattr(ops, op)(*a, impl=impl))
  out = jax.eval_shape(forward, *args)
  cotangent = jax.tree.map(lambda o: jnp.ones(o.shape, o.dtype), out)

  def fwd_bwd(*a):
    result, vjp = jax.vjp(lambda *b: getattr(ops, op)(*b, impl=impl), *a)
    return result, vjp(cotangent)

  fwd_bwd = jax.jit(fwd_bwd)
  fwd_bytes = nbytes(args) + nbytes(out)
  fwd_bwd_bytes = fwd_bytes + nbytes(cotangent) + nbytes(args)
  t_fwd = time_ms(forward, args, repeats)
  t_fwd_bwd = time_ms(fwd_bwd, args, repeats)
  return t_fwd, fwd_bytes / t_fwd / 1e6, t_fwd_bwd, fwd_bwd_bytes / t_fwd_bwd / 1e6


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', choices=('small', 'stages'), default=None,
                      help="'small' (CPU default) or the real stage shapes (GPU default)")
  parser.add_argument('--ops', nargs='*', default=OPS, choices=OPS)
  parser.add_argument('--impls', nargs='*', default=None,
                      help="default: 'xla' on CPU, 'xla pallas' on GPU")
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args()
  on_gpu = jax.default_backend() == 'gpu'
  shapes_kind = args.shapes or ('stages' if on_gpu else 'small')
  impls = args.impls or (['xla', 'pallas'] if on_gpu else ['xla'])
  repeats = args.repeats or (20 if on_gpu else 5)
  dtype = jnp.dtype(args.dtype)
  print(f'backend={jax.default_backend()} device={jax.devices()[0].device_kind} '
        f'dtype={dtype.name} repeats={repeats} (median)')
  header = (f"{'op':<24} {'shape (N,T,H,W,C)':<22} {'impl':<7} {'fwd ms':>9} {'GB/s':>7} "
            f"{'fwd+bwd ms':>11} {'GB/s':>7} {'fwd ratio':>9} {'f+b ratio':>9}")
  print(header)
  print('-' * len(header))
  for op in args.ops:
    if shapes_kind == 'small':
      shapes = SMALL_SHAPES
    else:
      chosen = stages.SIFA_STAGES if op.startswith('deformable') else stages.DTF_STAGES
      shapes = [st.x_shape for st in chosen]
    for shape in shapes:
      first = None
      for impl in impls:
        t_fwd, bw_fwd, t_fb, bw_fb = bench_case(op, shape, dtype, impl, repeats)
        first = first or (t_fwd, t_fb)
        print(f'{op:<24} {str(shape):<22} {impl:<7} {t_fwd:9.3f} {bw_fwd:7.1f} {t_fb:11.3f} '
              f'{bw_fb:7.1f} {t_fwd / first[0]:9.2f} {t_fb / first[1]:9.2f}', flush=True)


if __name__ == '__main__':
  main()
