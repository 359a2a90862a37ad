"""Ahead-of-time checks of the Triton kernels from a machine without a GPU.

* ``lower_for_gpu``: lowers a jitted function for CUDA against an abstract GPU device (the Pallas
  Triton backend needs one to pick the compute capability), without allocating anything.
* ``compile_kernels``: additionally captures the Triton IR (TTIR) of every Pallas kernel in that
  lowering and compiles it to a cubin with the ``triton`` package (TTIR -> TTGIR -> LLVM -> PTX ->
  ``ptxas``, all on CPU), then reads the resource usage (registers, spilled bytes, shared memory)
  with ``cuobjdump``. This catches what lowering alone cannot: register spills, shared-memory
  overflow, unsupported Triton ops after layout assignment.

``compile_kernels`` needs the optional ``triton`` package (a dependency of PyTorch) and
intercepts the private Pallas lowering function ``lower_jaxpr_to_triton_module`` to see the IR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import time

import jax
from jax._src import mesh as mesh_lib

DEVICE_KINDS = {'sm90': 'NVIDIA H100', 'sm80': 'NVIDIA A100'}


def abstract_gpu_mesh(device_kind: str = 'NVIDIA H100'):
  """Context manager: an abstract one-device GPU mesh (no GPU needed)."""
  device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=132, platform='gpu')
  return jax.sharding.use_abstract_mesh(
      mesh_lib.AbstractMesh((1,), ('x',), abstract_device=device))


def lower_for_gpu(fn, *args, device_kind: str = 'NVIDIA H100'):
  """``jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))`` for an abstract GPU."""
  with abstract_gpu_mesh(device_kind):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
  """Resource usage of one compiled Pallas kernel."""
  name: str
  num_warps: int
  registers: int
  spill_bytes: int  # LOCAL memory per thread (register spills); 0 means no spills.
  shared_bytes: int
  compile_seconds: float


@contextlib.contextmanager
def _capture_triton_ir():
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  original = lowering.lower_jaxpr_to_triton_module
  captured = []

  def spy(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = spy
  try:
    yield captured
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def compile_kernels(fn, *args, capability: int = 90, num_stages: int = 2,
                    workdir: str = '/tmp') -> list[CompiledKernel]:
  """Lowers ``fn`` for CUDA and compiles every Pallas Triton kernel in it to a cubin.

  Args:
    fn: the function to lower (e.g. forward + VJP of an op with ``impl='pallas'``).
    *args: ``jax.ShapeDtypeStruct`` arguments.
    capability: CUDA compute capability (90 = H100).
    num_stages: software-pipelining stages (the Pallas default on CUDA is 3; the kernels pass 2).
    workdir: where the temporary ``.ttir``/``.cubin`` files go.

  Returns:
    One ``CompiledKernel`` per kernel, in lowering order.
  """
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top

  kind = DEVICE_KINDS.get(f'sm{capability}', 'NVIDIA H100')
  with _capture_triton_ir() as captured:
    text = lower_for_gpu(fn, *args, device_kind=kind).as_text()
  warps = [int(w) for w in re.findall(r'num_warps = (\d+) : i32', text)]
  if len(warps) != len(captured):
    raise RuntimeError(f'found {len(captured)} kernels but {len(warps)} Triton custom calls')
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                           'cuobjdump')
  results = []
  for ttir, num_warps in zip(captured, warps):
    name = re.search(r'tt\.func public @([\w$.]+)', ttir).group(1)
    path = os.path.join(workdir, f'{name}_{os.getpid()}.ttir')
    with open(path, 'w') as f:
      f.write(ttir)
    start = time.perf_counter()
    kernel = triton.compile(path, target=GPUTarget('cuda', capability, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    seconds = time.perf_counter() - start
    cubin = path[:-5] + '.cubin'
    with open(cubin, 'wb') as f:
      f.write(kernel.asm['cubin'])
    usage = subprocess.run([cuobjdump, '--dump-resource-usage', cubin], capture_output=True,
                           text=True, check=True).stdout
    os.remove(path)
    os.remove(cubin)
    field = lambda key: int(re.search(rf'{key}:(\d+)', usage).group(1))
    results.append(CompiledKernel(name, num_warps, field('REG'), field('LOCAL'),
                                  kernel.metadata.shared, seconds))
  return results
