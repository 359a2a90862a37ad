"""Tests of the public ops (dtf_jax.ops, XLA path) against SPEC.md section 2 and 3.2 steps 1-4.

The oracles are float64 NumPy loops written here from SPEC.md's formulas in the *original*
(channels-first) layouts: ``x (N, C, T, H, W)``, ``Wc (C, T, K, K)``, offsets ``(N, 2K², T, H, W)``
(channel 2k = dy, 2k+1 = dx), weights/outputs ``(N, G·K², T, H, W)``. Converting the JAX inputs into
those layouts here also tests the channels-last conventions of SPEC.md 1.2.
"""

from __future__ import annotations

import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax.extend
from jax.test_util import check_grads

from dtf_jax import ops

# ------------------------------------------------------------------------------------------------
# NumPy references, straight from SPEC.md (original layouts, float64, explicit loops).
# ------------------------------------------------------------------------------------------------


def _pad(k, d):
  return (d * (k - 1) + 1) // 2


def np_temporal_correlation(x, wc, k_size, d, groups):
  """SPEC 2.1: y[n, gκ+k, t, h, w] = Σ_{c∈g} Wc[c,t,kh,kw]·x[n,c,t⁻,h,w]·x̂[n,c,t,h−p+kh·d,w−p+kw·d]."""
  n_, c_, t_, h_, w_ = x.shape
  p, kk, cg = _pad(k_size, d), k_size * k_size, c_ // groups
  y = np.zeros((n_, groups * kk, t_, h_, w_))
  for n in range(n_):
    for t in range(t_):
      tm = max(t - 1, 0)
      for h in range(h_):
        for w in range(w_):
          for kh in range(k_size):
            for kw in range(k_size):
              hh, ww = h - p + kh * d, w - p + kw * d
              if not (0 <= hh < h_ and 0 <= ww < w_):
                continue  # zero padding: the whole term is 0
              prod = wc[:, t, kh, kw] * x[n, :, tm, h, w] * x[n, :, t, hh, ww]
              for g in range(groups):
                y[n, g * kk + kh * k_size + kw, t, h, w] = prod[g * cg:(g + 1) * cg].sum()
  return y


def np_aggregation(x, a, k_size, d):
  """SPEC 2.2 with E = Cw = 1, s = 1: y[m, c, h, w] = Σ_k A[m, k, h, w]·x̂[m, c, h−p+kh·d, w−p+kw·d].

  x: (M, C, H, W); a: (M, K², H, W).
  """
  m_, c_, h_, w_ = x.shape
  p = _pad(k_size, d)
  y = np.zeros_like(x)
  for m in range(m_):
    for h in range(h_):
      for w in range(w_):
        for kh in range(k_size):
          for kw in range(k_size):
            hh, ww = h - p + kh * d, w - p + kw * d
            if 0 <= hh < h_ and 0 <= ww < w_:
              y[m, :, h, w] += a[m, kh * k_size + kw, h, w] * x[m, :, hh, ww]
  return y


def np_sample(plane, py, px):
  """SPEC 2.3, S(img, py, px) for every channel of plane (C, H, W)."""
  _, h_, w_ = plane.shape
  if py <= -1 or px <= -1 or py >= h_ or px >= w_:
    return np.zeros(plane.shape[0])
  y0, x0 = math.floor(py), math.floor(px)
  ly, lx = py - y0, px - x0

  def v(i, j):
    return plane[:, i, j] if (0 <= i < h_ and 0 <= j < w_) else np.zeros(plane.shape[0])

  return ((1 - ly) * (1 - lx) * v(y0, x0) + (1 - ly) * lx * v(y0, x0 + 1)
          + ly * (1 - lx) * v(y0 + 1, x0) + ly * lx * v(y0 + 1, x0 + 1))


def np_sample_grad(plane, py, px):
  """(dS/dpy, dS/dpx) of SPEC 2.3 with y0, x0 held fixed (one-sided over [y0, y0+1] at integers)."""
  c_, h_, w_ = plane.shape
  if py <= -1 or px <= -1 or py >= h_ or px >= w_:
    return np.zeros(c_), np.zeros(c_)
  y0, x0 = math.floor(py), math.floor(px)
  ly, lx = py - y0, px - x0

  def v(i, j):
    return plane[:, i, j] if (0 <= i < h_ and 0 <= j < w_) else np.zeros(c_)

  d_py = (1 - lx) * (v(y0 + 1, x0) - v(y0, x0)) + lx * (v(y0 + 1, x0 + 1) - v(y0, x0 + 1))
  d_px = (1 - ly) * (v(y0, x0 + 1) - v(y0, x0)) + ly * (v(y0 + 1, x0 + 1) - v(y0 + 1, x0))
  return d_py, d_px


def _sampling_points(off, n, t, h, w, k_size, d):
  """Yields (k, py, px) of SPEC 2.4 for offsets in the original (N, 2κ, T, H, W) layout."""
  p = _pad(k_size, d)
  for kh in range(k_size):
    for kw in range(k_size):
      k = kh * k_size + kw
      yield k, h - p + kh * d + off[n, 2 * k, t, h, w], w - p + kw * d + off[n, 2 * k + 1, t, h, w]


