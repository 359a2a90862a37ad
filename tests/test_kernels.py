"""Numerics of the Pallas kernels (interpret mode on CPU) against the XLA path of dtf_jax.ops.

One shared test class (``_KernelContract``) states what every implementation must satisfy: its
forward and its VJP (w.r.t. every array argument, through ``jax.vjp``) equal those of
``impl='xla'`` on fresh random inputs, with tolerances scaled by the output dtype. Each subclass
plugs in one implementation and its cases:

* ``TestPallasDispatch``: the public ops with ``impl='pallas'`` (the dispatch seam; interpret mode on
  CPU), default block sizes, float32 and bfloat16;
* ``TestPallasSmallTiles``: the kernels called directly with tiny blocks, so that every program
  boundary is exercised (several bands with a ragged last band, several channel chunks with a
  ragged last chunk, channel splits with partial sums), plus dilation 2 and groups 2.

Shapes are deliberately not multiples of any block size (C=48, H=7, W=9, T=3, N=1); deformable
offsets are large enough to cross the border and include integer and exactly +-1 values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax import ops
from kernels import dtf_local
from kernels import sifa_deformable

RAGGED = (1, 3, 7, 9, 48)  # N, T, H, W, C: no dimension is a multiple of a block size.
SMALL_2 = (2, 2, 5, 6, 20)


@dataclasses.dataclass(frozen=True)
class Case:
  op: str
  shape: tuple[int, ...]
  dtype: str = 'float32'
  kernel_size: int = 3
  dilation: int = 1
  groups: int = 1

  def __str__(self):
    n, t, h, w, c = self.shape
    return (f'{self.op}-N{n}T{t}H{h}W{w}C{c}-K{self.kernel_size}d{self.dilation}'
            f'G{self.groups}-{self.dtype}')


ALL_OPS = ('temporal_correlation', 'temporal_aggregation', 'frame_wise_aggregation',
           'deformable_correlation', 'deformable_aggregation')


def make_inputs(case: Case, rng: np.random.Generator):
  """Random arrays for ``case.op`` (positional, as the public op takes them)."""
  n, t, h, w, c = case.shape
  kk = case.kernel_size ** 2
  dtype = jnp.dtype(case.dtype)
  x = rng.standard_normal(case.shape)
  weight = rng.standard_normal((t, case.kernel_size, case.kernel_size, c)) / np.sqrt(c)
  if case.op in ('temporal_correlation', 'frame_wise_aggregation'):
    return jnp.asarray(x, dtype), jnp.asarray(weight, jnp.float32)
  if case.op == 'temporal_aggregation':
    return jnp.asarray(x, dtype), jnp.asarray(rng.standard_normal((n, t, h, w, kk)), dtype)
  offsets = 2.5 * rng.standard_normal((n, t, h, w, kk, 2))
  flat = offsets.reshape(-1)
  special = rng.choice(flat.size, size=flat.size // 4, replace=False)
  flat[special] = rng.choice([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, float(max(h, w))],
                             size=special.size)
  offsets = jnp.asarray(flat.reshape(offsets.shape), dtype)
  if case.op == 'deformable_correlation':
    return jnp.asarray(x, dtype), offsets, jnp.asarray(weight, jnp.float32)
  attn = rng.standard_normal((n, t, h, w, case.groups * kk))
  return jnp.asarray(x, dtype), offsets, jnp.asarray(attn, dtype)


def knobs(case: Case) -> dict:
  out = dict(kernel_size=case.kernel_size, dilation=case.dilation)
  if case.op in ('temporal_correlation', 'deformable_correlation', 'deformable_aggregation'):
    out['groups'] = case.groups
  return out


def assert_close(got, want, what: str):
  """Equality up to float32 noise (relative to the largest value) and rounding to the dtype."""
  assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape,
                                                              got.dtype, want.dtype)
  got64 = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want64 = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  scale = max(float(np.abs(want64).max()), 1e-30)
  eps32 = float(jnp.finfo(jnp.float32).eps)
  rtol = 2 * float(jnp.finfo(want.dtype).eps)
  np.testing.assert_allclose(got64, want64, rtol=rtol, atol=64 * eps32 * scale, err_msg=what)


class _KernelContract:
  """Shared contract: forward and VJP of an implementation equal the XLA path."""

  CASES: tuple[Case, ...] = ()

  def implementation(self, case: Case):
    """Returns ``f(*arrays)`` running ``case.op`` with the implementation under test."""
    raise NotImplementedError

  def test_forward_and_vjp_match_xla(self, case: Case):
    rng = np.random.default_rng(abs(hash(str(case))) % 2**32)
    args = make_inputs(case, rng)
    reference = lambda *a: getattr(ops, case.op)(*a, impl='xla', **knobs(case))
    candidate = self.implementation(case)

    def forward_and_vjp(fn, args, cotangent_seed):
      out, vjp = jax.vjp(fn, *args)
      leaves = jax.tree.leaves(out)
      keys = jax.random.split(cotangent_seed, len(leaves))
      cts = [jax.random.normal(k, o.shape, jnp.float32).astype(o.dtype)
             for k, o in zip(keys, leaves)]
      return out, vjp(jax.tree.unflatten(jax.tree.structure(out), cts))

    seed = jax.random.key(int(rng.integers(2**31)))
    want = jax.jit(lambda a, s: forward_and_vjp(reference, a, s))(args, seed)
    got = jax.jit(lambda a, s: forward_and_vjp(candidate, a, s))(args, seed)
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]))):
      assert_close(g, w, f'{case}: output {i}')
    for i, (g, w) in enumerate(zip(got[1], want[1])):
      assert_close(g, w, f'{case}: cotangent of argument {i}')


def pytest_generate_tests(metafunc):
  if 'case' in metafunc.fixturenames and metafunc.cls is not None:
    metafunc.parametrize('case', metafunc.cls.CASES, ids=str)


class TestPallasDispatch(_KernelContract):
  """The public ops with ``impl='pallas'`` (interpret mode on CPU), default block sizes."""

  CASES = tuple(Case(op, RAGGED, dtype) for dtype in ('float32', 'bfloat16') for op in ALL_OPS)

  def implementation(self, case):
    return lambda *a: getattr(ops, case.op)(*a, impl='pallas', **knobs(case))


SMALL_LOCAL = dtf_local.LocalTiles(block_rows=16, block_channels=32, channel_splits=2,
                                   num_warps=4)
SMALL_LOCAL_GROUPS = dtf_local.LocalTiles(block_rows=8, block_channels=2, channel_splits=2,
                                          num_warps=4)  # C/groups = 10: 5 chunks per group.
SMALL_DEFORMABLE = sifa_deformable.DeformableTiles(block_rows=16, block_channels=32,
                                                   channel_splits=2, num_warps=4)
SMALL_DEFORMABLE_GROUPS = sifa_deformable.DeformableTiles(block_rows=8, block_channels=2,
                                                          channel_splits=2, num_warps=4)


class TestPallasSmallTiles(_KernelContract):
  """The kernels called directly with tiny blocks: several bands, chunks and channel splits."""

  CASES = tuple(Case(op, RAGGED) for op in ALL_OPS) + (
      Case('temporal_correlation', SMALL_2, dilation=2, groups=2),
      Case('temporal_aggregation', SMALL_2, dilation=2),
      Case('frame_wise_aggregation', SMALL_2, dilation=2),
      Case('deformable_correlation', SMALL_2, dilation=2, groups=2),
      Case('deformable_aggregation', SMALL_2, dilation=2, groups=2),
  )

  def implementation(self, case):
    grouped = case.groups > 1
    local = SMALL_LOCAL_GROUPS if grouped else SMALL_LOCAL
    deformable = SMALL_DEFORMABLE_GROUPS if grouped else SMALL_DEFORMABLE
    module, tiles = {
        'temporal_correlation': (dtf_local, local),
        'temporal_aggregation': (dtf_local, local),
        'frame_wise_aggregation': (dtf_local, local),
        'deformable_correlation': (sifa_deformable, deformable),
        'deformable_aggregation': (sifa_deformable, deformable),
    }[case.op]
    fn = getattr(module, case.op)
    return lambda *a: fn(*a, interpret=True, tiles=tiles, **knobs(case))


# ------------------------------------------------------------------------------------------------
# Block-size choice.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fn', [dtf_local.temporal_correlation,
                                lambda x, w, **kw: sifa_deformable.deformable_correlation(
                                    x, jnp.zeros((*x.shape[:4], 9, 2)), w, **kw)])
def test_chunks_straddling_groups_are_rejected(fn):
  x = jnp.zeros((1, 2, 3, 4, 20))
  tiles_cls = (dtf_local.LocalTiles if fn is dtf_local.temporal_correlation
               else sifa_deformable.DeformableTiles)
  tiles = tiles_cls(block_rows=16, block_channels=4, channel_splits=1, num_warps=4)
  with pytest.raises(ValueError, match='block_channels=4 must divide C/groups=10'):
    fn(x, jnp.zeros((2, 3, 3, 20)), groups=2, tiles=tiles, interpret=True)


@pytest.mark.parametrize('tiles_cls', [dtf_local.LocalTiles, sifa_deformable.DeformableTiles])
def test_tiles_reject_non_power_of_two_blocks(tiles_cls):
  with pytest.raises(ValueError, match='block_rows=48 must be a power of two'):
    tiles_cls(block_rows=48, block_channels=32, channel_splits=1, num_warps=4)
  with pytest.raises(ValueError, match='channel_splits=0'):
    tiles_cls(block_rows=64, block_channels=32, channel_splits=0, num_warps=4)


@pytest.mark.parametrize('shape,groups', [((8, 4, 56, 56, 64), 1), ((8, 4, 7, 7, 1024), 1),
                                          ((1, 3, 7, 9, 48), 2), ((2, 4, 14, 14, 24), 3)])
def test_default_tiles_cover_the_problem(shape, groups):
  """Defaults are powers of two, chunks never straddle groups, splits never exceed chunks."""
  _, _, h, w, c = shape
  for tiles in (dtf_local.LocalTiles.for_shape(shape, groups),
                sifa_deformable.DeformableTiles.for_shape(shape, groups)):
    assert tiles.block_rows <= max(16, 2 * h * w)
    assert tiles.block_channels <= max(16, 2 * c)
    if groups > 1:
      assert (c // groups) % tiles.block_channels == 0
    assert 1 <= tiles.channel_splits <= -(-(c // groups) // tiles.block_channels)
