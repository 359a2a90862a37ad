"""``benchmarks/profile_step.py``: op time by named scope.

The scope matching and the forward / backward split on made-up op names, then the DTF block's
compiled gradient: every default scope names ops of its forward and of its backward, so the
profile can attribute the block's time to its phases.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip('torch')  # profile_step imports train_step, which imports torch

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
sys.path.insert(0, _BENCHMARKS)
import profile_step  # noqa: E402  pylint: disable=g-import-not-at-top

from dtf_jax.layers.dtf_block import DTFBlock  # noqa: E402


def test_in_scope_matches_whole_scope_names_in_forward_and_backward_op_names():
  backward = 'jit(train_step)/transpose(jvp(DTFBlock))/complex_mix/dot_general'
  assert profile_step.in_scope(backward, 'DTFBlock')
  assert profile_step.in_scope(backward, 'complex_mix')
  assert profile_step.in_scope('jit(f)/DTFBlock/add', 'DTFBlock')
  assert profile_step.in_scope('DTFBlock', 'DTFBlock')
  assert not profile_step.in_scope('jit(f)/DTFBlockX/add', 'DTFBlock')
  assert not profile_step.in_scope('jit(f)/my_DTFBlock/add', 'DTFBlock')
  assert not profile_step.in_scope('jit(f)/complex_mixer/add', 'complex_mix')


def test_scope_times_split_forward_and_backward():
  index = {'a': ('f32[2]', 'jit(f)/jvp(DTFBlock)/complex_mix/dot_general'),
           'b': ('f32[2]', 'jit(f)/transpose(jvp(DTFBlock))/complex_mix/dot_general'),
           'c': ('f32[2]', 'jit(f)/transpose(jvp(DTFBlock))/add'),
           'd': ('f32[2]', 'jit(f)/conv_general_dilated')}
  totals = {'a': 3, 'b': 5, 'c': 7, 'd': 11, 'unknown': 13}
  times = profile_step.scope_times(totals, index, ['DTFBlock', 'complex_mix', 'absent'])
  assert times == {'DTFBlock': (3, 12), 'complex_mix': (3, 5), 'absent': (0, 0)}


def test_dtf_block_phases_are_named_in_its_compiled_gradient():
  block = DTFBlock(8, 4, kernel_impl='xla', rngs=nnx.Rngs(0))
  block.alpha1[...] = jnp.ones((8,))  # a non-zero path through the spectral branch
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 5, 5, 8)), jnp.float32)
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def loss(params, rest, x):  # train mode: batch statistics, as in the profiled step
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, rest, x).compile().as_text()
  op_names = [op for _, op in profile_step._hlo_index(hlo).values()]
  for scope in profile_step.DEFAULT_SCOPES.split(','):
    named = [op for op in op_names if profile_step.in_scope(op, scope)]
    assert any('transpose(' not in op for op in named), f'no forward op in scope {scope}'
    assert any('transpose(' in op for op in named), f'no backward op in scope {scope}'