def np_deformable_correlation(x, off, wc, k_size, d, groups, cotangent=None):
  """SPEC 2.4. With ``cotangent`` (same shape as y) also returns dL/d(off) for L = Σ y·cotangent."""
  n_, c_, t_, h_, w_ = x.shape
  kk, cg = k_size * k_size, c_ // groups
  y = np.zeros((n_, groups * kk, t_, h_, w_))
  d_off = np.zeros_like(off)
  for n in range(n_):
    for t in range(t_):
      tm = max(t - 1, 0)
      for h in range(h_):
        for w in range(w_):
          for k, py, px in _sampling_points(off, n, t, h, w, k_size, d):
            kh, kw = divmod(k, k_size)
            q = wc[:, t, kh, kw] * x[n, :, tm, h, w]
            s = np_sample(x[n, :, t], py, px)
            ds_py, ds_px = np_sample_grad(x[n, :, t], py, px)
            for g in range(groups):
              sl = slice(g * cg, (g + 1) * cg)
              y[n, g * kk + k, t, h, w] = (q[sl] * s[sl]).sum()
              if cotangent is not None:
                ct = cotangent[n, g * kk + k, t, h, w]
                d_off[n, 2 * k, t, h, w] += ct * (q[sl] * ds_py[sl]).sum()
                d_off[n, 2 * k + 1, t, h, w] += ct * (q[sl] * ds_px[sl]).sum()
  return y if cotangent is None else (y, d_off)


def np_deformable_aggregation(x, off, a, k_size, d, groups, cotangent=None):
  """SPEC 2.5. With ``cotangent`` (same shape as y) also returns dL/d(off) for L = Σ y·cotangent."""
  n_, c_, t_, h_, w_ = x.shape
  kk = k_size * k_size
  y = np.zeros((n_, groups * c_, t_, h_, w_))
  d_off = np.zeros_like(off)
  for n in range(n_):
    for t in range(t_):
      for h in range(h_):
        for w in range(w_):
          for k, py, px in _sampling_points(off, n, t, h, w, k_size, d):
            s = np_sample(x[n, :, t], py, px)
            ds_py, ds_px = np_sample_grad(x[n, :, t], py, px)
            for g in range(groups):
              weight = a[n, g * kk + k, t, h, w]
              y[n, g * c_:(g + 1) * c_, t, h, w] += weight * s
              if cotangent is not None:
                ct = cotangent[n, g * c_:(g + 1) * c_, t, h, w]
                d_off[n, 2 * k, t, h, w] += weight * (ct * ds_py).sum()
                d_off[n, 2 * k + 1, t, h, w] += weight * (ct * ds_px).sum()
  return y if cotangent is None else (y, d_off)


def np_frame_wise_aggregation(x, wc, k_size, d):
  """SPEC 3.2 steps 1-4 on (N, C, T, H, W): returns (u, r) in the original layout."""
  n_, c_, t_, h_, w_ = x.shape
  r = np_temporal_correlation(x, wc, k_size, d, 1)  # (N, κ, T, H, W)
  e = np.exp(r - r.max(axis=1, keepdims=True))
  a = e / e.sum(axis=1, keepdims=True)
  # Step 3: frames folded into the batch, b-major: (N·T, C, H, W).
  fold = lambda z: z.transpose(0, 2, 1, 3, 4).reshape(n_ * t_, z.shape[1], h_, w_)
  m = np_aggregation(fold(x), fold(a), k_size, d)
  m = m.reshape(n_, t_, c_, h_, w_).transpose(0, 2, 1, 3, 4)
  u = x.copy()
  u[:, :, :-1] += m[:, :, 1:]
  return u, r


def np_temporal_correlation_aggregation(x, wc, k_size, d):
  """SIFA-Swin's core (SPEC 3.8) on (N, C, T, H, W): the aggregation of x with its own raw
  correlation as the per-tap weights (no softmax); returns m channels-last (N, T, H, W, C)."""
  n_, c_, t_, h_, w_ = x.shape
  rho = np_temporal_correlation(x, wc, k_size, d, 1)  # (N, κ, T, H, W)
  fold = lambda z: z.transpose(0, 2, 1, 3, 4).reshape(n_ * t_, z.shape[1], h_, w_)
  m = np_aggregation(fold(x), fold(rho), k_size, d)  # (N·T, C, H, W)
  return m.reshape(n_, t_, c_, h_, w_).transpose(0, 1, 3, 4, 2)


# Layout conversions JAX (channels-last) -> original (channels-first).
to_nc = lambda z: np.asarray(z, np.float64).transpose(0, 4, 1, 2, 3)  # (N,T,H,W,C)->(N,C,T,H,W)
from_nc = lambda z: np.asarray(z).transpose(0, 2, 3, 4, 1)
weight_to_orig = lambda w: np.asarray(w, np.float64).transpose(3, 0, 1, 2)  # (T,K,K,C)->(C,T,K,K)


def offsets_to_orig(o):
  """(N, T, H, W, κ, 2) -> (N, 2κ, T, H, W) with channel 2k = dy_k, 2k+1 = dx_k."""
  o = np.asarray(o, np.float64)
  return o.reshape(*o.shape[:4], -1).transpose(0, 4, 1, 2, 3)


