"""``swin.biased_softmax`` (custom VJP) equals autodiff of ``softmax(logits + B + M)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax.layers import swin


@pytest.fixture
def x64():
  """float64 for the duration of one test (scoped: xdist workers share processes)."""
  with jax.enable_x64(True):
    yield


def _plain(logits, bias, mask):
  b_, nh, n, _ = logits.shape
  z = logits + bias[None]
  if mask is not None:
    nw = mask.shape[0]
    z = (z.reshape(b_ // nw, nw, nh, n, n) + mask[None, :, None]).reshape(b_, nh, n, n)
  return jax.nn.softmax(z, axis=-1)


@pytest.mark.parametrize('masked', (False, True), ids=('no_mask', 'shift_mask'))
def test_biased_softmax_value_and_gradients(x64, masked):
  rng = np.random.default_rng(int(masked))
  nw, nh, n = 4, 3, 9
  logits = jnp.asarray(rng.normal(size=(2 * nw, nh, n, n)) * 2.0)
  bias = jnp.asarray(rng.normal(size=(nh, n, n)))
  mask = jnp.asarray(np.where(rng.random((nw, n, n)) < 0.3, -100.0, 0.0)) if masked else None
  got, got_vjp = jax.vjp(lambda a, b: swin.biased_softmax(a, b, mask), logits, bias)
  want, want_vjp = jax.vjp(lambda a, b: _plain(a, b, mask), logits, bias)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  g = jnp.asarray(rng.normal(size=want.shape))
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
