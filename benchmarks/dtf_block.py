"""What the DTF blocks of a network cost on this machine: forward + backward of each stage's block.

For every stage of ``c2d_dtf_resnet50`` (batch 2 x 16 frames x 112², the size of ``train_step.py``)
or ``c2d_dtf_swin_vit_s_p4_w7`` (batch 1 x 16 x 224²), times the gradient of one ``DTFBlock``
(forward + backward w.r.t. its input and parameters, float32, jitted, median of ``--repeats``) at
that stage's shape and, alone, its fused frame-wise aggregation (steps 1-4, ``ops``), and prints one
table with the stage's block count and the sum over all DTF blocks of the network: the part of the
network's training step that the DTF blocks take, measured without the rest of the step.

  python benchmarks/dtf_block.py                                  # both networks, ~1 min
  python benchmarks/dtf_block.py --network c2d_dtf_swin_vit_s_p4_w7 --repeats 15
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax import host_memory, ops, xla_flags
from dtf_jax.layers.dtf_block import DTFBlock
from kernel_ops import time_ms  # same timing as the kernel benchmark: median after warm-up

CLIP_FRAMES = 4  # frames reaching the DTF blocks: 16-frame clips after the temporal stride 4

# network -> (batch, [(stage, spatial size, channels, DTF blocks in the stage)]). DTF-ResNet50: a
# DTF block in every bottleneck (3, 4, 6, 3); DTF-Swin-S: in the unshifted blocks of depths
# (2, 2, 18, 2).
NETWORKS = {
    'c2d_dtf_resnet50': (2, [('layer1', 28, 64, 3), ('layer2', 14, 128, 4), ('layer3', 7, 256, 6),
                             ('layer4', 4, 512, 3)]),
    'c2d_dtf_swin_vit_s_p4_w7': (1, [('stage1', 56, 96, 1), ('stage2', 28, 192, 1),
                                     ('stage3', 14, 384, 9), ('stage4', 7, 768, 1)]),
}


def measure_stage(batch: int, size: int, channels: int, *, repeats: int, seed: int = 0):
  """(block forward + backward ms, frame-wise aggregation forward + backward ms) at one shape."""
  key_x, key_g = jax.random.split(jax.random.key(seed))
  shape = (batch, CLIP_FRAMES, size, size, channels)
  x = jax.random.normal(key_x, shape, jnp.float32)
  cotangent = jax.random.normal(key_g, shape, jnp.float32)
  block = DTFBlock(channels, CLIP_FRAMES, rngs=nnx.Rngs(seed))
  block.alpha1[...] = jnp.full((channels,), 0.1)  # 0 at init would let XLA drop the spectral path
  graph, params, rest = nnx.split(block, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def block_loss(p, x):
    return jnp.sum(nnx.merge(graph, p, rest)(x) * cotangent)

  weight = jnp.full((CLIP_FRAMES, 3, 3, channels), 1.0 / channels, jnp.float32)

  def aggregation_loss(x):
    u, r = ops.frame_wise_aggregation(x, weight, kernel_size=3, dilation=1, impl='xla')
    return jnp.sum(u * cotangent) + jnp.sum(r)

  block_grad = jax.jit(jax.grad(block_loss, argnums=(0, 1)))
  aggregation_grad = jax.jit(jax.grad(aggregation_loss))
  return (time_ms(block_grad, (params, x), repeats),
          time_ms(aggregation_grad, (x,), repeats))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--network', choices=sorted(NETWORKS), action='append',
                      help='repeatable (default: both)')
  parser.add_argument('--repeats', type=int, default=9, help='timed runs per shape (median)')
  args = parser.parse_args(argv)
  xla_flags.add_default_flags()  # the flags train.py runs with (before the first computation)
  host_memory.reuse_step_memory()  # as train.py does
  if args.repeats < 1:
    parser.error('--repeats must be >= 1')
  for name in args.network or sorted(NETWORKS):
    batch, stages = NETWORKS[name]
    print(f'\n{name}: one DTFBlock, forward + backward, float32, median of {args.repeats}')
    print('| stage | input (N, T, H, W, C) | blocks | block ms | of which frame-wise aggregation ms '
          '| all blocks of the stage ms |')
    print('|---|---|---|---|---|---|')
    total = 0.0
    for stage, size, channels, count in stages:
      block_ms, aggregation_ms = measure_stage(batch, size, channels, repeats=args.repeats)
      total += count * block_ms
      print(f'| {stage} | ({batch}, {CLIP_FRAMES}, {size}, {size}, {channels}) | {count} | '
            f'{block_ms:.1f} | {aggregation_ms:.1f} | {count * block_ms:.0f} |')
    print(f'| all | | {sum(s[3] for s in stages)} | | | {total:.0f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
