"""Where a dtf_jax training step (or forward) spends its time on XLA:CPU, op by op.

Compiles the same jitted step as ``benchmarks/train_step.py`` (no PyTorch involved), runs it under
``jax.profiler`` with XLA:CPU's per-thunk trace events, and prints

* the step's XLA cost analysis (FLOPs) and compiled temporary memory,
* time per op category (the HLO fusion name without its number, e.g. ``ynn_fusion`` = matmuls and
  convolutions run by YNNPACK, ``transpose_copy_fusion`` = layout transposes, ``while`` = loops),
  summed over threads and averaged over the profiled steps,
* the most expensive single ops with their output shape and the JAX operation they come from,
* time per named scope (``--scopes``; by default the DTF block and its phases, which
  ``dtf_jax.layers.dtf_block`` names with ``jax.named_scope``), forward and backward apart (an op
  of the backward carries ``transpose(...)`` in its name). Ops that XLA fused across a scope's edge
  count for the scope of the fusion's root.

Times are wall durations of the ops on their threads, so the totals exceed the step's wall time
when two threads work concurrently; the shares between categories are what this is for.

  python benchmarks/profile_step.py c2d_dtf_resnet50
  python benchmarks/profile_step.py c2d_swin_vit_s_p4_w7 --kind forward --top 30
  python benchmarks/profile_step.py c2d_dtf_swin_vit_s_p4_w7 --scopes DTFBlock,complex_mix
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtf_jax import host_memory, xla_flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import train_step  # noqa: E402  (the benchmark's JaxRunner and sizes)
from dtf_jax.models import create_model  # noqa: E402

_SKIP = ('ThunkExecutor', 'SlinkyThreadPool', 'end: ')
DEFAULT_SCOPES = 'DTFBlock,frame_wise_aggregation,filter_generation,complex_mix'


def _hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """``{instruction name: (result shape, JAX op_name)}`` from compiled HLO text."""
  index = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) ', line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      index[m.group(1)] = (m.group(2).split('{')[0], op.group(1) if op else '')
  return index


def in_scope(op_name: str, scope: str) -> bool:
  """Whether a JAX op name lies in the named scope (``.../scope/...``, ``jvp(scope)``, ...)."""
  return re.search(r'(^|[/(])' + re.escape(scope) + r'($|[/)])', op_name) is not None


def scope_times(totals: dict[str, int], index: dict[str, tuple[str, str]],
                scopes: list[str]) -> dict[str, tuple[int, int]]:
  """``{scope: (forward ns, backward ns)}`` summed over the ops in each scope."""
  out = {}
  for scope in scopes:
    forward = backward = 0
    for name, ns in totals.items():
      op_name = index.get(name, ('', ''))[1]
      if in_scope(op_name, scope):
        if 'transpose(' in op_name:
          backward += ns
        else:
          forward += ns
    out[scope] = (forward, backward)
  return out


def profile(fn, args, steps: int):
  """Per-event total durations (ns) over ``steps`` calls of ``fn(*args)``."""
  directory = tempfile.mkdtemp(prefix='dtf_profile_')
  try:
    with jax.profiler.trace(directory):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    trace = glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True)[0]
    from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
    data = _profile_data.ProfileData.from_file(trace)
    totals, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if not line.name.startswith('tf_XLA'):
          continue
        for event in line.events:
          if not event.name.startswith(_SKIP):
            totals[event.name] += event.duration_ns
            counts[event.name] += 1
    return totals, counts
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def _configure_process() -> None:
  """XLA:CPU's per-thunk trace events, the flags and host allocator of train.py (before the first
  computation; importing this module changes nothing, so the tests can)."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_xprof_traceme=true').strip()
  xla_flags.add_default_flags()  # the flags train.py runs with
  host_memory.reuse_step_memory()  # as train.py does


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('model', choices=sorted(train_step.NETWORKS))
  parser.add_argument('--kind', choices=('train', 'forward'), default='train')
  parser.add_argument('--steps', type=int, default=3, help='profiled steps (after 2 warm-up)')
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--scopes', default=DEFAULT_SCOPES,
                      help='comma-separated jax.named_scope names to sum op time over')
  parser.add_argument('--override', action='append', default=[], metavar='KEY=VALUE',
                      help='dtf_jax model override, e.g. dtype=bfloat16')
  args = parser.parse_args(argv)
  _configure_process()
  overrides = {}
  for item in args.override:
    key, _, value = item.partition('=')
    overrides[key] = {'True': True, 'False': False}.get(value, value)

  batch, size = train_step.CPU_SIZES[train_step.NETWORKS[args.model].family]
  model = create_model(args.model, num_classes=train_step.NUM_CLASSES,
                       clip_length=train_step.CLIP_LENGTH, image_size=size, rngs=nnx.Rngs(0),
                       **overrides)
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(batch, train_step.CLIP_LENGTH, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, train_step.NUM_CLASSES, size=(batch,)), jnp.int32)
  runner = train_step.JaxRunner(model, video, labels)
  if args.kind == 'train':
    step_args = [runner.params, runner.opt_state, runner.rest, video, labels]
    compiled = runner.train_step.lower(*step_args).compile()

    def step():  # threads the donated state through, like the benchmark
      out = compiled(*step_args)
      step_args[:3] = out[:3]
      return out
    call, call_args = step, ()
  else:
    compiled = runner.forward.lower(runner.params, runner.rest, video).compile()
    call, call_args = compiled, (runner.params, runner.rest, video)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  for _ in range(2):
    jax.block_until_ready(call(*call_args))
  start = time.perf_counter()
  jax.block_until_ready(call(*call_args))
  wall = time.perf_counter() - start
  totals, counts = profile(call, call_args, args.steps)
  index = _hlo_index(compiled.as_text())

  n = args.steps
  print(f'{args.model} {args.kind}: {wall * 1e3:.0f} ms wall (one unprofiled step), '
        f'{cost.get("flops", float("nan")) / 1e9:.1f} GFLOP, XLA temp '
        f'{memory.temp_size_in_bytes / 2**20:.0f} MiB, load average {os.getloadavg()[0]:.2f}')
  categories, category_counts = collections.Counter(), collections.Counter()
  for name, ns in totals.items():
    category = re.sub(r'[.\d]+$', '', name)
    categories[category] += ns
    category_counts[category] += counts[name]
  total = sum(categories.values())
  print(f'\nop time by category (ms per step, all threads; total {total / 1e6 / n:.0f} ms)')
  for category, ns in categories.most_common(args.top):
    print(f'  {ns / 1e6 / n:8.1f}  {100 * ns / total:5.1f}%  x{category_counts[category] // n:<5d} '
          f'{category}')
  print(f'\ntop {args.top} ops (ms per step)')
  for name, ns in totals.most_common(args.top):
    shape, op = index.get(name, ('?', ''))
    print(f'  {ns / 1e6 / n:8.2f}  x{counts[name] // n:<3d} {name:32s} {shape:28s} '
          f'{op.split("/")[-1][:48]}')
  scopes = [s for s in args.scopes.split(',') if s]
  rows = [(scope, f, b) for scope, (f, b) in scope_times(totals, index, scopes).items() if f + b]
  if rows:
    print('\nop time by named scope (ms per step, all threads: forward + backward = total, share)')
    for scope, f, b in rows:
      print(f'  {scope:28s} {f / 1e6 / n:7.1f} + {b / 1e6 / n:7.1f} = {(f + b) / 1e6 / n:7.1f}  '
            f'{100 * (f + b) / total:5.1f}%')
  return 0


if __name__ == '__main__':
  sys.exit(main())
