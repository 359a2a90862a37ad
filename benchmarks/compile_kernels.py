"""Compiles every Pallas kernel at every stage shape to a cubin on CPU and reports its resources.

For each op (forward + VJP w.r.t. every argument, ``impl='pallas'``, bfloat16 storage, float32
weights) at each stage of kernels/stages.py: lowers for CUDA against an abstract H100, compiles
each kernel's Triton IR with the ``triton`` package (TTIR -> PTX -> ``ptxas`` for sm_90) and prints
registers per thread, spilled bytes (LOCAL), shared memory and compile time
(``kernels.aot.compile_kernels``). Takes a few minutes on CPU.

Usage::

  python benchmarks/compile_kernels.py [--dtype float32] [--markdown]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

# Run as a script from benchmarks/: keep the top-level ``kernels`` package importable.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or '.').resolve() != pathlib.Path(__file__)
               .resolve().parent]

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from dtf_jax import ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from kernels import aot  # pylint: disable=g-import-not-at-top,wrong-import-position
from kernels import stages  # pylint: disable=g-import-not-at-top,wrong-import-position


def abstract_args(op: str, stage: stages.Stage, dtype):
  return tuple(stages.op_argument_specs(op, stage.x_shape, dtype).values())


def forward_and_vjp(op: str):
  def fn(*args):
    out, vjp = jax.vjp(lambda *a: getattr(ops, op)(*a, impl='pallas'), *args)
    return out, vjp(out)
  return fn


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--markdown', action='store_true', help='print a markdown table')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  cases = [(op, st) for st in stages.DTF_STAGES for op in ('frame_wise_aggregation',
                                                             'temporal_correlation',
                                                             'temporal_aggregation')]
  cases += [(op, st) for st in stages.SIFA_STAGES for op in ('deformable_correlation',
                                                              'deformable_aggregation')]
  if args.markdown:
    print('| stage | kernel | warps | registers | spilled bytes | shared bytes | compile s |')
    print('|---|---|---:|---:|---:|---:|---:|')
  for op, stage in cases:
    for k in aot.compile_kernels(forward_and_vjp(op), *abstract_args(op, stage, dtype)):
      if args.markdown:
        print(f'| {stage.label} | {k.name} | {k.num_warps} | {k.registers} | {k.spill_bytes} '
              f'| {k.shared_bytes} | {k.compile_seconds:.1f} |', flush=True)
      else:
        print(f'{stage.label:<45} {k.name:<42} warps={k.num_warps} regs={k.registers:<3} '
              f'spill={k.spill_bytes} shared={k.shared_bytes} ({k.compile_seconds:.1f}s)',
              flush=True)


if __name__ == '__main__':
  main()
