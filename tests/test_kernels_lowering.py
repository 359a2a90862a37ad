"""Every kernel lowers for CUDA (Triton) from this CPU-only machine at the real stage shapes.

``jax.jit(f).trace(*ShapeDtypeStructs).lower(lowering_platforms=('cuda',))`` builds the Triton IR of
every ``pallas_call`` without allocating anything; the Pallas Triton backend needs an abstract GPU
device for that (``AbstractMesh(..., abstract_device=AbstractDevice(device_kind='NVIDIA H100'))``).
A kernel that cannot be expressed for the GPU fails here. Forward and backward (the VJP w.r.t.
every array argument) are lowered at the DTF/SIFA stage shapes of kernels/stages.py (batch 8).

Two kernels are also compiled all the way to a cubin for sm_90 with the ``triton`` package
(``kernels.aot.compile_kernels``; skipped without it): no register spills.

Also checks the dispatch contract: ``impl='auto'`` and ``impl='pallas'`` contain the Triton kernels
when lowered for CUDA; on CPU ``'auto'`` lowers to plain XLA and ``'pallas'`` to interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dtf_jax import ops
from kernels import aot
from kernels import stages

TRITON_CALL = '__gpu$xla.gpu.triton'


def lower_text(fn, *args, platform: str = 'cuda') -> str:
  """StableHLO text of ``jit(fn)`` lowered for ``platform`` from abstract ``args``."""
  if platform == 'cuda':  # Traced and lowered for an abstract H100 (no device is needed).
    return aot.lower_for_gpu(fn, *args).as_text()
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def forward_and_vjp(op, impl):
  def fn(*args):
    out, vjp = jax.vjp(lambda *a: getattr(ops, op)(*a, impl=impl), *args)
    return out, vjp(out)
  return fn


def abstract_inputs(op: str, stage: stages.Stage, dtype=jnp.bfloat16):
  return tuple(stages.op_argument_specs(op, stage.x_shape, dtype).values())


# Forward kernels + backward kernels per op (the fused backward is two kernels).
KERNELS_PER_VJP = {
    'temporal_correlation': 2,
    'temporal_aggregation': 2,
    'frame_wise_aggregation': 3,
    'temporal_correlation_aggregation': 4,  # the correlation's two kernels, the aggregation's two
    'deformable_correlation': 2,
    'deformable_aggregation': 2,
}

DTF_CASES = [(op, st) for st in stages.DTF_STAGES
             for op in ('frame_wise_aggregation', 'temporal_correlation', 'temporal_aggregation')]
SIFA_CASES = [(op, st) for st in stages.SIFA_STAGES
              for op in ('deformable_correlation', 'deformable_aggregation')]
# SIFA-Swin's unshifted blocks: the Swin stage shapes (SIFA-Swin-B's equal DTF-Swin-B's).
SIFA_SWIN_CASES = [('temporal_correlation_aggregation', st) for st in stages.DTF_SWIN_B]


@pytest.mark.parametrize('op,stage', DTF_CASES + SIFA_CASES + SIFA_SWIN_CASES,
                         ids=[f'{op}-{st.label}' for op, st in DTF_CASES + SIFA_CASES
                              + SIFA_SWIN_CASES])
def test_forward_and_backward_lower_for_cuda(op, stage):
  text = lower_text(forward_and_vjp(op, 'pallas'), *abstract_inputs(op, stage))
  assert text.count(TRITON_CALL) == KERNELS_PER_VJP[op], text.count(TRITON_CALL)


def test_float32_kernels_lower_for_cuda():
  stage = stages.DTF_RESNET50[0]
  for op in ('frame_wise_aggregation', 'deformable_correlation'):
    text = lower_text(forward_and_vjp(op, 'pallas'),
                      *abstract_inputs(op, stage, jnp.float32))
    assert text.count(TRITON_CALL) == KERNELS_PER_VJP[op]


SMALL = jax.ShapeDtypeStruct((1, 2, 5, 6, 16), jnp.float32)
SMALL_WEIGHT = jax.ShapeDtypeStruct((2, 3, 3, 16), jnp.float32)


@pytest.mark.parametrize('impl', ['auto', 'pallas'])
def test_cuda_lowering_uses_the_kernels(impl):
  text = lower_text(forward_and_vjp('temporal_correlation', impl), SMALL, SMALL_WEIGHT)
  assert text.count(TRITON_CALL) == 2


def test_cpu_lowering_of_auto_is_plain_xla_and_of_pallas_is_interpret_mode():
  auto = lower_text(forward_and_vjp('temporal_correlation', 'auto'), SMALL, SMALL_WEIGHT,
                    platform='cpu')
  pallas = lower_text(forward_and_vjp('temporal_correlation', 'pallas'), SMALL, SMALL_WEIGHT,
                      platform='cpu')
  # The kernel wrappers are jitted functions named after the kernel calls.
  assert '_correlation_fwd_call' not in auto and '_correlation_bwd_call' not in auto
  assert '_correlation_fwd_call' in pallas and '_correlation_bwd_call' in pallas
  assert TRITON_CALL not in auto and TRITON_CALL not in pallas


@pytest.mark.parametrize('op,stage', [('frame_wise_aggregation', stages.DTF_RESNET50[3]),
                                      ('deformable_aggregation', stages.SIFA_RESNET50[2])],
                         ids=lambda v: v if isinstance(v, str) else v.label)
def test_kernels_compile_to_cubin_without_spills(op, stage):
  """TTIR -> PTX -> ptxas (sm_90) on CPU with the ``triton`` package: registers fit, no spills."""
  pytest.importorskip('triton')
  compiled = aot.compile_kernels(forward_and_vjp(op, 'pallas'), *abstract_inputs(op, stage))
  assert len(compiled) == KERNELS_PER_VJP[op]
  for kernel in compiled:
    assert kernel.spill_bytes == 0, kernel
    assert kernel.registers <= 255 and kernel.shared_bytes <= 227 * 1024, kernel
