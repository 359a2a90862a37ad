"""What the temporal modules cost inside a training step, and how the VM's phase moves the speed-up.

Part 1 (always): the dtf_jax training step of a DTF network (the step of ``train_step.py``) compiled
three times, with every ``DTFBlock`` as it is, with only its frame-wise aggregation (steps 1-4,
``u + mean_k(r)``, so both outputs stay live) and replaced by the identity, timed alternating in one
process. The differences are what the blocks, their frame-wise aggregation and their spectral path
(steps 5-10) cost in the step, which ``dtf_block.py`` (the blocks alone) can only approximate. For
SIFA-Swin-S: the step with its temporal modules (inter-frame attention, tubelet convs), with one of
them, and without.
Measured in one process, these differences do not mix VM phases the way ``train_step.py``'s
overheads (steps of two networks taken minutes apart) do; ``--pytorch-overhead`` adds the PyTorch
network with and without its temporal modules (the same modules made the identity on its
instances) to the same alternation, so both frameworks' overheads and their ratio (the issue's
"temporal modules add at most half of what they add in PyTorch") come from one process.

Part 2 (``--pytorch-rounds N``): the same network in PyTorch and dtf_jax (``train_step.build_pair``),
N rounds of: ``--repeats`` dtf_jax steps in a row, as many PyTorch steps in a row, as many
PyTorch/dtf_jax pairs. Per round the speed-up with each framework alone and interleaved: whether
running next to the other framework costs either one anything, and how far one process's rounds
drift apart (the VM's speed phases).

  python benchmarks/dtf_in_step.py                                        # DTF-R50, ~2 min
  python benchmarks/dtf_in_step.py --pytorch-overhead                     # + PyTorch with / without
  python benchmarks/dtf_in_step.py --pytorch-rounds 3                     # + part 2, ~4 min more
  python benchmarks/dtf_in_step.py --network c2d_dtf_swin_vit_s_p4_w7     # ~5 min
  python benchmarks/dtf_in_step.py --network c2d_sifa_swin_vit_s_p4_w7    # ~6 min (4 variants)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtf_jax import host_memory, xla_flags  # noqa: E402

xla_flags.add_default_flags()  # the flags train.py runs with
host_memory.reuse_step_memory()  # as train.py does

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import layer_ops  # noqa: E402  (time_alternating)
import train_step  # noqa: E402  (sizes, the jitted step, the PyTorch pair)
from dtf_jax import ops  # noqa: E402
from dtf_jax.layers import dtf_block  # noqa: E402
from dtf_jax.layers import swin_temporal  # noqa: E402
from dtf_jax.models import create_model  # noqa: E402

MODEL_OVERRIDES: dict = {}  # create_model keywords for part 1 (the tests shrink the network)
PYTORCH_FULL = 'PyTorch, temporal modules as they are'
PYTORCH_IDENTITY = 'PyTorch, temporal modules = identity'


def _aggregation_only(block: dtf_block.DTFBlock, x):
  u, r = ops.frame_wise_aggregation(x, block.weights_cor[...], kernel_size=block.kernel_size,
                                    dilation=1, impl=block.kernel_impl)
  return u + jnp.mean(r, axis=-1, keepdims=True)


def _identity(module, x):
  del module
  return x


# Part 1's step variants per network: name -> None (as built) or (class, method, replacement).
_DTF_VARIANTS = {
    'DTF blocks as they are': None,
    'frame-wise aggregation only': (dtf_block.DTFBlock, '__call__', _aggregation_only),
    'DTF blocks = identity': (dtf_block.DTFBlock, '__call__', _identity),
}


def _zeros(module, x):
  del module
  return jnp.zeros_like(x)


_SIFA_SWIN_VARIANTS = {
    'SIFA modules as they are': None,
    'tubelet convs only': (swin_temporal.SIFASwinTransformerBlock, 'inter_frame_attention',
                           _zeros),
    'inter-frame attention only': (swin_temporal.SIFASwinTransformerBlock, 'tubelet_conv', _zeros),
    'SIFA modules = identity': (swin_temporal.SIFASwinTransformerBlock, 'temporal_interaction',
                                _identity),
}
VARIANTS = {
    'c2d_dtf_resnet50': _DTF_VARIANTS,
    'c2d_dtf_swin_vit_s_p4_w7': _DTF_VARIANTS,
    'c2d_sifa_swin_vit_s_p4_w7': _SIFA_SWIN_VARIANTS,
}


def _torch_identity(model):
  """Makes the PyTorch network's temporal modules the identity (on its instances; eager)."""
  from torch_reference import dtf_block as torch_dtf  # pylint: disable=g-import-not-at-top
  from torch_reference import swin as torch_swin  # pylint: disable=g-import-not-at-top
  for module in model.modules():
    if isinstance(module, torch_dtf.DTFBlock):
      module.forward = lambda x: x
    elif isinstance(module, torch_swin.SIFASwinTransformerBlock):
      module.forward_rtc = lambda x: x  # it adds its own residual
      module.forward_vtc = lambda x: x.new_zeros(())  # the caller adds x
  return model


