"""``swin.window_attention_core`` (hand-written VJP) against autodiff of the plain formula.

The plain formula, written here from SPEC.md 3.6: split ``qkv`` into head-major q, k, v,
``softmax(q * scale @ k^T + B + M) @ v``, heads concatenated head-major.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dtf_jax.layers import swin


@pytest.fixture
def x64():
  """float64 for the duration of one test (scoped: xdist workers share processes)."""
  with jax.enable_x64(True):
    yield


def _plain(qkv, bias, mask, num_heads, scale):
  b_, n, c3 = qkv.shape
  c = c3 // 3
  hd = c // num_heads
  q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b_, n, num_heads, hd) for i in range(3))
  z = jnp.einsum('bnhd,bmhd->bhnm', q * scale, k) + bias[None]
  if mask is not None:
    nw = mask.shape[0]
    z = (z.reshape(b_ // nw, nw, num_heads, n, n) + mask[None, :, None]).reshape(z.shape)
  attn = jax.nn.softmax(z, axis=-1)
  return jnp.einsum('bhnm,bmhd->bnhd', attn, v).reshape(b_, n, c)


def _inputs(rng, masked, windows=8, num_heads=3, head_dim=4, n=9, nw=4):
  qkv = rng.normal(size=(windows, n, 3 * num_heads * head_dim))
  bias = rng.normal(size=(num_heads, n, n))
  mask = np.where(rng.random((nw, n, n)) < 0.3, -100.0, 0.0) if masked else None
  return qkv, bias, mask


@pytest.mark.parametrize('masked', (False, True), ids=('no_mask', 'shift_mask'))
def test_window_attention_core_value_and_gradients(x64, masked):
  rng = np.random.default_rng(10 + int(masked))
  qkv, bias, mask = _inputs(rng, masked)
  qkv, bias = jnp.asarray(qkv), jnp.asarray(bias)
  mask = None if mask is None else jnp.asarray(mask)
  scale = 0.5
  got, got_vjp = jax.vjp(lambda a, b: swin.window_attention_core(a, b, mask, 3, scale), qkv, bias)
  want, want_vjp = jax.vjp(lambda a, b: _plain(a, b, mask, 3, scale), qkv, bias)
  assert got.shape == (8, 9, 12)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  g = jnp.asarray(rng.normal(size=want.shape))
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  # Finite differences too (an oracle independent of both hand-written and autodiff VJPs).
  check_grads(lambda a, b: swin.window_attention_core(a, b, mask, 3, scale), (qkv, bias),
              order=1, modes=('rev',), atol=1e-6, rtol=1e-6)


def test_window_attention_core_bfloat16_close_to_float32():
  rng = np.random.default_rng(3)
  qkv, bias, mask = _inputs(rng, True)
  qkv32, bias = jnp.asarray(qkv, jnp.float32), jnp.asarray(bias, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  g = jnp.asarray(rng.normal(size=(8, 9, 12)), jnp.float32)

  def run(q):
    out, vjp = jax.vjp(lambda a, b: swin.window_attention_core(a, b, mask, 3, 0.5), q, bias)
    return (out,) + vjp(g.astype(out.dtype))

  want = run(qkv32)
  got = run(qkv32.astype(jnp.bfloat16))
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  assert got[2].dtype == jnp.float32  # the bias gradient stays float32
  for a, b in zip(got, want):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.03 * scale)
