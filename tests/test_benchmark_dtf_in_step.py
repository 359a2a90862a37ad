"""``benchmarks/dtf_in_step.py``: the three step variants differ as claimed, and its tables add up.

A smoke run of part 1 on a one-block-per-stage DTF-ResNet50 at 32² (one timed repeat) checks the
rows and the differences it prints; the variants' traced steps are checked to contain (or not) the
DTF block's operations; part 2's rounds run on stand-in runners whose step times are known.
"""

from __future__ import annotations

import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
sys.path.insert(0, _BENCHMARKS)
import dtf_in_step  # noqa: E402  pylint: disable=g-import-not-at-top

from dtf_jax.layers import dtf_block  # noqa: E402  pylint: disable=g-import-not-at-top
from dtf_jax.layers import swin_temporal  # noqa: E402  pylint: disable=g-import-not-at-top


def test_variants_replace_the_block_and_restore_it():
  block = dtf_block.DTFBlock(8, 4, rngs=nnx.Rngs(0))
  block.alpha1[...] = jnp.full((8,), 0.5)
  x = jax.random.normal(jax.random.key(1), (1, 4, 5, 5, 8))
  original = dtf_block.DTFBlock.__call__
  outputs = {}
  variants = dtf_in_step.VARIANTS['c2d_dtf_resnet50']
  for name, variant in variants.items():
    with dtf_in_step._patched(variant):
      outputs[name] = np.asarray(block(x))
    assert dtf_block.DTFBlock.__call__ is original
  full, aggregation, identity = (outputs[name] for name in variants)
  np.testing.assert_array_equal(identity, np.asarray(x))
  assert not np.allclose(aggregation, identity) and not np.allclose(full, aggregation)
  try:
    with dtf_in_step._patched((dtf_block.DTFBlock, '__call__', lambda b, y: y)):
      raise RuntimeError('boom')
  except RuntimeError:
    pass
  assert dtf_block.DTFBlock.__call__ is original


def test_sifa_swin_variant_removes_both_temporal_modules():
  variants = dtf_in_step.VARIANTS['c2d_sifa_swin_vit_s_p4_w7']
  cls, method, replacement = variants['SIFA modules = identity']
  assert (cls, method) == (swin_temporal.SIFASwinTransformerBlock, 'temporal_interaction')
  original = cls.temporal_interaction
  blocks = [swin_temporal.SIFASwinTransformerBlock(8, (4, 4), 2, clip_len=2, shift_size=shift,
                                                  window_size=2, rngs=nnx.Rngs(0))
            for shift in (0, 1)]
  for b in blocks:  # tda_norm starts at zero: give the unshifted block's output a scale
    b.tda_norm.scale[...] = jnp.ones((8,))
  x = jax.random.normal(jax.random.key(2), (2, 16, 8))
  for b in blocks:
    assert not np.allclose(np.asarray(b.temporal_interaction(x)), np.asarray(x))
    with dtf_in_step._patched(variants['SIFA modules = identity']):
      np.testing.assert_array_equal(np.asarray(b.temporal_interaction(x)), np.asarray(x))
  assert cls.temporal_interaction is original


def test_sifa_swin_single_module_variants_remove_exactly_one_module():
  """'tubelet convs only' leaves the shifted block as it is and makes the unshifted one the
  identity; 'inter-frame attention only' does the opposite; both restore the methods."""
  variants = dtf_in_step.VARIANTS['c2d_sifa_swin_vit_s_p4_w7']
  assert list(variants)[-1] == 'SIFA modules = identity'  # main() reads the identity row last
  cls = swin_temporal.SIFASwinTransformerBlock
  originals = (cls.inter_frame_attention, cls.tubelet_conv)
  unshifted, shifted = [cls(8, (4, 4), 2, clip_len=2, shift_size=shift, window_size=2,
                            rngs=nnx.Rngs(0)) for shift in (0, 1)]
  unshifted.tda_norm.scale[...] = jnp.ones((8,))
  x = jax.random.normal(jax.random.key(3), (2, 16, 8))
  as_built = {b: np.asarray(b.temporal_interaction(x)) for b in (unshifted, shifted)}
  for name, kept in (('tubelet convs only', shifted), ('inter-frame attention only', unshifted)):
    with dtf_in_step._patched(variants[name]):
      for b in (unshifted, shifted):
        got = np.asarray(b.temporal_interaction(x))
        if b is kept:
          np.testing.assert_allclose(got, as_built[b], rtol=1e-6, atol=1e-6)
        else:
          np.testing.assert_array_equal(got, np.asarray(x))
          assert not np.allclose(as_built[b], np.asarray(x))
  assert (cls.inter_frame_attention, cls.tubelet_conv) == originals


