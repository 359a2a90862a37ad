"""The convolution and Linear layers of a network, dtf_jax vs PyTorch, one layer at a time.

A network's training step is mostly its convolutions (ResNets) or token matmuls (Swin). This
script answers whether the two frameworks run *those* at the same speed on this machine: for every
``Conv*`` / ``Linear`` layer of the PyTorch network of ``train_step.py`` (the conversion tests'
reference) and of the dtf_jax network converted from it (same weights, same inputs), it records the
layer's input shape during one forward, then times the layer alone, forward + backward (input,
weight and bias gradients; no input gradient for the first layer, which reads the video, as in the
step), PyTorch and dtf_jax alternating, median of ``--repeats``. Layers of one shape are timed once
and counted. It prints one row per layer shape and the totals: the time the step's layers take in
each framework, measured without the rest of the step. With ``--step`` it also times both
frameworks' whole training step (alternating) so the table shows what the layers leave to
everything else (normalisation, activations, attention, the temporal modules, the optimiser).

Layers are paired in call order (the two networks call them in the same order; a pair whose FLOPs
differ stops the script). Not layers: Swin's attention products (``q k^T``, ``a v``), DTF's filter
generation and complex channel mix (matmuls inside ``DTFBlock``), which are in "everything else".
The SIFA networks are not offered: dtf_jax runs SIFA-Swin's temporal conv as three shifted matmuls
and calls SIFA-ResNet's two heads in another order, so their layers do not pair one to one.

  python benchmarks/layer_ops.py c2d_resnet50 --step               # ~3 min on 2 cores
  python benchmarks/layer_ops.py c2d_swin_vit_s_p4_w7 --step --repeats 9
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402  (sets up the repository and torch_reference imports)
from dtf_jax import host_memory, xla_flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

NETWORKS = ('c2d_resnet50', 'c2d_dtf_resnet50', 'c2d_swin_vit_s_p4_w7', 'c2d_dtf_swin_vit_s_p4_w7')
_TORCH_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def layer_flops(out_numel: int, fan_in: int, input_grad: bool) -> float:
  """Forward + backward FLOPs of a conv/linear layer: 2 * outputs * fan-in per product."""
  products = 3 if input_grad else 2  # forward, weight gradient, (input gradient)
  return products * 2.0 * out_numel * fan_in


# Conv/Linear modules of the PyTorch networks that dtf_jax does not run as a layer: DTF's filter
# generation is a matmul inside ``DTFBlock`` (on the frames' features side by side). Left out on
# both sides; their time is in "everything else".
_NOT_LAYERS = ('filter_g',)


def torch_layer_calls(model: torch.nn.Module, video: torch.Tensor) -> list[dict]:
  """The conv/linear layers of one eval-mode forward, in call order, with their input shapes.

  Modules named in ``_NOT_LAYERS`` are left out.
  """
  calls = []

  def hook(module, inputs, output):
    x = inputs[0]
    if isinstance(module, torch.nn.Linear):
      fan_in, desc = module.in_features, f'Linear {module.in_features}->{module.out_features}'
    else:
      fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
      kernel = 'x'.join(map(str, module.kernel_size))
      stride = 'x'.join(map(str, module.stride))
      desc = f'{type(module).__name__} {kernel}/{stride} {module.in_channels}->{module.out_channels}'
    calls.append(dict(module=module, shape=tuple(x.shape), desc=desc,
                      input_grad=bool(calls), fan_in=fan_in, out_numel=output.numel()))

  handles = [m.register_forward_hook(hook) for name, m in model.named_modules()
             if isinstance(m, _TORCH_LAYERS) and name.rsplit('.', 1)[-1] not in _NOT_LAYERS]
  model.eval()
  with torch.no_grad():
    model(video)
  for h in handles:
    h.remove()
  return calls


def jax_layer_calls(model: nnx.Module, video: jax.Array) -> list[dict]:
  """The ``nnx.Conv`` / ``nnx.Linear`` layers of one eval-mode forward, in call order."""
  calls = []
  patched = []  # (layer, attribute, its own function), restored below
  for _, m in nnx.iter_graph(model):
    if not isinstance(m, (nnx.Conv, nnx.Linear)):
      continue
    attr = 'conv_general_dilated' if isinstance(m, nnx.Conv) else 'dot_general'
    original = getattr(m, attr)
    patched.append((m, attr, original))

    def recorder(lhs, rhs, *args, _m=m, _fn=original, **kwargs):
      out = _fn(lhs, rhs, *args, **kwargs)
      calls.append(dict(module=_m, shape=tuple(lhs.shape), input_grad=bool(calls),
                        out_numel=int(np.prod(out.shape))))
      return out

    setattr(m, attr, recorder)
  model.eval()
  try:
    model(video)
  finally:
    for m, attr, original in patched:
      setattr(m, attr, original)
  for c in calls:  # kernel (..., in/groups, out): the fan-in PyTorch counts
    c['fan_in'] = int(np.prod(c['module'].kernel.shape[:-1]))
  return calls


def torch_layer_step(call: dict, seed: int):
  """A function running the layer's forward + backward on fresh random data (PyTorch)."""
  gen = torch.Generator().manual_seed(seed)
  module = call['module']
  x = torch.randn(call['shape'], generator=gen).requires_grad_(call['input_grad'])
  module.train()
  with torch.no_grad():
    g = torch.randn_like(module(x))

  def run():
    for p in module.parameters():
      p.grad = None
    if x.grad is not None:
      x.grad = None
    module(x).backward(g)

  return run


