"""Where the kernels run in the released networks: the real op shapes at 224x224, 16 frames.

One place for the stage shapes and the ops' argument shapes (``op_argument_specs``) used by the
CUDA lowering tests (tests/test_kernels_lowering.py), the roofline table (benchmarks/roofline.py),
the compile check (benchmarks/compile_kernels.py) and the benchmark (benchmarks/kernel_ops.py).
SPEC.md 4.5: after the stem T = 16/4 = 4; the SIFA dual branch runs at T = 2.

* ``c2d_dtf_resnet50``: the DTF block sits on the conv2 output, width ``w = planes``:
  64@56, 128@28, 256@14, 512@7 (op: ``frame_wise_aggregation``, i.e. correlation + aggregation).
* ``c2d_sifa_resnet50``: deformable ops on ``w`` = 128@28, 256@14, 512@7 and the dual branch
  512@14 with T = 2 (ops: ``deformable_correlation`` + ``deformable_aggregation``).
* ``c2d_dtf_swin_vit_b_p4_w7``: DTF blocks on the tokens, D = 128@56, 256@28, 512@14, 1024@7.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BATCH = 8


@dataclasses.dataclass(frozen=True)
class Stage:
  """One op call site: ``x`` is ``(batch, frames, size, size, channels)``."""
  model: str
  name: str
  channels: int
  size: int
  frames: int = 4
  batch: int = BATCH

  @property
  def x_shape(self) -> tuple[int, int, int, int, int]:
    return (self.batch, self.frames, self.size, self.size, self.channels)

  @property
  def label(self) -> str:
    return f'{self.model}:{self.name}:C{self.channels}@{self.size}x{self.size}xT{self.frames}'


DTF_RESNET50 = tuple(Stage('c2d_dtf_resnet50', f'layer{i + 1}', c, s)
                     for i, (c, s) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)]))
DTF_SWIN_B = tuple(Stage('c2d_dtf_swin_vit_b_p4_w7', f'stage{i + 1}', c, s)
                   for i, (c, s) in enumerate([(128, 56), (256, 28), (512, 14), (1024, 7)]))
SIFA_RESNET50 = (
    Stage('c2d_sifa_resnet50', 'layer2', 128, 28),
    Stage('c2d_sifa_resnet50', 'layer3', 256, 14),
    Stage('c2d_sifa_resnet50', 'layer4', 512, 7),
    Stage('c2d_sifa_resnet50', 'layer4_dual', 512, 14, frames=2),
)

DTF_STAGES = DTF_RESNET50 + DTF_SWIN_B
SIFA_STAGES = SIFA_RESNET50


def op_argument_specs(op: str, x_shape, dtype=jnp.bfloat16) -> dict[str, jax.ShapeDtypeStruct]:
  """The positional arguments of ``dtf_jax.ops.<op>`` (K = 3) for ``x`` of ``x_shape``, in order.

  ``x``, ``attn`` and ``offsets`` in ``dtype``; the correlation ``weight`` ``(T, 3, 3, C)`` is
  float32 as in the models. ``tuple(specs.values())`` is the argument list.
  """
  n, t, h, w, c = x_shape
  spec = jax.ShapeDtypeStruct
  x = spec(tuple(x_shape), dtype)
  weight = spec((t, 3, 3, c), jnp.float32)
  attn = spec((n, t, h, w, 9), dtype)
  offsets = spec((n, t, h, w, 9, 2), dtype)
  return {
      'temporal_correlation': dict(x=x, weight=weight),
      'temporal_aggregation': dict(x=x, attn=attn),
      'frame_wise_aggregation': dict(x=x, weight=weight),
      'temporal_correlation_aggregation': dict(x=x, weight=weight),
      'deformable_correlation': dict(x=x, offsets=offsets, weight=weight),
      'deformable_aggregation': dict(x=x, offsets=offsets, attn=attn),
  }[op]
