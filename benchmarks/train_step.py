"""dtf_jax vs the PyTorch implementation of the same network: inference and training-step speed.

For each network the PyTorch model of ``tests/torch_reference`` (pure PyTorch ops standing in for
the originals' CUDA kernels, the originals' module names) is built with PyTorch's initialisation,
and the dtf_jax model gets *the same weights* through the converter (``dtf_jax.convert``). Then,
alternating A/B in one process (the order flips every repeat, so background load hits both
alike), the script times

* ``forward``: eval-mode inference (running BatchNorm statistics, no dropout), ``torch.inference_mode``
  vs a jitted ``model(video)``;
* ``train``: one full training step of the originals' recipe: train-mode forward (batch statistics,
  dropout / drop path), cross-entropy (SIFA-ResNet: sum over its two heads), backward, gradient
  clipping to global norm 40, SGD with momentum 0.9 and weight decay 1e-4. dtf_jax runs it as one
  jitted function whose parameter, optimiser and BatchNorm state buffers are donated.

and prints one table: median milliseconds over ``--repeats`` timed runs (after ``--warmup``
untimed ones), clips/s, peak memory of a training step, the JAX/PyTorch time ratio (<1: dtf_jax
is faster) and dtf_jax's achieved FLOP/s (FLOPs from XLA's cost analysis of the compiled step /
median time) against a float32 matmul peak measured in the same run.

Peak memory (CPU) is the process's resident-set high-water mark during one step minus its resident
set just before it (``/proc/self/clear_refs`` resets the mark; freed heap memory is returned with
``malloc_trim`` first), i.e. everything a step allocates and touches beyond the persistent model
and optimiser state: activations, gradients, temporaries. On a GPU: PyTorch's allocator peak over
the step (``torch.cuda.max_memory_allocated`` after a reset) and, for dtf_jax, the compiled step's
temporary buffer (XLA memory analysis; JAX's device peak counter cannot be reset between steps).
Memory is measured in ``MEMORY_STEPS`` extra steps per framework after the timed ones, never in a
timed step: ``malloc_trim`` makes the next step fault its heap memory in afresh, which slowed
PyTorch's steps by 15-22% when both were done in the same steps (before run N). The table of CPU
seconds also gives the minor page faults of a timed training step per framework.

Sizes: on CPU the issue's measurement sizes (ResNets: batch 2, 16 frames, 112x112; Swin-S: batch 1,
16 frames, 224x224); on a GPU the recipe's (24 clips of 16 frames at 224x224 per device; override
with ``--batch`` / ``--image-size``).

  python benchmarks/train_step.py                       # all six networks, ~13 min on 2 cores
  python benchmarks/train_step.py --models c2d_dtf_resnet50,c2d_sifa_swin_vit_s_p4_w7 --repeats 7
  python benchmarks/train_step.py --json results.json   # also write the rows as JSON
  python benchmarks/train_step.py --round-robin         # every network in one alternation
  python benchmarks/train_step.py --in-process          # one after another in this process
  python benchmarks/train_step.py --from-json results.json   # print the tables of a saved run

Schedule: by default each family's networks (the three ResNets, the three Swin-S networks) are
measured in a fresh process of their own (this script, started by this one, which gathers the rows
and prints the tables), built first and timed in one alternation: every round runs each of them in
both frameworks. So a temporal network's overhead over its C2D baseline is a difference of steps
taken in the same minutes (the VM's speed phases last minutes), and no family runs on the heap,
compiled executables or cache state another family left. Before session 9 the networks ran one
after another in one process (``--in-process``): in run T, SIFA-R50's dtf_jax steps took 824 ms
and 1.49 CPU-s after C2D-R50 and DTF-R50 had run, against 605-671 ms and 1.16-1.27 CPU-s in a
process of its own (two runs, same code; a slow phase may have added to it). ``--round-robin``
puts all six in one alternation in one process (6-13k page faults per dtf_jax step in run U: six
temporary buffers share one heap; 23-322 with one family's three).

Threads: PyTorch uses ``--threads`` intra-op threads (default: all cores); XLA:CPU uses all cores.

Host allocator: like ``train.py``, the script calls ``dtf_jax.host_memory.reuse_step_memory`` first
(XLA's per-step buffers stay mapped; ``DTF_JAX_REUSE_STEP_MEMORY=0`` measures without it; its
``mallopt`` settings apply to PyTorch's heap too). The header prints it, ``GLIBC_TUNABLES`` and the
kernel's transparent-huge-page mode, which change both frameworks' step times
(``benchmarks/README.md``, page faults): e.g.
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/train_step.py`` runs both with huge pages.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, 'tests'))  # the torch references import `torch_reference.*`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from dtf_jax import convert, host_memory, xla_flags  # noqa: E402
from dtf_jax.train import optim, steps  # noqa: E402
from torch_reference import resnet as torch_resnet  # noqa: E402
from torch_reference import swin as torch_swin  # noqa: E402

NUM_CLASSES = 400
CLIP_LENGTH = 16
LEARNING_RATE = 1e-4  # small: the benchmark repeats steps on one batch; speed does not depend on it
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
CLIP_NORM = 40.0
MEMORY_STEPS = 2  # untimed training steps per framework that measure peak memory


@dataclasses.dataclass(frozen=True)
class Network:
  name: str                               # registered dtf_jax model
  family: str                             # 'resnet' | 'swin'
  torch_model: Callable[[int], torch.nn.Module]   # image_size -> torch module


NETWORKS = {
    n.name: n for n in [
        Network('c2d_resnet50', 'resnet',
                lambda size: torch_resnet.c2d_resnet(num_classes=NUM_CLASSES)),
        Network('c2d_dtf_resnet50', 'resnet',
                lambda size: torch_resnet.c2d_dtf_resnet(clip_length=CLIP_LENGTH,
                                                         num_classes=NUM_CLASSES)),
        Network('c2d_sifa_resnet50', 'resnet',
                lambda size: torch_resnet.c2d_sifa_resnet(clip_length=CLIP_LENGTH,
                                                          num_classes=NUM_CLASSES)),
        Network('c2d_swin_vit_s_p4_w7', 'swin',
                lambda size: torch_swin.C2D_SWIN_ViT(img_size=size, num_classes=NUM_CLASSES)),
        Network('c2d_dtf_swin_vit_s_p4_w7', 'swin',
                lambda size: torch_swin.C2D_DTF_SWIN_ViT(img_size=size, num_classes=NUM_CLASSES,
                                                         clip_len=CLIP_LENGTH // 4)),
        Network('c2d_sifa_swin_vit_s_p4_w7', 'swin',
                lambda size: torch_swin.C2D_SIFA_SWIN_ViT(img_size=size, num_classes=NUM_CLASSES,
                                                          clip_len=CLIP_LENGTH // 4, K=3)),
    ]
}

# (batch, image size) per family: the CPU measurement and the recipe (per device) on GPU.
CPU_SIZES = {'resnet': (2, 112), 'swin': (1, 224)}
GPU_SIZES = {'resnet': (24, 224), 'swin': (24, 224)}


# ------------------------------------------------------------------------------------------------
# Memory measurement.
# ------------------------------------------------------------------------------------------------

class PeakMemory:
  """Peak memory of a code region: CPU resident set (Linux) or device allocator peaks."""

  def __init__(self, on_gpu: bool):
    self.on_gpu = on_gpu
    self._warned = False
    try:
      self._libc = ctypes.CDLL('libc.so.6')
    except OSError:
      self._libc = None

  @staticmethod
  def _status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
      return int(re.search(rf'{field}:\s+(\d+)', f.read()).group(1))

  def start(self) -> None:
    if self.on_gpu:
      if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
      self._base_torch = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
      return
    if self._libc is not None:
      self._libc.malloc_trim(0)
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the resident-set high-water mark to the current resident set
    except OSError:  # not Linux, or /proc read-only: the mark then spans the whole process
      if not self._warned:
        print('warning: cannot reset the RSS high-water mark (/proc/self/clear_refs); peak '
              'memory figures are process-wide peaks', file=sys.stderr)
        self._warned = True
    self._base = self._status_kib('VmRSS')

  def stop(self, framework: str) -> float:
    """Peak bytes above the level at ``start``."""
    if self.on_gpu:
      if framework == 'torch':
        return float(torch.cuda.max_memory_allocated() - self._base_torch)
      return float('nan')  # replaced by the XLA temp size in measure()
    return float(self._status_kib('VmHWM') - self._base) * 1024.0


# ------------------------------------------------------------------------------------------------
# The two implementations of one network.
# ------------------------------------------------------------------------------------------------

def cross_entropy_jax(outputs, labels):
  heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
  return sum(optax.softmax_cross_entropy_with_integer_labels(h.astype(jnp.float32), labels).mean()
             for h in heads)


def cross_entropy_torch(outputs, labels):
  heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
  return sum(torch.nn.functional.cross_entropy(h, labels) for h in heads)


def sgd_recipe(trainable_mask=None) -> optax.GradientTransformation:
  """The originals' optimiser step (SPEC.md 6.4) at a fixed learning rate.

  ``trainable_mask`` (params-shaped bools, ``steps.parameters_used_by``): parameters outside the
  loss's graph are left alone, as ``torch.optim.SGD`` skips parameters whose gradient is None and
  as ``train.py`` does (e.g. DTF-Swin's unused ``conv`` weights, SPEC.md 7.7).
  """
  return optim.only_trainable(optax.chain(
      optim.clip_by_global_norm_torch(CLIP_NORM),
      optax.add_decayed_weights(WEIGHT_DECAY),
      optax.trace(decay=MOMENTUM, nesterov=False),
      optax.scale(-LEARNING_RATE)), trainable_mask)


class JaxRunner:
  """Jitted eval forward and donated train step of a dtf_jax model (functional split/merge)."""

  def __init__(self, model: nnx.Module, video: jax.Array, labels: jax.Array):
    self.video, self.labels = video, labels
    model.eval()
    self.eval_graph, params, rest = nnx.split(model, nnx.Param, ...)
    model.train()
    self.train_graph, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    self.params, self.rest = params, rest
    eval_graph, train_graph = self.eval_graph, self.train_graph

    def loss_fn(p, r, video, labels):
      m = nnx.merge(train_graph, p, r)
      loss = cross_entropy_jax(m(video), labels)
      return loss, nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param)))

    self.trainable_mask = steps.parameters_used_by(
        lambda p: loss_fn(p, rest, video, labels)[0], params)
    tx = sgd_recipe(self.trainable_mask)
    self.opt_state = tx.init(params)

    def forward(params, rest, video):
      return nnx.merge(eval_graph, params, rest)(video)

    def train_step(params, opt_state, rest, video, labels):
      (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, video,
                                                                          labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_rest, loss

    self.forward = jax.jit(forward)
    self.train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))

  def compile(self) -> dict[str, float]:
    """Compiles both functions; returns their FLOPs (XLA cost analysis) and compile seconds."""
    out = {}
    for key, fn, args in (
        ('forward', self.forward, (self.params, self.rest, self.video)),
        ('train', self.train_step, (self.params, self.opt_state, self.rest, self.video, self.labels))):
      t0 = time.perf_counter()
      compiled = fn.lower(*args).compile()
      out[f'{key}_compile_s'] = time.perf_counter() - t0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out[f'{key}_flops'] = float(cost.get('flops', float('nan'))) if cost else float('nan')
      mem = compiled.memory_analysis()
      out[f'{key}_xla_temp_bytes'] = float(getattr(mem, 'temp_size_in_bytes', float('nan')))
    return out

  def run_forward(self) -> None:
    jax.block_until_ready(self.forward(self.params, self.rest, self.video))

  def run_train(self) -> None:
    self.params, self.opt_state, self.rest, loss = self.train_step(
        self.params, self.opt_state, self.rest, self.video, self.labels)
    jax.block_until_ready((self.params, loss))


class TorchRunner:
  """Eval forward under ``inference_mode`` and a full SGD training step of a torch model."""

  def __init__(self, model: torch.nn.Module, video: torch.Tensor, labels: torch.Tensor):
    self.model, self.video, self.labels = model, video, labels
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.SGD(self.params, lr=LEARNING_RATE, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY)
    self.cuda = video.is_cuda

  def _sync(self):
    if self.cuda:
      torch.cuda.synchronize()

  def run_forward(self) -> None:
    self.model.eval()
    with torch.inference_mode():
      self.model(self.video)
    self._sync()

  def run_train(self) -> None:
    self.model.train()
    self.opt.zero_grad(set_to_none=True)
    loss = cross_entropy_torch(self.model(self.video), self.labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
    self.opt.step()
    self._sync()


def build_pair(name: str, batch: int, image_size: int, *, seed: int = 0, on_gpu: bool = False,
               jax_overrides: dict | None = None):
  """(TorchRunner, JaxRunner) of one network with identical weights and inputs."""
  net = NETWORKS[name]
  torch.manual_seed(seed)
  torch_model = net.torch_model(image_size)
  state_dict = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # SPEC 2.7 warning for original Swin checkpoints
    jax_model = convert.from_pytorch(name, state_dict, num_classes=NUM_CLASSES,
                                     clip_length=CLIP_LENGTH, image_size=image_size,
                                     rngs=nnx.Rngs(seed), **(jax_overrides or {}))
  rng = np.random.default_rng(seed)
  video = rng.normal(size=(batch, CLIP_LENGTH, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(batch,))
  device = 'cuda' if on_gpu else 'cpu'
  torch_video = torch.from_numpy(video.transpose(0, 4, 1, 2, 3).copy()).to(device)
  torch_runner = TorchRunner(torch_model.to(device), torch_video,
                             torch.from_numpy(labels).to(device))
  jax_runner = JaxRunner(jax_model, jnp.asarray(video), jnp.asarray(labels, jnp.int32))
  return torch_runner, jax_runner


# ------------------------------------------------------------------------------------------------
# Measurement.
# ------------------------------------------------------------------------------------------------

def _process_usage() -> tuple[float, int]:
  """(user + system CPU seconds of all threads, minor page faults) of this process so far.

  Minor faults are pages the kernel had to map in on first touch; one ``getrusage`` reads both.
  """
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def transparent_huge_page_mode(path: str = '/sys/kernel/mm/transparent_hugepage/enabled') -> str:
  """The kernel's THP mode (``always`` / ``madvise`` / ``never``), or ``unknown``."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return 'unknown'
  return match.group(1) if match else 'unknown'


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
  """float32 FLOP/s of a jitted ``size x size`` matmul on the default device (fastest of ``repeats``).

  The fastest run, not the median: this is the machine's attainable peak, and background load
  only ever makes a run slower. ``main`` measures it before and after the networks and keeps the
  higher value.
  """
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * size**3 / min(times)


@dataclasses.dataclass
class _Network:
  """One network under measurement: its result row, both runners and the raw samples."""
  row: dict
  runners: dict
  times: dict = dataclasses.field(default_factory=dict)
  cpu_times: dict = dataclasses.field(default_factory=dict)
  faults: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for fw in self.runners:
      self.faults[fw] = []
      for kind in ('forward', 'train'):
        self.times[fw, kind], self.cpu_times[fw, kind] = [], []


def _build(name: str, *, batch: int, image_size: int, on_gpu: bool, jax_overrides: dict | None,
           log) -> _Network:
  t0 = time.perf_counter()
  torch_runner, jax_runner = build_pair(name, batch, image_size, on_gpu=on_gpu,
                                        jax_overrides=jax_overrides)
  row = dict(model=name, batch=batch, image_size=image_size, frames=CLIP_LENGTH)
  row.update(jax_runner.compile())
  log(f'  {name}: built + compiled in {time.perf_counter() - t0:.0f} s '
      f'(XLA compile: forward {row["forward_compile_s"]:.0f} s, train {row["train_compile_s"]:.0f} s)')
  return _Network(row, {'torch': torch_runner, 'jax': jax_runner})


def _time_rounds(networks: list[_Network], repeats: int, warmup: int) -> None:
  """Alternating timings: every round runs each network's forward and training steps in both
  frameworks (framework order and network order flip every round); the first ``warmup`` rounds
  are not kept."""
  for r in range(warmup + repeats):
    order = ('torch', 'jax') if r % 2 == 0 else ('jax', 'torch')
    for net in (networks if r % 2 == 0 else networks[::-1]):
      for kind in ('forward', 'train'):
        for fw in order:
          runner = net.runners[fw]
          fn = runner.run_forward if kind == 'forward' else runner.run_train
          cpu_start, faults_start = _process_usage()
          start = time.perf_counter()
          fn()
          elapsed = time.perf_counter() - start
          cpu_end, faults_end = _process_usage()
          if r >= warmup:
            net.times[fw, kind].append(elapsed)
            net.cpu_times[fw, kind].append(cpu_end - cpu_start)
            if kind == 'train':
              net.faults[fw].append(faults_end - faults_start)


def _finish(net: _Network, on_gpu: bool) -> dict:
  """Peak memory in steps of their own, then the row's medians, ratios and FLOP rates."""
  # Peak memory in steps of their own, after the timed ones: resetting the high-water mark
  # starts with malloc_trim, which hands the allocator's free memory back to the kernel, so the
  # next step faults it in again (PyTorch's heap: ~144k instead of ~15k page faults per
  # DTF-R50 step, +15-22% step time). Timing such steps made PyTorch look slower than it is
  # (benchmarks/README.md, run N).
  row = net.row
  memory = PeakMemory(on_gpu)
  peaks = {fw: [] for fw in net.runners}
  for _ in range(MEMORY_STEPS):
    for fw, runner in net.runners.items():
      memory.start()
      runner.run_train()
      peaks[fw].append(memory.stop(fw))
  for (fw, kind), values in net.times.items():
    row[f'{fw}_{kind}_ms'] = 1e3 * statistics.median(values)
    row[f'{fw}_{kind}_all_ms'] = [round(1e3 * v, 1) for v in values]
    row[f'{fw}_{kind}_cpu_ms'] = 1e3 * statistics.median(net.cpu_times[fw, kind])
  for fw, values in peaks.items():
    row[f'{fw}_train_peak_bytes'] = max(values)
    row[f'{fw}_train_minor_faults'] = statistics.median(net.faults[fw])  # (repeats >= 1)
  if on_gpu:
    row['jax_train_peak_bytes'] = row['train_xla_temp_bytes']
  for kind in ('forward', 'train'):
    row[f'{kind}_ratio'] = row[f'jax_{kind}_ms'] / row[f'torch_{kind}_ms']
    row[f'jax_{kind}_flops_per_s'] = row[f'{kind}_flops'] / (row[f'jax_{kind}_ms'] / 1e3)
  return row


def measure(name: str, *, batch: int, image_size: int, repeats: int, warmup: int, on_gpu: bool,
            jax_overrides: dict | None = None, log=print) -> dict:
  """Alternating A/B timings of one network; returns a row of results."""
  return measure_round_robin([(name, batch, image_size)], repeats=repeats, warmup=warmup,
                             on_gpu=on_gpu, jax_overrides=jax_overrides, log=log)[0]


def measure_round_robin(specs: list[tuple[str, int, int]], *, repeats: int, warmup: int,
                        on_gpu: bool, jax_overrides: dict | None = None, log=print) -> list[dict]:
  """All networks ``(name, batch, image_size)`` built first, then timed in one alternation.

  Every round runs each network's steps in both frameworks, so all medians (and the overheads
  over the C2D baselines, differences of two networks' medians) come from the same minutes of
  the run instead of each network's own stretch of it (the VM's speed phases last minutes).
  """
  networks = [_build(name, batch=batch, image_size=size, on_gpu=on_gpu,
                     jax_overrides=jax_overrides, log=log) for name, batch, size in specs]
  _time_rounds(networks, repeats, warmup)
  return [_finish(net, on_gpu) for net in networks]


def measure_here(specs: list[tuple[str, int, int]], *, round_robin: bool, repeats: int, warmup: int,
                 on_gpu: bool, jax_overrides: dict | None = None) -> list[dict]:
  """The networks measured in this process: in one alternation, or one after another."""
  if round_robin:
    return measure_round_robin(specs, repeats=repeats, warmup=warmup, on_gpu=on_gpu,
                               jax_overrides=jax_overrides)
  return [measure(name, batch=batch, image_size=size, repeats=repeats, warmup=warmup,
                  on_gpu=on_gpu, jax_overrides=jax_overrides) for name, batch, size in specs]


def family_groups(names: list[str]) -> list[list[str]]:
  """``names`` grouped by network family (ResNet, Swin), in order of first appearance."""
  groups: dict[str, list[str]] = {}
  for name in names:
    groups.setdefault(NETWORKS[name].family, []).append(name)
  return list(groups.values())


def child_command(names: list[str], argv: list[str], rows_path: str) -> list[str]:
  """The command that measures ``names`` in a fresh process, in one alternation, writing their
  rows to ``rows_path``.

  ``argv`` are this run's measurement options (repeats, warm-up, sizes, threads, overrides); the
  child prints only its build lines.
  """
  return [sys.executable, os.path.abspath(__file__), '--models', ','.join(names), '--round-robin',
          *argv, '--worker-json', rows_path]


def measure_in_processes(groups: list[list[str]], argv: list[str], log=print) -> list[dict]:
  """Each group of networks in a process of its own (``child_command``), one group after another.

  A group whose process fails is reported and left out (the other groups are still measured).
  """
  rows = []
  with tempfile.TemporaryDirectory(prefix='train_step_') as directory:
    for i, names in enumerate(groups):
      path = os.path.join(directory, f'group{i}.json')
      result = subprocess.run(child_command(names, argv, path), check=False)
      if result.returncode != 0 or not os.path.exists(path):
        log(f'  {", ".join(names)}: their measuring process failed (exit code '
            f'{result.returncode}); left out of the tables (rerun in this process: python '
            f'benchmarks/train_step.py --in-process --models {",".join(names)})')
        continue
      with open(path) as f:
        rows.extend(json.load(f))
  return rows


def add_temporal_overheads(rows: list[dict]) -> None:
  """Adds, per DTF/SIFA network, the extra train time over its C2D baseline in both frameworks."""
  by_name = {r['model']: r for r in rows}
  baselines = {'c2d_dtf_resnet50': 'c2d_resnet50', 'c2d_sifa_resnet50': 'c2d_resnet50',
               'c2d_dtf_swin_vit_s_p4_w7': 'c2d_swin_vit_s_p4_w7',
               'c2d_sifa_swin_vit_s_p4_w7': 'c2d_swin_vit_s_p4_w7'}
  for name, base in baselines.items():
    if name in by_name and base in by_name:
      row, ref = by_name[name], by_name[base]
      for fw in ('torch', 'jax'):
        row[f'{fw}_base_train_ms'] = ref[f'{fw}_train_ms']
        row[f'{fw}_train_overhead_ms'] = row[f'{fw}_train_ms'] - ref[f'{fw}_train_ms']
      row['overhead_ratio'] = row['jax_train_overhead_ms'] / row['torch_train_overhead_ms']


# The goals for the training step: PyTorch time / dtf_jax time.
SPEEDUP_TARGETS = {'c2d_dtf_resnet50': 1.5, 'c2d_sifa_resnet50': 1.5,
                   'c2d_dtf_swin_vit_s_p4_w7': 1.5, 'c2d_sifa_swin_vit_s_p4_w7': 3.0}


def format_table(rows: list[dict], peak_flops: float) -> str:
  head = ('| network | input | step | PyTorch ms | dtf_jax ms | JAX/PyTorch | dtf_jax clips/s | '
          'PyTorch peak MiB | dtf_jax peak MiB | dtf_jax GFLOP/s (% of matmul) |')
  lines = [head, '|' + '---|' * 10]
  for r in rows:
    size = f'{r["batch"]}x{r["frames"]}x{r["image_size"]}²'
    for kind in ('forward', 'train'):
      mem_t = f'{r["torch_train_peak_bytes"] / 2**20:.0f}' if kind == 'train' else ''
      mem_j = f'{r["jax_train_peak_bytes"] / 2**20:.0f}' if kind == 'train' else ''
      flops = r[f'jax_{kind}_flops_per_s']
      lines.append(
          f'| {r["model"]} | {size} | {kind} | {r[f"torch_{kind}_ms"]:.0f} | '
          f'{r[f"jax_{kind}_ms"]:.0f} | {r[f"{kind}_ratio"]:.2f} | '
          f'{r["batch"] / (r[f"jax_{kind}_ms"] / 1e3):.2f} | {mem_t} | {mem_j} | '
          f'{flops / 1e9:.0f} ({100 * flops / peak_flops:.0f}%) |')
  lines += ['', '| network | PyTorch train CPU-s | dtf_jax train CPU-s | PyTorch / dtf_jax page '
            'faults per train step | dtf_jax compile s (fwd / train) |', '|---|---|---|---|---|']
  for r in rows:  # process CPU time (user + system, all threads) per step: load-robust cost
    faults = '-'  # (rows of runs before N have no fault counts)
    if 'torch_train_minor_faults' in r:
      faults = f'{r["torch_train_minor_faults"]:.0f} / {r["jax_train_minor_faults"]:.0f}'
    lines.append(f'| {r["model"]} | {r["torch_train_cpu_ms"] / 1e3:.2f} | '
                 f'{r["jax_train_cpu_ms"] / 1e3:.2f} | {faults} | {r["forward_compile_s"]:.0f} / '
                 f'{r["train_compile_s"]:.0f} |')
  overhead = [r for r in rows if 'overhead_ratio' in r]
  if overhead:
    lines += ['', '| network | PyTorch train overhead over C2D (ms) | dtf_jax overhead (ms) | '
              'dtf_jax/PyTorch overhead (target <= 0.5) |', '|---|---|---|---|']
    for r in overhead:
      lines.append(f'| {r["model"]} | {r["torch_train_overhead_ms"]:+.0f} | '
                   f'{r["jax_train_overhead_ms"]:+.0f} | {r["overhead_ratio"]:.2f} |')
  targeted = [r for r in rows if r['model'] in SPEEDUP_TARGETS]
  if targeted:
    # The last two columns split the goal between the two parts of the step: keeping dtf_jax's
    # measured temporal overhead, how much faster than PyTorch's own C2D step would the shared
    # C2D backbone have to run ('unreachable': the overhead alone exceeds the time the goal allows).
    lines += ['', '| network | target speed-up | reached | dtf_jax ms needed | XLA FLOPs / matmul '
              'peak (ms, lower bound) | needed share of matmul peak | reached share | C2D backbone '
              'speed-up over PyTorch needed at this overhead | C2D backbone reached |',
              '|---|---|---|---|---|---|---|---|---|']
    for r in targeted:
      target = SPEEDUP_TARGETS[r['model']]
      needed_ms = r['torch_train_ms'] / target
      bound_ms = 1e3 * r['train_flops'] / peak_flops
      backbone_needed = backbone_reached = '-'
      if 'jax_train_overhead_ms' in r:
        backbone_ms = needed_ms - r['jax_train_overhead_ms']
        backbone_needed = (f'{r["torch_base_train_ms"] / backbone_ms:.2f}x' if backbone_ms > 0
                           else 'unreachable')
        backbone_reached = f'{r["torch_base_train_ms"] / r["jax_base_train_ms"]:.2f}x'
      lines.append(f'| {r["model"]} | {target:.1f}x | {1 / r["train_ratio"]:.2f}x | '
                   f'{needed_ms:.0f} | {bound_ms:.0f} | {100 * bound_ms / needed_ms:.0f}% | '
                   f'{100 * bound_ms / r["jax_train_ms"]:.0f}% | {backbone_needed} | '
                   f'{backbone_reached} |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(NETWORKS),
                      help='comma-separated registered names (default: all six)')
  parser.add_argument('--repeats', type=int, default=5, help='timed runs per step kind (median)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed runs after compilation')
  parser.add_argument('--batch', type=int, default=None, help='override the batch size')
  parser.add_argument('--image-size', type=int, default=None, help='override the frame size')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='PyTorch intra-op threads (XLA:CPU uses all cores)')
  parser.add_argument('--override', action='append', default=[], metavar='KEY=VALUE',
                      help='dtf_jax model override, e.g. dtype=bfloat16 or remat=True (repeatable)')
  parser.add_argument('--round-robin', action='store_true',
                      help='build every network first, then time them all in one alternation in '
                           'this process (each round runs every network in both frameworks)')
  parser.add_argument('--in-process', action='store_true',
                      help='measure the networks one after another in this process (default: '
                           'each family in a fresh process, its networks in one alternation)')
  parser.add_argument('--json', default=None, help='also write the result rows to this file')
  parser.add_argument('--worker-json', default=None, help=argparse.SUPPRESS)  # a child's rows
  parser.add_argument('--from-json', default=None, metavar='FILE',
                      help='print the tables of an earlier --json run instead of measuring')
  args = parser.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    print(f'{args.from_json}: {saved["device"]}, load average {saved["load_average"]}, '
          f'dtf_jax overrides {saved["overrides"] or "none"}')
    add_temporal_overheads(saved['rows'])  # (recomputed: files of older versions lack some keys)
    print(format_table(saved['rows'], saved['matmul_peak_flops']))
    return 0

  xla_flags.add_default_flags()  # the flags train.py runs with (before the first computation)
  reused = host_memory.reuse_step_memory()  # as train.py does (process-wide: PyTorch's heap too)
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  names = [n.strip() for n in args.models.split(',') if n.strip()]
  unknown = [n for n in names if n not in NETWORKS]
  if unknown:
    parser.error(f'unknown --models {unknown}; choose from {", ".join(NETWORKS)}')
  if args.repeats < 1 or args.warmup < 0:
    parser.error('--repeats must be >= 1 and --warmup >= 0')
  overrides = {}
  for item in args.override:
    key, _, value = item.partition('=')
    overrides[key] = {'True': True, 'False': False}.get(value, value)

  torch.set_num_threads(args.threads)
  on_gpu = jax.default_backend() == 'gpu'
  sizes = GPU_SIZES if on_gpu else CPU_SIZES
  specs = [(name, args.batch or sizes[NETWORKS[name].family][0],
            args.image_size or sizes[NETWORKS[name].family][1]) for name in names]
  measure_args = dict(round_robin=args.round_robin, repeats=args.repeats, warmup=args.warmup,
                      on_gpu=on_gpu, jax_overrides=overrides)
  if args.worker_json:  # a child of the default schedule: measure, write the rows, no tables
    rows = measure_here(specs, **measure_args)
    with open(args.worker_json, 'w') as f:
      json.dump(rows, f)
    return 0

  device = jax.devices()[0]
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'device: {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, '
        f'torch threads {torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}, '
        f'load average {load:.2f}')
  print(f'XLA_FLAGS: {os.environ.get("XLA_FLAGS", "") or "(none)"}')
  print(f'host allocator (both frameworks): GLIBC_TUNABLES={tunables or "(none)"}, transparent huge '
        f'pages {transparent_huge_page_mode()}, dtf_jax.host_memory.reuse_step_memory '
        f'{"applied" if reused else f"off ({host_memory.ENV_SWITCH}=0 or not a glibc CPU run)"}')
  peak = matmul_peak_flops()
  print(f'float32 matmul peak (2048^3, jitted, fastest of 10; measured again at the end): '
        f'{peak / 1e9:.0f} GFLOP/s', flush=True)
  if args.round_robin or args.in_process:
    schedule = ('all networks in one alternation' if args.round_robin
                else 'one network at a time, one process')
    rows = measure_here(specs, **measure_args)
  else:
    schedule = 'each family in a fresh process, its networks in one alternation'
    child_argv = ['--repeats', str(args.repeats), '--warmup', str(args.warmup),
                  '--threads', str(args.threads)]
    for flag, value in (('--batch', args.batch), ('--image-size', args.image_size)):
      if value is not None:
        child_argv += [flag, str(value)]
    for item in args.override:
      child_argv += ['--override', item]
    rows = measure_in_processes(family_groups(names), child_argv)
  add_temporal_overheads(rows)
  peak = max(peak, matmul_peak_flops())
  load_end = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print()
  print(f'median of {args.repeats} (after {args.warmup} warm-up), alternating A/B, {schedule}; '
        f'load average {load:.2f} -> {load_end:.2f}; float32 matmul peak {peak / 1e9:.0f} GFLOP/s; '
        f'dtf_jax overrides {overrides or "none"}')
  print(format_table(rows, peak))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(device=device.device_kind, matmul_peak_flops=peak, load_average=[load, load_end],
                     overrides=overrides, glibc_tunables=tunables, reuse_step_memory=reused,
                     schedule=schedule, rows=rows), f, indent=1)
  return 0 if len(rows) == len(specs) else 1  # (a failed child's networks are missing)


if __name__ == '__main__':
  sys.exit(main())