def jax_layer_step(call: dict, seed: int):
  """A function running the layer's forward + backward on fresh random data (dtf_jax, jitted)."""
  graph, params = nnx.split(call['module'], nnx.Param)
  params = nnx.as_pure(params)
  key_x, key_g = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(key_x, call['shape'], jnp.float32)

  def forward(p, x):
    return nnx.merge(graph, p)(x)

  g = jax.random.normal(key_g, jax.eval_shape(forward, params, x).shape, jnp.float32)
  if call['input_grad']:
    step = jax.jit(lambda p, x: jax.vjp(forward, p, x)[1](g))
  else:
    step = jax.jit(lambda p, x: jax.vjp(lambda p: forward(p, x), p)[1](g))
  return lambda: jax.block_until_ready(step(params, x))


def pair_layers(torch_calls: list[dict], jax_calls: list[dict], *, where: str) -> dict:
  """Pairs the two frameworks' layer calls in call order and groups them by PyTorch layer shape.

  Returns ``{(description, PyTorch input shape, input grad): [calls, torch call, jax call,
  FLOPs]}`` in first-call order. Raises ``SystemExit`` when the counts or a pair's FLOPs differ.
  """
  if len(torch_calls) != len(jax_calls):
    raise SystemExit(f'{where}: PyTorch calls {len(torch_calls)} conv/linear layers, dtf_jax '
                     f'{len(jax_calls)}; cannot pair them')
  groups = {}
  for tc, jc in zip(torch_calls, jax_calls):
    t_flops = layer_flops(tc['out_numel'], tc['fan_in'], tc['input_grad'])
    j_flops = layer_flops(jc['out_numel'], jc['fan_in'], jc['input_grad'])
    if not math.isclose(t_flops, j_flops, rel_tol=1e-6):
      raise SystemExit(f'{where}: layer {tc["desc"]} on {tc["shape"]} has {t_flops:.3g} FLOPs in '
                       f'PyTorch but its dtf_jax partner on {jc["shape"]} {j_flops:.3g}')
    key = (tc['desc'], tc['shape'], tc['input_grad'])
    groups.setdefault(key, [0, tc, jc, t_flops])[0] += 1
  return groups


