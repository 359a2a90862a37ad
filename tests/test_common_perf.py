"""Performance helpers of ``dtf_jax.layers.common`` compute exactly what they replace.

``fast_conv3d``: the 2-D / matmul rewrites of channels-last 3-D convolutions are exact.

The oracle is ``jax.lax.conv_general_dilated`` on the 5-D arrays (XLA's own 3-D convolution), for
every rewrite (temporal kernel 1 with and without spatial stride, 1x1 matmuls, temporal kernel ==
stride for the ResNet stem and the Swin tubelet, trailing frames dropped) and for the cases that
must fall back (temporal padding, dilation, a temporal kernel of 3). Forward values and the
gradients w.r.t. input and kernel are compared in float64; a structural check asserts that the
rewritten cases really contain no 3-D convolution.

``materialized_cotangent``: an identity with an identity gradient whose backward carries an
``optimization_barrier``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import pytest
from flax import nnx

from dtf_jax.layers import common

_DN = ('NDHWC', 'DHWIO', 'NDHWC')


@pytest.fixture
def x64():
  """float64 for the duration of one test (scoped: xdist workers share processes)."""
  with jax.enable_x64(True):
    yield

# (input shape (N, T, H, W, C), out channels, kernel, strides, padding, groups, rewritten?)
CASES = (
    ((2, 3, 5, 6, 4), 3, (1, 1, 1), (1, 1, 1), (0, 0, 0), 1, True),    # 1x1: matmul
    ((2, 3, 7, 6, 4), 5, (1, 1, 1), (1, 2, 2), (0, 0, 0), 1, True),    # strided 1x1 (downsample)
    ((1, 2, 5, 6, 4), 3, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1, True),    # bottleneck conv2
    ((2, 2, 7, 6, 4), 3, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, True),    # strided conv2
    ((1, 2, 5, 6, 4), 6, (1, 3, 3), (1, 1, 1), (0, 1, 1), 2, True),    # grouped (ResNeXt)
    ((1, 9, 9, 8, 3), 4, (4, 7, 7), (4, 2, 2), (0, 3, 3), 1, True),    # ResNet stem, T % 4 != 0
    ((2, 8, 8, 12, 3), 5, (4, 4, 4), (4, 4, 4), (0, 0, 0), 1, True),   # Swin tubelet: matmul
    ((1, 2, 3, 3, 6), 24, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1, True),   # small map: tap backward
    ((2, 1, 2, 3, 5), 16, (1, 5, 3), (1, 1, 1), (0, 2, 1), 1, True),   # small map, 5x3 kernel
    ((1, 2, 5, 4, 6), 24, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, True),   # small map, stride 2 (odd/even)
    ((2, 1, 7, 5, 3), 16, (1, 3, 5), (1, 3, 2), (0, 1, 2), 1, True),   # small map, strides 3 and 2
    ((1, 4, 5, 6, 3), 2, (3, 3, 3), (1, 1, 1), (1, 1, 1), 1, False),  # true 3-D conv
    ((1, 4, 5, 6, 3), 2, (1, 3, 3), (1, 1, 1), (1, 1, 1), 1, False),  # temporal padding
)


def _reference(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, [(p, p) for p in padding],
      dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DN),
      feature_group_count=groups)


def _fast(x, kernel, strides, padding, groups):
  return common.fast_conv3d(
      x, kernel, strides, [(p, p) for p in padding],
      dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DN),
      feature_group_count=groups)


def _has_3d_conv(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated' and eqn.invars[0].aval.ndim == 5:
      return True
    for param in eqn.params.values():
      sub = getattr(param, 'jaxpr', None)
      if sub is not None and _has_3d_conv(getattr(sub, 'jaxpr', sub)):
        return True
  return False


@pytest.mark.parametrize('case', CASES, ids=lambda c: f'k{c[2]}s{c[3]}p{c[4]}g{c[5]}')
def test_fast_conv3d_matches_3d_convolution(x64, case):
  shape, out, kernel_size, strides, padding, groups, rewritten = case
  rng = np.random.default_rng(CASES.index(case))
  x = jnp.asarray(rng.normal(size=shape))
  kernel = jnp.asarray(rng.normal(size=kernel_size + (shape[-1] // groups, out)))
  want, want_vjp = jax.vjp(lambda a, b: _reference(a, b, strides, padding, groups), x, kernel)
  got, got_vjp = jax.vjp(lambda a, b: _fast(a, b, strides, padding, groups), x, kernel)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  cotangent = jnp.asarray(rng.normal(size=want.shape))
  for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
  jaxpr = jax.make_jaxpr(lambda a, b: _fast(a, b, strides, padding, groups))(x, kernel).jaxpr
  assert _has_3d_conv(jaxpr) == (not rewritten)


def test_conv3d_module_uses_the_fast_path_and_keeps_its_parameters():
  """``common.conv3d`` keeps nnx.Conv's parameter tree and routes through ``fast_conv3d``."""
  conv = common.conv3d(4, 6, (1, 3, 3), strides=(1, 2, 2), padding=(0, 1, 1), use_bias=True,
                       rngs=nnx.Rngs(0))
  params = nnx.state(conv, nnx.Param)
  assert set(params.keys()) == {'kernel', 'bias'}
  assert conv.kernel.shape == (1, 3, 3, 4, 6)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7, 6, 4)), jnp.float32)
  want = _reference(x, conv.kernel[...], (1, 2, 2), (0, 1, 1), 1) + conv.bias[...]
  np.testing.assert_allclose(conv(x), want, rtol=1e-5, atol=1e-5)
  assert not _has_3d_conv(jax.make_jaxpr(conv)(x).jaxpr)