@contextlib.contextmanager
def _patched(variant):
  """The variant's method replacement in place while tracing (``None``: nothing replaced)."""
  if variant is None:
    yield
    return
  cls, method, replacement = variant
  original = getattr(cls, method)
  setattr(cls, method, replacement)
  try:
    yield
  finally:
    setattr(cls, method, original)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return (time.perf_counter() - start) * 1e3


def decompose(network: str, batch: int, image_size: int, repeats: int,
              pytorch: bool = False) -> dict[str, float]:
  """Median step ms of each of the network's ``VARIANTS``, alternating (order flipped each repeat).

  With ``pytorch``, the PyTorch network with its temporal modules and with them as the identity
  (``_torch_identity``) join the same alternation: ``PYTORCH_FULL`` and ``PYTORCH_IDENTITY``.
  """
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(batch, train_step.CLIP_LENGTH, image_size, image_size, 3)),
                      jnp.float32)
  labels = jnp.asarray(rng.integers(0, train_step.NUM_CLASSES, size=(batch,)), jnp.int32)
  runners = {}
  for name, variant in VARIANTS[network].items():
    model = create_model(network, num_classes=train_step.NUM_CLASSES,
                         clip_length=train_step.CLIP_LENGTH, image_size=image_size,
                         rngs=nnx.Rngs(0), **MODEL_OVERRIDES)
    with _patched(variant):  # the runner traces the loss (trainable mask) when built
      runner = train_step.JaxRunner(model, video, labels)
      seconds = _timed(runner.run_train) / 1e3  # traces, compiles and runs once
    runner.run_train()  # warm-up
    print(f'  {name}: compiled in {seconds:.0f} s', flush=True)
    runners[name] = runner
  if pytorch:
    torch_video = torch.from_numpy(np.asarray(video).transpose(0, 4, 1, 2, 3).copy())
    torch_labels = torch.from_numpy(np.asarray(labels).astype(np.int64))
    for name, prepare in ((PYTORCH_FULL, lambda m: m), (PYTORCH_IDENTITY, _torch_identity)):
      torch.manual_seed(0)
      model = prepare(train_step.NETWORKS[network].torch_model(image_size))
      runners[name] = train_step.TorchRunner(model, torch_video, torch_labels)
      runners[name].run_train()  # warm-up
  return layer_ops.time_alternating({name: r.run_train for name, r in runners.items()}, repeats,
                                    warmup=0)  # each runner has had its warm-up step above