def offsets_from_orig(o):
  n, kk2, t, h, w = o.shape
  return o.transpose(0, 2, 3, 4, 1).reshape(n, t, h, w, kk2 // 2, 2)


# ------------------------------------------------------------------------------------------------
# Random inputs.
# ------------------------------------------------------------------------------------------------

def _random_offsets(rng, shape, kind):
  """Offsets that push samples across the border.

  kind 'mixed': uniform in [-2.5, 2.5] with ~30% rounded to exact integers (incl. ±1, 0);
  'smooth': integer in [-3, 2] plus a fraction in [0.1, 0.9] (away from the bilinear kinks and
  from the -1 / H / W borders, for finite differences); 'integer': integers in [-3, 3].
  """
  if kind == 'mixed':
    o = rng.uniform(-2.5, 2.5, shape)
    exact = rng.random(shape) < 0.3
    o[exact] = np.round(o[exact])
    return o
  if kind == 'smooth':
    return rng.integers(-3, 3, shape) + rng.uniform(0.1, 0.9, shape)
  if kind == 'integer':
    return rng.integers(-3, 4, shape).astype(np.float64)
  raise ValueError(kind)


def make_inputs(op, shape, k_size, groups, rng, offsets='mixed'):
  """NumPy float64 inputs of ``op`` for x of ``shape`` (N, T, H, W, C)."""
  n, t, h, w, c = shape
  kk = k_size * k_size
  x = rng.normal(size=shape)
  weight = rng.normal(size=(t, k_size, k_size, c))
  offs = _random_offsets(rng, (n, t, h, w, kk, 2), offsets)
  if op == 'temporal_correlation':
    return (x, weight)
  if op == 'temporal_aggregation':
    return (x, rng.normal(size=(n, t, h, w, kk)))
  if op == 'deformable_correlation':
    return (x, offs, weight)
  if op == 'deformable_aggregation':
    return (x, offs, rng.normal(size=(n, t, h, w, groups * kk)))
  if op in ('frame_wise_aggregation', 'temporal_correlation_aggregation'):
    return (x, weight)
  raise ValueError(op)


def call(op, args, k_size, d, groups, impl='xla'):
  fn = getattr(ops, op)
  kwargs = dict(kernel_size=k_size, dilation=d, impl=impl)
  if op in ('temporal_correlation', 'deformable_correlation', 'deformable_aggregation'):
    kwargs['groups'] = groups
  return fn(*args, **kwargs)


def numpy_reference(op, args, k_size, d, groups):
  """The SPEC oracle on channels-last float64 inputs; returns channels-last outputs."""
  if op == 'temporal_correlation':
    x, w = args
    return from_nc(np_temporal_correlation(to_nc(x), weight_to_orig(w), k_size, d, groups))
  if op == 'temporal_aggregation':
    x, a = args
    n, t, h, w_, c = x.shape
    y = np_aggregation(np.asarray(x).transpose(0, 1, 4, 2, 3).reshape(n * t, c, h, w_),
                       np.asarray(a).transpose(0, 1, 4, 2, 3).reshape(n * t, -1, h, w_),
                       k_size, d)
    return y.reshape(n, t, c, h, w_).transpose(0, 1, 3, 4, 2)
  if op == 'deformable_correlation':
    x, o, w = args
    return from_nc(np_deformable_correlation(to_nc(x), offsets_to_orig(o), weight_to_orig(w),
                                             k_size, d, groups))
  if op == 'deformable_aggregation':
    x, o, a = args
    return from_nc(np_deformable_aggregation(to_nc(x), offsets_to_orig(o), to_nc(a), k_size, d,
                                             groups))
  if op == 'frame_wise_aggregation':
    x, w = args
    u, r = np_frame_wise_aggregation(to_nc(x), weight_to_orig(w), k_size, d)
    return from_nc(u), from_nc(r)
  if op == 'temporal_correlation_aggregation':
    x, w = args
    return np_temporal_correlation_aggregation(to_nc(x), weight_to_orig(w), k_size, d)
  raise ValueError(op)


@pytest.fixture
def x64():
  """float64 for the duration of one test (scoped: xdist workers share processes)."""
  with jax.enable_x64(True):
    yield


ALL_OPS = ('temporal_correlation', 'temporal_aggregation', 'deformable_correlation',
           'deformable_aggregation', 'frame_wise_aggregation', 'temporal_correlation_aggregation')

# (N, T, H, W, C, K, dilation, groups): K in {1, 3, 5}, d in {1, 2}, G in {1, 2}, T in {1, 2, 5},
# H != W. Ops without groups ignore G.
CONFIGS = (
    (2, 2, 4, 5, 4, 3, 1, 2),
    (1, 5, 5, 3, 4, 3, 2, 1),
    (1, 1, 4, 6, 2, 5, 1, 2),
    (2, 2, 3, 4, 4, 1, 1, 1),
    (1, 2, 6, 5, 4, 5, 2, 2),
)


def _as_tuple(y):
  return y if isinstance(y, tuple) else (y,)


# ------------------------------------------------------------------------------------------------
# Forward against the NumPy loops.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('config', CONFIGS, ids=lambda c: 'N{}T{}H{}W{}C{}K{}d{}G{}'.format(*c))
@pytest.mark.parametrize('op', ALL_OPS)
def test_forward_matches_numpy_loops(x64, op, config):
  *shape, k_size, d, groups = config
  rng = np.random.default_rng(zlib.crc32(repr((op, config)).encode()))  # fresh per case, stable
  args = make_inputs(op, shape, k_size, groups, rng)
  got = _as_tuple(call(op, [jnp.asarray(a) for a in args], k_size, d, groups))
  want = _as_tuple(numpy_reference(op, args, k_size, d, groups))
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float64
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-12, atol=1e-12)