def time_alternating(runners: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
  """Median ms per runner, runners alternating (order flipped every repeat)."""
  names = list(runners)
  samples = {n: [] for n in names}
  for r in range(warmup + repeats):
    for n in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      runners[n]()
      if r >= warmup:
        samples[n].append((time.perf_counter() - start) * 1e3)
  return {n: statistics.median(v) for n, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('model', choices=NETWORKS)
  parser.add_argument('--repeats', type=int, default=7, help='timed runs per layer (median)')
  parser.add_argument('--step', action='store_true',
                      help='also time both whole training steps (alternating, --repeats)')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='PyTorch threads')
  parser.add_argument('--batch', type=int, default=None, help='override the batch size')
  parser.add_argument('--image-size', type=int, default=None, help='override the frame size')
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error('--repeats must be >= 1')
  xla_flags.add_default_flags()
  host_memory.reuse_step_memory()  # as train.py does
  torch.set_num_threads(args.threads)
  batch, size = train_step.CPU_SIZES[train_step.NETWORKS[args.model].family]
  torch_runner, jax_runner = train_step.build_pair(args.model, args.batch or batch,
                                                   args.image_size or size)
  jax_model = nnx.merge(jax_runner.eval_graph, jax_runner.params, jax_runner.rest)
  torch_calls = torch_layer_calls(torch_runner.model, torch_runner.video)
  jax_calls = jax_layer_calls(jax_model, jax_runner.video)
  groups = pair_layers(torch_calls, jax_calls, where=args.model)

  load = os.getloadavg()[0]
  peak = train_step.matmul_peak_flops()
  print(f'{args.model}: {len(torch_calls)} conv/linear layer calls in {len(groups)} shapes; '
        f'torch threads {torch.get_num_threads()}, load average {load:.2f}; forward + backward '
        f'per layer, median of {args.repeats}, alternating; float32 matmul peak (jax, 2048^3) '
        f'{peak / 1e9:.0f} GFLOP/s')
  print()
  print('| layer (PyTorch) | input (PyTorch layout) | calls | PyTorch ms | dtf_jax ms | '
        'dtf_jax/PyTorch | PyTorch GFLOP/s | dtf_jax GFLOP/s |')
  print('|---|---|---|---|---|---|---|---|')
  totals = collections.Counter()
  for i, ((desc, shape, input_grad), (count, tc, jc, flops)) in enumerate(groups.items()):
    ms = time_alternating({'torch': torch_layer_step(tc, i), 'jax': jax_layer_step(jc, i)},
                          args.repeats)
    totals['torch'] += count * ms['torch']
    totals['jax'] += count * ms['jax']
    totals['flops'] += count * flops
    grad_note = '' if input_grad else ' (no input grad)'
    print(f'| {desc}{grad_note} | {"x".join(map(str, shape))} | {count} | {ms["torch"]:.2f} | '
          f'{ms["jax"]:.2f} | {ms["jax"] / ms["torch"]:.2f} | {flops / ms["torch"] / 1e6:.0f} | '
          f'{flops / ms["jax"] / 1e6:.0f} |', flush=True)
  print(f'| all layers | | {len(torch_calls)} | {totals["torch"]:.0f} | {totals["jax"]:.0f} | '
        f'{totals["jax"] / totals["torch"]:.2f} | {totals["flops"] / totals["torch"] / 1e6:.0f} | '
        f'{totals["flops"] / totals["jax"] / 1e6:.0f} |')
  if args.step:
    jax_runner.compile()
    steps = time_alternating({'torch': torch_runner.run_train, 'jax': jax_runner.run_train},
                             args.repeats, warmup=1)
    print()
    print('| framework | training step ms | its layers alone ms (share) | everything else ms |')
    print('|---|---|---|---|')
    for fw, label in (('torch', 'PyTorch'), ('jax', 'dtf_jax')):
      print(f'| {label} | {steps[fw]:.0f} | {totals[fw]:.0f} ({totals[fw] / steps[fw]:.0%}) | '
            f'{steps[fw] - totals[fw]:.0f} |')
  print(f'load average at the end {os.getloadavg()[0]:.2f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