def pytorch_rounds(network: str, batch: int, image_size: int, repeats: int, rounds: int):
  """[(dtf_jax alone, dtf_jax after PyTorch, PyTorch alone, PyTorch after dtf_jax) ms] per round."""
  torch_runner, jax_runner = train_step.build_pair(network, batch, image_size)
  for _ in range(2):
    jax_runner.run_train()
    torch_runner.run_train()
  out = []
  for _ in range(rounds):
    jax_alone = [_timed(jax_runner.run_train) for _ in range(repeats)]
    torch_alone = [_timed(torch_runner.run_train) for _ in range(repeats)]
    jax_after, torch_after = [], []
    for _ in range(repeats):
      torch_after.append(_timed(torch_runner.run_train))
      jax_after.append(_timed(jax_runner.run_train))
    out.append(tuple(statistics.median(t) for t in (jax_alone, jax_after, torch_alone, torch_after)))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--network', choices=sorted(VARIANTS), default='c2d_dtf_resnet50')
  parser.add_argument('--repeats', type=int, default=13, help='timed steps per variant (median)')
  parser.add_argument('--batch', type=int, default=None, help='override the batch size')
  parser.add_argument('--image-size', type=int, default=None, help='override the frame size')
  parser.add_argument('--pytorch-overhead', action='store_true',
                      help='also time the PyTorch network with and without its temporal modules in '
                           'the same alternation: both frameworks\' overheads from one process')
  parser.add_argument('--pytorch-rounds', type=int, default=0,
                      help='also run part 2 with this many rounds (needs torch)')
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.pytorch_rounds < 0:
    parser.error('--repeats must be >= 1 and --pytorch-rounds >= 0')
  batch, image_size = train_step.CPU_SIZES[train_step.NETWORKS[args.network].family]
  batch, image_size = args.batch or batch, args.image_size or image_size

  print(f'{args.network}, batch {batch} x {train_step.CLIP_LENGTH} x {image_size}², float32, '
        f'training step, median of {args.repeats} alternating', flush=True)
  ms = decompose(args.network, batch, image_size, args.repeats, pytorch=args.pytorch_overhead)
  torch_ms = {name: ms.pop(name) for name in (PYTORCH_FULL, PYTORCH_IDENTITY) if name in ms}
  identity = list(ms.values())[-1]
  print('| temporal modules in the step | step ms | their cost ms |')
  print('|---|---|---|')
  for name, value in ms.items():
    print(f'| {name} | {value:.0f} | {value - identity:+.0f} |')
  for name, value in torch_ms.items():
    print(f'| {name} | {value:.0f} | {value - torch_ms[PYTORCH_IDENTITY]:+.0f} |')
  if VARIANTS[args.network] is _DTF_VARIANTS:
    full, aggregation = ms['DTF blocks as they are'], ms['frame-wise aggregation only']
    print(f'DTF blocks {full - identity:.0f} ms of the step: frame-wise aggregation '
          f'{aggregation - identity:.0f} ms, spectral path {full - aggregation:.0f} ms')
  else:
    full = ms['SIFA modules as they are']
    print(f'SIFA modules {full - identity:.0f} ms of the step: inter-frame attention '
          f'{full - ms["tubelet convs only"]:.0f} ms, tubelet convs '
          f'{full - ms["inter-frame attention only"]:.0f} ms (each: the step with it minus the step '
          f'without it)')
  if torch_ms:
    jax_cost = list(ms.values())[0] - identity
    torch_cost = torch_ms[PYTORCH_FULL] - torch_ms[PYTORCH_IDENTITY]
    print(f'overhead ratio dtf_jax / PyTorch (one process): {jax_cost:.0f} / {torch_cost:.0f} ms = '
          f'{jax_cost / torch_cost:.2f}; speed-up {torch_ms[PYTORCH_FULL] / list(ms.values())[0]:.2f}x')

  if args.pytorch_rounds:
    print(f'\n{args.network}: {args.pytorch_rounds} rounds of {args.repeats} steps each way '
          '(medians, ms)')
    print('| round | dtf_jax alone | dtf_jax after a PyTorch step | PyTorch alone | PyTorch after a '
          'dtf_jax step | speed-up alone | speed-up interleaved |')
    print('|---|---|---|---|---|---|---|')
    rows = pytorch_rounds(args.network, batch, image_size, args.repeats, args.pytorch_rounds)
    for i, (jax_alone, jax_after, torch_alone, torch_after) in enumerate(rows):
      print(f'| {i} | {jax_alone:.0f} | {jax_after:.0f} | {torch_alone:.0f} | {torch_after:.0f} | '
            f'{torch_alone / jax_alone:.2f} | {torch_after / jax_after:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