def test_auto_and_xla_agree():
  rng = np.random.default_rng(1)
  args = [jnp.asarray(a, jnp.float32)
          for a in make_inputs('temporal_aggregation', (1, 2, 3, 4, 2), 3, 1, rng)]
  np.testing.assert_allclose(call('temporal_aggregation', args, 3, 1, 1, impl='auto'),
                             call('temporal_aggregation', args, 3, 1, 1, impl='xla'),
                             rtol=1e-6, atol=1e-6)


def test_pallas_impl_is_wired_or_says_so():
  """impl='pallas' either matches the XLA path or raises a NotImplementedError that says why."""
  rng = np.random.default_rng(2)
  args = [jnp.asarray(a, jnp.float32)
          for a in make_inputs('temporal_correlation', (1, 2, 3, 4, 2), 3, 1, rng)]
  try:
    got = call('temporal_correlation', args, 3, 1, 1, impl='pallas')
  except NotImplementedError as e:
    assert "impl='pallas' is not available" in str(e)
    return
  np.testing.assert_allclose(got, call('temporal_correlation', args, 3, 1, 1, impl='xla'),
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Gradients.
# ------------------------------------------------------------------------------------------------

# (op, (N, T, H, W, C), K, d, G): T = 3 so that both the t⁻ clamp and the next-frame shift matter.
GRAD_CASES = (
    ('temporal_correlation', (1, 3, 3, 4, 4), 3, 1, 2),
    ('temporal_aggregation', (1, 3, 3, 4, 2), 3, 2, 1),
    ('deformable_correlation', (1, 3, 3, 4, 4), 3, 1, 2),
    ('deformable_aggregation', (1, 3, 3, 4, 2), 3, 1, 2),
    ('frame_wise_aggregation', (1, 3, 3, 4, 2), 3, 1, 1),
    ('temporal_correlation_aggregation', (1, 3, 3, 4, 2), 3, 1, 1),
)


@pytest.mark.parametrize('case', GRAD_CASES, ids=lambda c: c[0])
def test_check_grads_every_input(x64, case):
  """Reverse-mode gradient w.r.t. each array input against central finite differences (float64).

  Offsets are 'smooth': fractional parts in [0.1, 0.9], away from the bilinear kinks and the
  open-range borders, while their integer parts (-3..2) still push samples across the border.
  """
  op, shape, k_size, d, groups = case
  rng = np.random.default_rng(7)
  args = [jnp.asarray(a) for a in make_inputs(op, shape, k_size, groups, rng, offsets='smooth')]
  # One jitted function of all inputs (the other inputs are passed, not closed over, so the
  # forward compiles once for every input's check).
  op_fn = jax.jit(lambda *a: call(op, a, k_size, d, groups))
  for i in range(len(args)):
    def f(arg, i=i):
      return op_fn(*args[:i], arg, *args[i + 1:])
    check_grads(f, (args[i],), order=1, modes=['rev'])


# (N, T, H, W, C, K, d): T = 1 (no previous / next frame), dilation 2, K = 5, H != W.
FRAME_WISE_CASES = ((2, 3, 4, 5, 3, 3, 1), (1, 1, 4, 5, 2, 3, 1), (1, 3, 5, 4, 2, 3, 2),
                    (1, 2, 6, 5, 4, 5, 1), (1, 2, 3, 4, 2, 1, 1))


@pytest.mark.parametrize('case', FRAME_WISE_CASES, ids=lambda c: 'N{}T{}H{}W{}C{}K{}d{}'.format(*c))
def test_frame_wise_hand_written_backward_matches_autodiff_of_reference(x64, case):
  """impl='xla' runs ``ops.frame_wise`` (unrolled taps, custom VJP); its gradients w.r.t. x and
  weight, for cotangents on both outputs, equal autodiff of the tap-loop oracle in float64."""
  from dtf_jax.ops import frame_wise, reference  # pylint: disable=g-import-not-at-top
  *shape, k_size, d = case
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  x, weight = (jnp.asarray(a) for a in make_inputs('frame_wise_aggregation', shape, k_size, 1, rng))
  du = jnp.asarray(rng.normal(size=x.shape))
  dr = jnp.asarray(rng.normal(size=(*x.shape[:-1], k_size * k_size)))

  def loss(fn):
    def f(x, weight):
      u, r = fn(x, weight, kernel_size=k_size, dilation=d)
      return jnp.sum(u * du) + jnp.sum(r * dr)
    return f

  got = jax.grad(loss(frame_wise.frame_wise_aggregation), argnums=(0, 1))(x, weight)
  want = jax.grad(loss(reference.frame_wise_aggregation), argnums=(0, 1))(x, weight)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-11, atol=1e-11)
  # The public op's 'xla' path is the hand-written one.
  u, _ = call('frame_wise_aggregation', (x, weight), k_size, d, 1)
  u_ref, _ = reference.frame_wise_aggregation(x, weight, kernel_size=k_size, dilation=d)
  np.testing.assert_allclose(np.asarray(u), np.asarray(u_ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('case', FRAME_WISE_CASES, ids=lambda c: 'N{}T{}H{}W{}C{}K{}d{}'.format(*c))
def test_correlation_aggregation_hand_written_backward_matches_autodiff_of_the_two_ops(x64, case):
  """impl='xla' of ``temporal_correlation_aggregation`` runs ``ops.frame_wise`` (unrolled taps,
  custom VJP); its gradients w.r.t. x and weight equal autodiff of the tap-loop reference ops
  ``temporal_aggregation(x, temporal_correlation(x, weight))`` in float64."""
  from dtf_jax.ops import frame_wise, reference  # pylint: disable=g-import-not-at-top
  *shape, k_size, d = case
  rng = np.random.default_rng(zlib.crc32(repr(('corr_agg', case)).encode()))
  x, weight = (jnp.asarray(a) for a in make_inputs('temporal_correlation_aggregation', shape,
                                                   k_size, 1, rng))
  dm = jnp.asarray(rng.normal(size=x.shape))

  def composed(x, weight, kernel_size, dilation):
    rho = reference.temporal_correlation(x, weight, kernel_size=kernel_size, dilation=dilation,
                                         groups=1)
    return reference.temporal_aggregation(x, rho, kernel_size=kernel_size, dilation=dilation)

  def loss(fn):
    return lambda x, weight: jnp.sum(fn(x, weight, kernel_size=k_size, dilation=d) * dm)

  got = jax.grad(loss(frame_wise.temporal_correlation_aggregation), argnums=(0, 1))(x, weight)
  want = jax.grad(loss(composed), argnums=(0, 1))(x, weight)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-11, atol=1e-11)
  m = call('temporal_correlation_aggregation', (x, weight), k_size, d, 1)
  np.testing.assert_allclose(np.asarray(m), np.asarray(composed(x, weight, k_size, d)),
                             rtol=1e-12, atol=1e-12)


def test_correlation_aggregation_pallas_is_the_two_kernels_in_sequence():
  """impl='pallas' (interpret mode on CPU) equals the XLA path: value and gradients."""
  rng = np.random.default_rng(12)
  x, weight = (jnp.asarray(a, jnp.float32) for a in make_inputs(
      'temporal_correlation_aggregation', (1, 3, 5, 4, 8), 3, 1, rng))
  dm = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  results = {}
  for impl in ('xla', 'pallas'):
    f = lambda x, w, impl=impl: ops.temporal_correlation_aggregation(x, w, impl=impl)
    m, vjp = jax.vjp(f, x, weight)
    results[impl] = (m, *vjp(dm))
  for got, want in zip(results['pallas'], results['xla']):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('op', ('deformable_correlation', 'deformable_aggregation'))
def test_offset_gradient_at_integer_points_is_one_sided(x64, op):
  """At integer sampling points the offset gradient is d/dpy over the cell [y0, y0+1] (SPEC 2.3).

  Offsets are exact integers in [-3, 3], so samples land on pixels, on the -1 / H / W borders
  (zero value and zero gradient) and outside. Finite differences cannot check this (kinks); the
  NumPy oracle differentiates SPEC 2.3's expression with y0, x0 held fixed.
  """
  shape, k_size, d, groups = (2, 2, 4, 3, 4), 3, 1, 2
  rng = np.random.default_rng(11)
  args = make_inputs(op, shape, k_size, groups, rng, offsets='integer')
  out_shape = numpy_reference(op, args, k_size, d, groups).shape
  cotangent = rng.normal(size=out_shape)

  def loss(offsets):
    full = [jnp.asarray(a) for a in args]
    full[1] = offsets
    return jnp.sum(call(op, full, k_size, d, groups) * cotangent)

  got = jax.jit(jax.grad(loss))(jnp.asarray(args[1]))
  if op == 'deformable_correlation':
    x, o, w = args
    _, want = np_deformable_correlation(to_nc(x), offsets_to_orig(o), weight_to_orig(w), k_size,
                                        d, groups, cotangent=to_nc(cotangent))
  else:
    x, o, a = args
    _, want = np_deformable_aggregation(to_nc(x), offsets_to_orig(o), to_nc(a), k_size, d,
                                        groups, cotangent=to_nc(cotangent))
  want = offsets_from_orig(want)
  # The cases of SPEC 2.3 are all present: samples exactly on the -1 border (zero gradient), on the
  # last row/column (one-sided cell reaching outside) and strictly inside.
  h, w = shape[2:4]
  p = _pad(k_size, d)
  k_idx = np.arange(k_size * k_size)
  py = (np.arange(h)[:, None, None] - p + (k_idx // k_size) * d) + args[1][..., 0]
  px = (np.arange(w)[None, :, None] - p + (k_idx % k_size) * d) + args[1][..., 1]
  assert np.any(py == -1) and np.any(px == -1) and np.any(py == h - 1) and np.any(px == w - 1)
  assert np.all(want[..., 0][py == -1] == 0) and np.all(want[..., 1][px == -1] == 0)
  assert np.abs(want).max() > 0.1  # the test is not vacuous
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# bfloat16, jit, vmap.
# ------------------------------------------------------------------------------------------------

# Tolerance of a bfloat16 call against the float32 call on the same (bfloat16-rounded) inputs.
# Both compute in float32 (the bfloat16 path upcasts its inputs), so the only difference is the
# final rounding of the float32 result to bfloat16: at most half a bfloat16 ulp, 2^-9 relative.
# We allow 2^-8 relative (plus 1e-5 of the largest magnitude for float32 reduction-order noise).
# Accumulating in bfloat16 instead would make errors of order sqrt(#terms) * 2^-9 relative to the
# partial sums (C*K*K = 72 terms here, with cancellation), which this bound does not admit.
BF16_RTOL = 2.0**-8


def _assert_bf16_close(got, want):
  want = np.asarray(want, np.float32)
  got = np.asarray(got.astype(jnp.float32))
  atol = 1e-5 * np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=BF16_RTOL, atol=atol)


@pytest.mark.parametrize('op', ALL_OPS)
def test_bfloat16_matches_float32_within_rounding(op):
  shape, k_size, d, groups = (1, 2, 4, 5, 8), 3, 1, 2
  rng = np.random.default_rng(5)
  args_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in make_inputs(op, shape, k_size, groups, rng)]
  args_f32 = [a.astype(jnp.float32) for a in args_bf16]
  out_shapes = [y.shape for y in _as_tuple(jax.eval_shape(
      lambda *a: call(op, a, k_size, d, groups), *args_f32))]
  # Gradients: float32 inside, rounded once to each input's dtype. The output cotangents are
  # bfloat16-exact so that both paths differentiate the same function.
  cotangents = [jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in out_shapes]

  @jax.jit
  def forward_and_grads(*a):
    y, vjp = jax.vjp(lambda *b: _as_tuple(call(op, b, k_size, d, groups)), *a)
    return y, vjp(tuple(ct.astype(z.dtype) for ct, z in zip(cotangents, y)))

  got, grads_bf16 = forward_and_grads(*args_bf16)
  want, grads_f32 = forward_and_grads(*args_f32)
  for g, w in zip(got + grads_bf16, want + grads_f32):
    assert g.dtype == jnp.bfloat16
    _assert_bf16_close(g, w)


@pytest.mark.parametrize('op', ALL_OPS)
def test_jit_and_vmap_agree_with_eager(op):
  shape, k_size, d, groups = (2, 2, 3, 4, 4), 3, 2, 2
  rng = np.random.default_rng(9)
  batch = [make_inputs(op, shape, k_size, groups, rng) for _ in range(2)]
  stacked = [jnp.asarray(np.stack(parts), jnp.float32) for parts in zip(*batch)]
  f = lambda *a: call(op, a, k_size, d, groups)
  f_jit = jax.jit(f)
  eager = _as_tuple(f(*[a[0] for a in stacked]))
  for g, w in zip(_as_tuple(f_jit(*[a[0] for a in stacked])), eager):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

  singles = [_as_tuple(f_jit(*[a[b] for a in stacked])) for b in range(2)]
  vmapped = _as_tuple(jax.jit(jax.vmap(f))(*stacked))
  for i, v in enumerate(vmapped):
    np.testing.assert_allclose(v, np.stack([s[i] for s in singles]), rtol=1e-5, atol=1e-5)

  # Batched x with a shared second argument (e.g. a weight shared across the extra axis).
  in_axes = (0, None) + (0,) * (len(stacked) - 2)
  shared = [stacked[0]] + [stacked[1][0]] + stacked[2:]
  vmapped_shared = _as_tuple(jax.jit(jax.vmap(f, in_axes=in_axes))(*shared))
  for b in range(2):
    single = _as_tuple(f_jit(stacked[0][b], stacked[1][0], *[a[b] for a in stacked[2:]]))
    for v, s in zip(vmapped_shared, single):
      np.testing.assert_allclose(v[b], s, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# No K*K-fold materialisation of x.
# ------------------------------------------------------------------------------------------------

def _largest_intermediate(jaxpr) -> int:
  """Largest number of elements of any value produced anywhere in ``jaxpr`` (sub-jaxprs too)."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(var.aval.shape, dtype=np.int64)))
    for param in eqn.params.values():
      for value in (param if isinstance(param, (tuple, list)) else (param,)):
        sub = getattr(value, 'jaxpr', value)  # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          largest = max(largest, _largest_intermediate(sub))
  return largest


MEMORY_SHAPE = (1, 2, 16, 12, 64)  # (N, T, H, W, C): C large, so K*K-per-pixel arrays are small
MEMORY_K = 7  # K*K = 49: one copy of x per tap would be 49 x.nbytes
MEMORY_BOUND = 16  # in units of x.nbytes; measured (XLA:CPU, jax 0.12): at most ~13 (fused DTF grad)


def _naive_stacked_aggregation(x, attn, k_size):
  """A deliberately bad temporal aggregation that stacks all K*K shifted copies of x."""
  p = k_size // 2
  h, w = x.shape[2:4]
  xp = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
  views = jnp.stack([xp[:, :, i:i + h, j:j + w] for i in range(k_size) for j in range(k_size)], -1)
  return jnp.sum(views * attn[..., None, :], axis=-1)


def _memory_inputs(op):
  rng = np.random.default_rng(0)
  return [jnp.asarray(a, jnp.float32) for a in make_inputs(op, MEMORY_SHAPE, MEMORY_K, 1, rng)]


def test_materialisation_checks_can_fail():
  """Negative control: both checks below flag an implementation that stacks K*K copies of x.

  K = 5 here (25 copies, still above MEMORY_BOUND) to keep the compile short.
  """
  k_size = 5
  rng = np.random.default_rng(0)
  x, attn = [jnp.asarray(a, jnp.float32)
             for a in make_inputs('temporal_aggregation', MEMORY_SHAPE, k_size, 1, rng)]
  f = lambda x, a: _naive_stacked_aggregation(x, a, k_size)
  np.testing.assert_allclose(f(x, attn), ops.temporal_aggregation(x, attn, kernel_size=k_size),
                             rtol=1e-5, atol=1e-5)
  assert _largest_intermediate(jax.make_jaxpr(f)(x, attn).jaxpr) > 4 * x.size
  analysis = jax.jit(f).lower(x, attn).compile().memory_analysis()
  if analysis is not None:
    assert analysis.temp_size_in_bytes > MEMORY_BOUND * x.nbytes


@pytest.mark.parametrize('op', ALL_OPS)
def test_no_kernel_area_fold_copy_of_x(op):
  """Neither the forward nor the gradient holds a copy of x per tap (K = 7, K*K = 49).

  (1) Structural, backend-independent: no value anywhere in the jaxpr of the forward or of the
  gradient (sub-jaxprs included) has more than 4x the elements of x; a stacked (K*K, ...x) array
  would have 49x. (2) XLA's compiled peak temporary memory (what the scheduler really keeps
  alive) is below MEMORY_BOUND = 16 x.nbytes, against >= 49 x.nbytes for a copy per tap. The
  remaining temporaries are K-independent (query frame, padded x, one tap's window or gathered
  corner, gradient accumulators) plus small K*K-per-pixel arrays (offsets, attn, outputs).
  """
  args = _memory_inputs(op)
  x = args[0]
  f = lambda *a: _as_tuple(call(op, a, MEMORY_K, 1, 1))[0]
  grad = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args))))
  for name, fn in (('forward', f), ('grad', grad)):
    largest = _largest_intermediate(jax.make_jaxpr(fn)(*args).jaxpr)
    assert largest <= 4 * x.size, (name, largest / x.size)
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
      pytest.skip('memory_analysis() is not available on this backend')
    ratio = analysis.temp_size_in_bytes / x.nbytes
    assert ratio < MEMORY_BOUND, (name, ratio)


# ------------------------------------------------------------------------------------------------
# Argument validation.
# ------------------------------------------------------------------------------------------------

def _arrays(n=1, t=2, h=3, w=4, c=4, k=3, groups=1):
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return dict(x=f(n, t, h, w, c), weight=f(t, k, k, c), offsets=f(n, t, h, w, k * k, 2),
              attn=f(n, t, h, w, k * k), gattn=f(n, t, h, w, groups * k * k))


A = _arrays()
A2 = _arrays(groups=2)
X_SHAPE = '(1, 2, 3, 4, 4)'

ERROR_CASES = (
    # Rank of x.
    (lambda: ops.temporal_correlation(A['x'][0], A['weight']),
     'temporal_correlation: `x` must have rank 5 with layout (N, T, H, W, C) (channels-last), '
     'got shape (2, 3, 4, 4) (rank 4)'),
    (lambda: ops.deformable_aggregation(A['x'][..., None], A['offsets'], A['attn']),
     'deformable_aggregation: `x` must have rank 5'),
    # Channels not divisible by groups.
    (lambda: ops.temporal_correlation(A['x'], A['weight'], groups=3),
     f'temporal_correlation: `x` has shape {X_SHAPE} with C=4 channels, which is not divisible by '
     'groups=3'),
    (lambda: ops.deformable_correlation(A['x'], A['offsets'], A['weight'], groups=3),
     'deformable_correlation: `x` has shape (1, 2, 3, 4, 4) with C=4 channels, which is not '
     'divisible by groups=3'),
    # Weight shape: T, K, C mismatches and rank.
    (lambda: ops.temporal_correlation(A['x'], jnp.zeros((3, 3, 3, 4))),
     'temporal_correlation: `weight` has shape (3, 3, 3, 4), expected (T, K, K, C) = (2, 3, 3, 4) '
     f'from x of shape {X_SHAPE} and kernel_size=3; mismatch in T=3 (expected 2)'),
    (lambda: ops.frame_wise_aggregation(A['x'], A['weight'], kernel_size=5),
     'frame_wise_aggregation: `weight` has shape (2, 3, 3, 4), expected (T, K, K, C) = '
     '(2, 5, 5, 4) from x of shape (1, 2, 3, 4, 4) and kernel_size=5; mismatch in K=3 (expected 5), '
     'K=3 (expected 5)'),
    (lambda: ops.deformable_correlation(A['x'], A['offsets'], jnp.zeros((2, 3, 3, 8))),
     'deformable_correlation: `weight` has shape (2, 3, 3, 8), expected (T, K, K, C) = '
     '(2, 3, 3, 4)'),
    (lambda: ops.temporal_correlation(A['x'], jnp.zeros((4, 2, 3, 3, 3))),
     'temporal_correlation: `weight` must have rank 4 with layout (T, K, K, C), got shape '
     '(4, 2, 3, 3, 3) (rank 5); expected (2, 3, 3, 4)'),
    # Offsets shape: N, H, W, K*K, last axis, rank.
    (lambda: ops.deformable_correlation(A['x'], jnp.zeros((2, 2, 3, 4, 9, 2)), A['weight']),
     'deformable_correlation: `offsets` has shape (2, 2, 3, 4, 9, 2), expected '
     '(N, T, H, W, K*K, 2) = (1, 2, 3, 4, 9, 2) from x of shape (1, 2, 3, 4, 4) and '
     'kernel_size=3; mismatch in N=2 (expected 1)'),
    (lambda: ops.deformable_aggregation(A['x'], jnp.zeros((1, 2, 4, 3, 9, 2)), A['attn']),
     'mismatch in H=4 (expected 3), W=3 (expected 4)'),
    (lambda: ops.deformable_aggregation(A['x'], jnp.zeros((1, 2, 3, 4, 25, 2)), A['attn']),
     'deformable_aggregation: `offsets` has shape (1, 2, 3, 4, 25, 2), expected (N, T, H, W, K*K, 2)'
     ' = (1, 2, 3, 4, 9, 2) from x of shape (1, 2, 3, 4, 4) and kernel_size=3; mismatch in '
     'K*K=25 (expected 9)'),
    (lambda: ops.deformable_correlation(A['x'], jnp.zeros((1, 2, 3, 4, 18)), A['weight']),
     'deformable_correlation: `offsets` must have rank 6 with layout (N, T, H, W, K*K, 2), got '
     'shape (1, 2, 3, 4, 18) (rank 5)'),
    # Attention shape.
    (lambda: ops.temporal_aggregation(A['x'], jnp.zeros((1, 3, 3, 4, 9))),
     'temporal_aggregation: `attn` has shape (1, 3, 3, 4, 9), expected (N, T, H, W, K*K) = '
     '(1, 2, 3, 4, 9) from x of shape (1, 2, 3, 4, 4) and kernel_size=3; mismatch in T=3 '
     '(expected 2)'),
    (lambda: ops.deformable_aggregation(A2['x'], A2['offsets'], A2['attn'], groups=2),
     'deformable_aggregation: `attn` has shape (1, 2, 3, 4, 9), expected (N, T, H, W, groups*K*K) '
     '= (1, 2, 3, 4, 18) from x of shape (1, 2, 3, 4, 4) and kernel_size=3, groups=2; mismatch in '
     'groups*K*K=9 (expected 18)'),
    # Kernel size, dilation, groups values.
    (lambda: ops.temporal_correlation(A['x'], A['weight'], kernel_size=4),
     'temporal_correlation: kernel_size=4 must be odd'),
    (lambda: ops.deformable_aggregation(A['x'], A['offsets'], A['attn'], kernel_size=0),
     'deformable_aggregation: kernel_size=0 must be an integer >= 1'),
    (lambda: ops.temporal_aggregation(A['x'], A['attn'], kernel_size=3.0),
     'temporal_aggregation: kernel_size=3.0 (type float) must be a Python integer >= 1'),
    (lambda: ops.temporal_aggregation(A['x'], A['attn'], dilation=0),
     'temporal_aggregation: dilation=0 must be an integer >= 1'),
    (lambda: ops.deformable_correlation(A['x'], A['offsets'], A['weight'], dilation=-1),
     'deformable_correlation: dilation=-1 must be an integer >= 1'),
    (lambda: ops.deformable_aggregation(A['x'], A['offsets'], A['attn'], groups=0),
     'deformable_aggregation: groups=0 must be an integer >= 1'),
    # Unknown impl.
    (lambda: ops.temporal_correlation(A['x'], A['weight'], impl='cuda'),
     "temporal_correlation: impl='cuda' is not a known implementation; expected one of 'auto', "
     "'xla', 'pallas'"),
    (lambda: ops.frame_wise_aggregation(A['x'], A['weight'], impl=None),
     "frame_wise_aggregation: impl=None is not a known implementation"),
    (lambda: ops.temporal_correlation_aggregation(A['x'], jnp.zeros((2, 3, 3, 5))),
     'temporal_correlation_aggregation: `weight` has shape (2, 3, 3, 5), expected (T, K, K, C) = '
     '(2, 3, 3, 4) from x of shape (1, 2, 3, 4, 4) and kernel_size=3; mismatch in C=5 '
     '(expected 4)'),
    (lambda: ops.temporal_correlation_aggregation(A['x'][0], A['weight']),
     'temporal_correlation_aggregation: `x` must have rank 5'),
    (lambda: ops.temporal_correlation_aggregation(A['x'], A['weight'], kernel_size=2),
     'temporal_correlation_aggregation: kernel_size=2 must be odd'),
    (lambda: ops.temporal_correlation(A['x'], A['weight'], kernel_size=True),
     'temporal_correlation: kernel_size=True must be an integer >= 1, not a bool'),
    # Empty x.
    (lambda: ops.temporal_aggregation(jnp.zeros((1, 0, 3, 4, 4)), A['attn']),
     'temporal_aggregation: `x` has shape (1, 0, 3, 4, 4) with an empty dimension'),
    # Dtype.
    (lambda: ops.temporal_aggregation(jnp.zeros((1, 2, 3, 4, 4), jnp.int32), A['attn']),
     'temporal_aggregation: `x` has dtype int32; expected a floating-point array'),
    (lambda: ops.deformable_correlation(A['x'], jnp.zeros((1, 2, 3, 4, 9, 2), jnp.int32),
                                        A['weight']),
     'deformable_correlation: `offsets` has dtype int32; expected a floating-point array'),
)


@pytest.mark.parametrize('case', range(len(ERROR_CASES)))
def test_bad_input_raises_value_error(case):
  fn, message = ERROR_CASES[case]
  with pytest.raises(ValueError, match=re.escape(message)):
    fn()


def test_validation_runs_under_jit_and_vmap():
  """Shapes are checked at trace time; under vmap the per-example shapes are checked."""
  with pytest.raises(ValueError, match=re.escape('`weight` has shape (3, 3, 3, 4)')):
    jax.jit(ops.temporal_correlation)(A['x'], jnp.zeros((3, 3, 3, 4)))
  # vmap over an extra axis of x and attn: per-example x is (1, 2, 3, 4, 4), attn must match.
  xs = jnp.stack([A['x']] * 2)
  with pytest.raises(ValueError, match=re.escape('mismatch in T=3 (expected 2)')):
    jax.vmap(ops.temporal_aggregation)(xs, jnp.zeros((2, 1, 3, 3, 4, 9)))