def test_part_one_smoke_run_prints_three_rows_and_their_differences(monkeypatch, capsys):
  monkeypatch.setattr(dtf_in_step, 'MODEL_OVERRIDES', {'layers': (1, 1, 1, 1)})
  assert dtf_in_step.main(['--repeats', '1', '--batch', '1', '--image-size', '32']) == 0
  out = capsys.readouterr().out
  rows = dict((name, (int(ms), int(cost))) for name, ms, cost in
              re.findall(r'^\| ([^|]+?) \| (\d+) \| ([+-]\d+) \|$', out, re.M))
  assert list(rows) == list(dtf_in_step.VARIANTS['c2d_dtf_resnet50'])
  identity = rows['DTF blocks = identity'][0]
  for ms, cost in rows.values():
    assert abs((ms - identity) - cost) <= 1
  blocks, aggregation, spectral = map(int, re.search(
      r'DTF blocks (-?\d+) ms of the step: frame-wise aggregation (-?\d+) ms, spectral path (-?\d+) ms',
      out).groups())
  assert abs(blocks - (aggregation + spectral)) <= 1


class _SleepRunner:
  """Stands in for a train_step runner: each step sleeps a known time and is logged."""

  def __init__(self, name, seconds, log):
    self.name, self.seconds, self.log = name, seconds, log

  def run_train(self):
    self.log.append(self.name)
    time.sleep(self.seconds)


def test_part_two_rounds_time_each_framework_alone_and_interleaved(monkeypatch, capsys):
  log = []
  monkeypatch.setattr(dtf_in_step.train_step, 'build_pair',
                      lambda *a, **k: (_SleepRunner('torch', 0.03, log), _SleepRunner('jax', 0.01, log)))
  rows = dtf_in_step.pytorch_rounds('c2d_dtf_resnet50', 1, 32, repeats=3, rounds=2)
  assert len(rows) == 2
  for jax_alone, jax_after, torch_alone, torch_after in rows:
    assert 9 <= jax_alone < 25 and 9 <= jax_after < 25
    assert 29 <= torch_alone < 45 and 29 <= torch_after < 45
  # Two warm-up pairs, then per round: 3 jax, 3 torch, 3 (torch, jax) pairs.
  round_log = ['jax'] * 3 + ['torch'] * 3 + ['torch', 'jax'] * 3
  assert log == ['jax', 'torch'] * 2 + round_log * 2


def test_pytorch_identity_patch_and_one_process_overhead_ratio(monkeypatch, capsys):
  import torch  # pylint: disable=g-import-not-at-top
  from torch_reference import dtf_block as torch_dtf  # pylint: disable=g-import-not-at-top
  from torch_reference import resnet as torch_resnet  # pylint: disable=g-import-not-at-top
  # The patch makes every torch DTF block of a network the identity, on its instances only.
  torch.manual_seed(0)
  patched, untouched = torch_dtf.DTFBlock(8, 4), torch_dtf.DTFBlock(8, 4)
  for block in (patched, untouched):
    torch.nn.init.normal_(block.alpha1)  # 0 at init: the block would return its input anyway
  dtf_in_step._torch_identity(torch.nn.Sequential(patched))
  x = torch.randn(1, 8, 4, 3, 3)
  assert torch.equal(patched(x), x)
  assert not torch.allclose(untouched(x), x)
  from torch_reference import swin as torch_swin  # pylint: disable=g-import-not-at-top
  sifa = torch_swin.SIFASwinTransformerBlock(8, (4, 4), 2, K=3, clip_len=2, window_size=2,
                                             shift_size=0)
  torch.nn.init.normal_(sifa.tda_norm.weight)
  tokens = torch.randn(2, 16, 8)
  assert not torch.allclose(sifa.forward_rtc(tokens), tokens)
  dtf_in_step._torch_identity(sifa)
  assert torch.equal(sifa.forward_rtc(tokens), tokens)
  assert torch.equal(tokens + sifa.forward_vtc(tokens), tokens)
  # Smoke run with both frameworks in one alternation; the printed ratio is the rows' ratio.
  monkeypatch.setattr(dtf_in_step, 'MODEL_OVERRIDES', {'layers': (1, 1, 1, 1)})
  small = dtf_in_step.train_step.Network(
      'c2d_dtf_resnet50', 'resnet',
      lambda size: torch_resnet.c2d_dtf_resnet(layers=(1, 1, 1, 1), clip_length=16,
                                               num_classes=dtf_in_step.train_step.NUM_CLASSES))
  monkeypatch.setitem(dtf_in_step.train_step.NETWORKS, 'c2d_dtf_resnet50', small)
  assert dtf_in_step.main(['--repeats', '1', '--batch', '1', '--image-size', '32',
                           '--pytorch-overhead']) == 0
  out = capsys.readouterr().out
  rows = dict((name, int(ms)) for name, ms, _ in
              re.findall(r'^\| ([^|]+?) \| (\d+) \| ([+-]\d+) \|$', out, re.M))
  assert list(rows)[-2:] == [dtf_in_step.PYTORCH_FULL, dtf_in_step.PYTORCH_IDENTITY]
  jax_cost, torch_cost, _ = re.search(
      r'overhead ratio dtf_jax / PyTorch \(one process\): (-?\d+) / (-?\d+) ms = (-?[\d.]+|-?inf|nan)',
      out).groups()
  assert abs(int(jax_cost) - (rows['DTF blocks as they are'] - rows['DTF blocks = identity'])) <= 1
  assert abs(int(torch_cost) - (rows[dtf_in_step.PYTORCH_FULL]
                                - rows[dtf_in_step.PYTORCH_IDENTITY])) <= 1