def test_small_map_conv_is_used_only_where_positions_do_not_exceed_channels():
  """Few positions, many channels: the per-tap backward; otherwise XLA's convolution."""
  def uses_tap_backward(shape, out, stride=1):
    x = jnp.zeros(shape, jnp.float32)
    kernel = jnp.zeros((1, 3, 3, shape[-1], out), jnp.float32)
    return 'custom_vjp_call' in str(jax.make_jaxpr(
        lambda a, b: _fast(a, b, (1, stride, stride), (0, 1, 1), 1))(x, kernel))
  assert uses_tap_backward((2, 4, 4, 4, 8), 128)        # 128 positions <= 128 channels
  assert not uses_tap_backward((2, 4, 4, 5, 8), 128)    # 160 positions > 128 channels
  assert not uses_tap_backward((2, 4, 4, 4, 128), 64)
  # Strided: the output positions count (ResNet layer4's first block: 7x7 -> 4x4).
  assert uses_tap_backward((2, 4, 7, 7, 8), 128, stride=2)        # 2*4*4*4 = 128 outputs
  assert not uses_tap_backward((2, 4, 9, 7, 8), 128, stride=2)    # 2*4*5*4 = 160 outputs


@pytest.mark.parametrize('strides', [(1, 1), (2, 2), (2, 3)])
def test_small_map_conv2d_gradients_match_finite_differences(x64, strides):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 5, 4, 5)))
  kernel = jnp.asarray(rng.normal(size=(3, 5, 5, 7)))
  conv = lambda a, b: common.small_map_conv2d(a, b, None, strides)
  jax.test_util.check_grads(conv, (x, kernel), order=1, modes=('rev',))
  np.testing.assert_allclose(
      conv(x, kernel),
      jax.lax.conv_general_dilated(x, kernel, strides, ((1, 1), (2, 2)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
      rtol=1e-12, atol=1e-12)


def test_bfloat16_inputs_keep_their_dtype():
  x = jnp.ones((1, 2, 4, 4, 3), jnp.bfloat16)
  kernel = jnp.ones((1, 1, 1, 3, 2), jnp.bfloat16)
  assert _fast(x, kernel, (1, 1, 1), (0, 0, 0), 1).dtype == jnp.bfloat16


def test_materialized_cotangent_is_identity_with_a_barrier_in_the_backward():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  f = lambda a: jnp.sin(common.materialized_cotangent(a * 2.0))
  y, vjp = jax.vjp(f, x)
  want_y, want_vjp = jax.vjp(lambda a: jnp.sin(a * 2.0), x)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_array_equal(vjp(g)[0], want_vjp(g)[0])
  grad_jaxpr = str(jax.make_jaxpr(lambda a: jax.vjp(f, a)[1](g))(x))
  assert 'optimization_barrier' in grad_jaxpr
  assert 'optimization_barrier' not in str(jax.make_jaxpr(f)(x))


def _plain_batch_norm(xg, scale, bias, epsilon):
  axes = tuple(range(1, xg.ndim - 1))
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  y = (xg - mean) * jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale + bias
  return y, mean, var


@pytest.mark.parametrize('affine', (True, False))
@pytest.mark.parametrize('shape', ((1, 6, 3, 4, 5), (3, 2, 2, 3, 4)), ids=('one_group', 'groups'))
def test_batch_norm_train_matches_autodiff_of_the_formula(x64, shape, affine):
  """Value and VJP (w.r.t. input, scale, bias, with cotangents on y, mean and var) in float64."""
  rng = np.random.default_rng(len(shape) + shape[0] + affine)
  xg = jnp.asarray(rng.normal(size=shape) * 3.0 + 1.5)
  c = shape[-1]
  scale = jnp.asarray(rng.normal(size=(c,))) if affine else None
  bias = jnp.asarray(rng.normal(size=(c,))) if affine else None
  got, got_vjp = jax.vjp(lambda *a: common.batch_norm_train(*a, 1e-5), xg, scale, bias)
  want, want_vjp = jax.vjp(lambda *a: _plain_batch_norm(*a, 1e-5), xg, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
  cotangents = tuple(jnp.asarray(rng.normal(size=w.shape)) for w in want)
  for g, w in zip(got_vjp(cotangents), want_vjp(cotangents)):
    if w is None:
      assert g is None
    else:
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_batchnorm_module_training_step_is_unchanged():
  """The module's train-mode output, gradients and running statistics equal the plain formula."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 2, 3, 3, 5)) * 2 + 1, jnp.float32)
  bn = common.BatchNorm(5, group_size=2)
  bn.scale[...] = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  y = bn(x)
  xg = x.reshape(2, 2, 2, 3, 3, 5)
  want, mean, var = _plain_batch_norm(xg, bn.scale[...], bn.bias[...], 1e-5)
  np.testing.assert_allclose(y, want.reshape(x.shape), rtol=1e-5, atol=1e-5)
  n = 2 * 2 * 3 * 3
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean.reshape(2, 5).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var.reshape(2, 5).mean(0) * n / (n - 1),
                             rtol=1e-5, atol=1e-6)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  fresh = common.BatchNorm(5, group_size=2)
  got = nnx.grad(lambda m, a: jnp.sum(m(a) * g), argnums=1)(fresh, x)
  want_grad = jax.grad(lambda a: jnp.sum(_plain_batch_norm(
      a.reshape(2, 2, 2, 3, 3, 5), jnp.ones(5), jnp.zeros(5), 1e-5)[0].reshape(x.shape) * g))(x)
  np.testing.assert_allclose(got, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', ((2, 3, 8, 8, 4), (1, 2, 7, 9, 3), (1, 1, 1, 1, 2), (2, 1, 5, 4, 3)),
                         ids=('even', 'odd_h_odd_w', 'single_pixel', 'odd_h_even_w'))
def test_max_pool_3x3_stride2_matches_torch_including_ties(x64, shape):
  """Values and the input gradient of PyTorch's MaxPool3d((1,3,3), (1,2,2), (0,1,1)), float64.

  A third of the inputs are exactly 0 (as after a ReLU), so many windows hold tied maxima: the
  gradient must go to the first one in row-major order, like PyTorch's.
  """
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(shape[2] * 10 + shape[3])
  x = rng.normal(size=shape)
  x[x < 0.3] = 0.0
  x_torch = torch.tensor(x.transpose(0, 4, 1, 2, 3), requires_grad=True)
  y_torch = torch.nn.functional.max_pool3d(x_torch, (1, 3, 3), (1, 2, 2), (0, 1, 1))
  g = rng.normal(size=y_torch.shape)
  y_torch.backward(torch.tensor(g))
  y, vjp = jax.vjp(common.max_pool_3x3_stride2, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), y_torch.detach().numpy().transpose(0, 2, 3, 4, 1))
  grad = vjp(jnp.asarray(g.transpose(0, 2, 3, 4, 1)))[0]
  np.testing.assert_allclose(np.asarray(grad), x_torch.grad.numpy().transpose(0, 2, 3, 4, 1),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dtype', ('float64', 'float32', 'bfloat16'))
def test_gelu_exact_matches_jax_gelu_value_and_gradient(x64, dtype):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(5, 7)) * 3.0, dtype)
  g = jnp.asarray(rng.normal(size=(5, 7)), dtype)
  got, got_vjp = jax.vjp(common.gelu_exact, x)
  want, want_vjp = jax.vjp(lambda a: jax.nn.gelu(a, approximate=False), x)
  tol = {'float64': 1e-12, 'float32': 1e-6, 'bfloat16': 1e-2}[dtype]
  assert got.dtype == want.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=tol,
                             atol=tol)
  np.testing.assert_allclose(np.asarray(got_vjp(g)[0], np.float64),
                             np.asarray(want_vjp(g)[0], np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype', ('float64', 'float32', 'bfloat16'))
def test_layer_norm_matches_nnx_layer_norm(x64, dtype):
  """``common.LayerNorm`` (custom VJP) vs ``nnx.LayerNorm`` with the same parameters: values and
  gradients w.r.t. input, scale and bias; the module keeps nnx.LayerNorm's parameter tree."""
  rng = np.random.default_rng(8)
  c = 6
  fast = common.layer_norm(c, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
  fast.use_fast_variance = False
  plain = nnx.LayerNorm(c, epsilon=1e-5, dtype=jnp.dtype(dtype), param_dtype=jnp.float32,
                        use_fast_variance=False, rngs=nnx.Rngs(0))
  assert isinstance(fast, nnx.LayerNorm)
  assert set(nnx.state(fast, nnx.Param).keys()) == set(nnx.state(plain, nnx.Param).keys())
  scale = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
  for module in (fast, plain):
    module.scale[...] = scale
    module.bias[...] = bias
  x = jnp.asarray(rng.normal(size=(2, 5, c)) * 3.0 + 1.0, dtype)
  g = jnp.asarray(rng.normal(size=(2, 5, c)), dtype)

  def value_and_grads(module):
    graphdef, params = nnx.split(module)
    params = nnx.as_pure(params)
    y, vjp = jax.vjp(lambda p, a: nnx.merge(graphdef, p)(a), params, x)
    return y, vjp(g)

  y_fast, (dm_fast, dx_fast) = value_and_grads(fast)
  y_plain, (dm_plain, dx_plain) = value_and_grads(plain)
  assert y_fast.dtype == y_plain.dtype
  tol = {'float64': 1e-11, 'float32': 2e-5, 'bfloat16': 5e-2}[dtype]
  as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float64) if dtype == 'float64' else
                              jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(as64(y_fast), as64(y_plain), rtol=tol, atol=tol)
  np.testing.assert_allclose(as64(dx_fast), as64(dx_plain), rtol=tol, atol=tol)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(as64(dm_fast[name]), as64(dm_plain[name]),
                               rtol=tol, atol=tol * 10)


# The custom-VJP matmuls and the plain expressions whose value and autodiff they must equal.
_MATMULS = {
    'matmul_last_axis': (common.matmul_last_axis, lambda a, b: jnp.einsum('...i,io->...o', a, b)),
    'gelu_matmul_last_axis': (common.gelu_matmul_last_axis, lambda a, b: jnp.einsum(
        '...i,io->...o', jax.nn.gelu(a, approximate=False), b)),
}


@pytest.mark.parametrize('op', sorted(_MATMULS))
@pytest.mark.parametrize('lead', ((7,), (2, 3, 5)), ids=('rows', 'tokens'))
@pytest.mark.parametrize('features', ((6, 4), (3, 5)), ids=('narrowing', 'widening'))
def test_custom_vjp_matmuls_match_autodiff_of_the_plain_expression(x64, op, lead, features):
  """Value and both gradients equal autodiff of the plain expression (float64), and
  ``check_grads`` agrees with finite differences."""
  fn, plain = _MATMULS[op]
  rng = np.random.default_rng(len(lead) + len(op))
  x = jnp.asarray(rng.normal(size=(*lead, features[0])) * 2.0)
  kernel = jnp.asarray(rng.normal(size=features))
  got, got_vjp = jax.vjp(fn, x, kernel)
  want, want_vjp = jax.vjp(plain, x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  g = jnp.asarray(rng.normal(size=want.shape))
  for a, b in zip(got_vjp(g), want_vjp(g)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  jax.test_util.check_grads(fn, (x, kernel), order=1, modes=('rev',))


def test_linear_routes_through_matmul_last_axis_with_torch_semantics(x64):
  rng = np.random.default_rng(5)
  layer = common.linear(6, 4, rngs=nnx.Rngs(0))
  assert layer.dot_general is common.linear_dot_general
  x = jnp.asarray(rng.normal(size=(3, 2, 6)))
  kernel, bias = layer.kernel[...], layer.bias[...]
  np.testing.assert_allclose(layer(x), x @ kernel + bias, rtol=1e-12, atol=1e-12)
  # Its gradient graph contains the materialised transpose (the point of the custom VJP).
  graph, params = nnx.split(layer)
  loss = lambda p: jnp.sum(nnx.merge(graph, p)(x) ** 2)
  assert 'optimization_barrier' in str(jax.make_jaxpr(jax.grad(loss))(params))
  grads = jax.grad(loss)(params)
  g = 2 * (x @ kernel + bias)
  # float32 parameters: their gradients are rounded to float32.
  np.testing.assert_allclose(grads['kernel'][...], np.einsum('abi,abo->io', x, g), rtol=1e-6)
  np.testing.assert_allclose(grads['bias'][...], g.sum(axis=(0, 1)), rtol=1e-6)


def test_linear_dot_general_falls_back_for_other_contractions():
  rng = np.random.default_rng(6)
  a = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  dims = (((2,), (1,)), ((0,), (0,)))  # batched: not the Linear pattern
  np.testing.assert_allclose(common.linear_dot_general(a, b, dims),
                             jax.lax.dot_general(a, b, dims), rtol=1e-6)
  x16 = jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)
  k16 = jnp.asarray(rng.normal(size=(4, 5)), jnp.bfloat16)
  out, vjp = jax.vjp(common.matmul_last_axis, x16, k16)
  dx, dk = vjp(jnp.ones_like(out))
  assert out.dtype == dx.dtype == dk.dtype == jnp.bfloat16


@pytest.mark.parametrize('case', ('bias', 'no_bias', 'bfloat16_layer', 'plain_dot_general'))
def test_gelu_then_linear_equals_the_layer_applied_to_gelu(x64, case):
  """``gelu_then_linear(h, layer)`` = ``layer(gelu_exact(h))``: value and the gradients of h,
  kernel and bias, for the fast path and for the layers it must hand back to ``nnx.Linear``."""
  rng = np.random.default_rng(21)
  dtype = jnp.bfloat16 if case == 'bfloat16_layer' else jnp.float64
  layer = common.linear(6, 4, use_bias=case != 'no_bias', dtype=dtype, rngs=nnx.Rngs(3))
  if case == 'plain_dot_general':
    layer.dot_general = jax.lax.dot_general
  layer.kernel[...] = jnp.asarray(rng.normal(size=(6, 4)), layer.kernel[...].dtype)
  h = jnp.asarray(rng.normal(size=(2, 5, 6)) * 2.0, dtype)
  g = jnp.asarray(rng.normal(size=(2, 5, 4)), dtype)

  def value_and_grads(fn):
    graphdef, params = nnx.split(layer)
    params = nnx.as_pure(params)
    y, vjp = jax.vjp(lambda p, a: fn(a, nnx.merge(graphdef, p)), params, h)
    return y, vjp(g)

  y, (dparams, dh) = value_and_grads(common.gelu_then_linear)
  y_want, (dparams_want, dh_want) = value_and_grads(lambda a, m: m(common.gelu_exact(a)))
  tol = 2e-2 if case == 'bfloat16_layer' else 1e-11
  assert y.dtype == y_want.dtype
  as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float64))
  np.testing.assert_allclose(as64(y), as64(y_want), rtol=tol, atol=tol)
  np.testing.assert_allclose(as64(dh), as64(dh_want), rtol=tol, atol=tol)
  assert set(dparams) == set(dparams_want) == ({'kernel'} if case == 'no_bias' else {'kernel', 'bias'})
  for name in dparams:
    np.testing.assert_allclose(as64(dparams[name]), as64(dparams_want[name]), rtol=tol, atol=tol * 10)


def test_gelu_then_linear_keeps_one_activation_per_mlp_for_the_backward():
  """A stack of MLPs trained through ``gelu_then_linear`` needs at least one hidden activation
  less per MLP in XLA's temporary buffer than ``layer(gelu_exact(h))``, which keeps both ``h``
  (for the GELU derivative) and ``gelu(h)`` (for the kernel gradient)."""
  rows, dim, hidden, depth = 1024, 32, 256, 6
  rng = np.random.default_rng(5)
  fc1 = [jnp.asarray(rng.normal(size=(dim, hidden)) * 0.1, jnp.float32) for _ in range(depth)]
  fc2 = [jnp.asarray(rng.normal(size=(hidden, dim)) * 0.1, jnp.float32) for _ in range(depth)]
  x = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)

  def loss(weights, x, fused):
    for w1, w2 in zip(*weights):
      h = common.matmul_last_axis(x, w1)
      x = x + (common.gelu_matmul_last_axis(h, w2) if fused
               else common.matmul_last_axis(common.gelu_exact(h), w2))
    return jnp.sum(x * x)

  temp = {}
  for fused in (False, True):
    compiled = jax.jit(jax.grad(lambda w, a: loss(w, a, fused))).lower((fc1, fc2), x).compile()
    temp[fused] = compiled.memory_analysis().temp_size_in_bytes
  activation = rows * hidden * 4
  assert temp[True] <= temp[False] - (depth - 2) * activation, temp
