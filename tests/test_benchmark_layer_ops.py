"""``benchmarks/layer_ops.py``: layer calls are recorded, counted and paired right; its tables add up.

The FLOPs of recorded calls are checked against hand counts on a small two-framework model, the
pairing against deliberately mismatched call lists, and a smoke run of the real script (tiny
C2D-ResNet50, one repeat) against its own rows: the totals row is the sum of calls x ms.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

torch = pytest.importorskip('torch')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCHMARKS = os.path.join(_REPO, 'benchmarks')
sys.path.insert(0, _BENCHMARKS)
import layer_ops  # noqa: E402  pylint: disable=g-import-not-at-top

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
from flax import nnx  # noqa: E402  pylint: disable=g-import-not-at-top

from dtf_jax.layers import common  # noqa: E402  pylint: disable=g-import-not-at-top


class _TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1), bias=False)
    self.conv2 = torch.nn.Conv3d(8, 4, (1, 1, 1), stride=(1, 2, 2), bias=False)
    self.fc = torch.nn.Linear(4, 5)

  def forward(self, x):  # (N, C, T, H, W)
    return self.fc(self.conv2(self.conv1(x)).mean(dim=(2, 3, 4)))


class _JaxNet(nnx.Module):

  def __init__(self, rngs):
    self.conv1 = common.conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1), rngs=rngs)
    self.conv2 = common.conv3d(8, 4, (1, 1, 1), strides=(1, 2, 2), rngs=rngs)
    self.fc = common.linear(4, 5, rngs=rngs)

  def __call__(self, x):  # (N, T, H, W, C)
    return self.fc(self.conv2(self.conv1(x)).mean(axis=(1, 2, 3)))


def test_recorded_calls_have_the_hand_counted_flops_and_pair_up():
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, 2, 6, 6, 3)).astype(np.float32)  # N, T, H, W, C
  torch_video = torch.from_numpy(video.transpose(0, 4, 1, 2, 3))
  torch_calls = layer_ops.torch_layer_calls(_TorchNet(), torch_video)
  jax_calls = layer_ops.jax_layer_calls(_JaxNet(nnx.Rngs(0)), jax.numpy.asarray(video))
  # Hand counts: conv1 writes 2*8*2*6*6 outputs of fan-in 3*9, no input gradient (it reads the
  # video): forward + weight gradient; conv2 writes 2*4*2*3*3 outputs of fan-in 8, three products;
  # fc 2*5 outputs of fan-in 4.
  expected = [2 * 2 * (2 * 8 * 2 * 6 * 6) * 27, 3 * 2 * (2 * 4 * 2 * 3 * 3) * 8,
              3 * 2 * (2 * 5) * 4]
  for calls in (torch_calls, jax_calls):
    assert [layer_ops.layer_flops(c['out_numel'], c['fan_in'], c['input_grad'])
            for c in calls] == expected
  assert [c['shape'] for c in jax_calls] == [(2, 2, 6, 6, 3), (2, 2, 6, 6, 8), (2, 4)]
  assert [c['shape'] for c in torch_calls] == [(2, 3, 2, 6, 6), (2, 8, 2, 6, 6), (2, 4)]
  groups = layer_ops.pair_layers(torch_calls, jax_calls, where='net')
  assert [g[0] for g in groups.values()] == [1, 1, 1]
  assert [k[0] for k in groups] == ['Conv3d 1x3x3/1x1x1 3->8', 'Conv3d 1x1x1/1x2x2 8->4',
                                    'Linear 4->5']
  # The recorder is removed again: the model's layers call their own functions afterwards.
  net = _JaxNet(nnx.Rngs(0))
  layer_ops.jax_layer_calls(net, jax.numpy.asarray(video))
  assert net.conv1.conv_general_dilated is common.fast_conv3d
  assert net.fc.dot_general is common.linear_dot_general
  # Each timed layer step runs: forward + backward of the recorded layer on its recorded shape.
  for call in jax_calls:
    layer_ops.jax_layer_step(call, 0)()
  for call in torch_calls:
    layer_ops.torch_layer_step(call, 0)()


def test_pairing_refuses_mismatched_networks():
  call = dict(desc='Linear 4->5', shape=(2, 4), input_grad=True, fan_in=4, out_numel=10)
  other = dict(call, fan_in=8)
  with pytest.raises(SystemExit, match='cannot pair'):
    layer_ops.pair_layers([call, call], [call], where='net')
  with pytest.raises(SystemExit, match='FLOPs'):
    layer_ops.pair_layers([call], [other], where='net')


def test_smoke_run_rows_add_up(capsys):
  threads = str(torch.get_num_threads())
  assert layer_ops.main(['c2d_resnet50', '--batch', '1', '--image-size', '32', '--repeats', '1',
                         '--step', '--threads', threads]) == 0
  out = capsys.readouterr().out
  rows = re.findall(r'^\| (Conv3d|Linear)[^|]*\| [\dx]+ \| (\d+) \| ([\d.]+) \| ([\d.]+) \|',
                    out, re.M)
  assert rows and rows[0][0] == 'Conv3d'
  calls = sum(int(r[1]) for r in rows)
  total = re.search(r'^\| all layers \| \| (\d+) \| (\d+) \| (\d+) \|', out, re.M)
  assert int(total.group(1)) == calls == 54  # 53 convolutions + the classifier of ResNet-50
  for column, fw in ((2, 1), (3, 2)):
    summed = sum(int(r[1]) * float(r[column]) for r in rows)
    assert abs(int(total.group(fw + 1)) - summed) <= 0.5 + 0.005 * calls
  for label, fw in (('PyTorch', 2), ('dtf_jax', 3)):
    step_ms, layers_ms, rest_ms = map(int, re.search(
        rf'^\| {label} \| (\d+) \| (\d+) \(\d+%\) \| (-?\d+) \|$', out, re.M).groups())
    assert layers_ms == int(total.group(fw)) and abs(step_ms - layers_ms - rest_ms) <= 1
