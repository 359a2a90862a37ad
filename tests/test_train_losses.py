"""Losses (SPEC.md 6.5, 7.11) against NumPy formulas and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dtf_jax.train import losses


def log_softmax64(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 7)) * 3
  labels = rng.integers(0, 7, size=6)
  return logits, labels


def test_lsr_matches_spec_formula(batch):
  logits, labels = batch
  e, k = 0.1, logits.shape[1]
  target = np.full(logits.shape, e / (k - 1))
  target[np.arange(len(labels)), labels] += 1 - e       # true class: 1 - e + e/(K-1)
  np.testing.assert_allclose(target.sum(axis=1), 1 + e / (k - 1))
  want = np.mean(-(target * log_softmax64(logits)).sum(axis=1))
  with jax.enable_x64(True):
    got = losses.lsr_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), e)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_standard_smoothing_and_plain_ce_match_torch(batch):
  logits, labels = batch
  tl, ty = torch.tensor(logits), torch.tensor(labels)
  got = losses.smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 0.2)
  np.testing.assert_allclose(float(got), float(torch.nn.functional.cross_entropy(tl, ty, label_smoothing=0.2)), rtol=1e-5)
  got = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), float(torch.nn.functional.cross_entropy(tl, ty)), rtol=1e-5)


def test_two_heads_sum_and_weights(batch):
  logits, labels = batch
  rng = np.random.default_rng(1)
  dual = rng.normal(size=logits.shape)
  ce = lambda z: float(torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(labels)))
  total, main = losses.classification_loss((jnp.asarray(logits), jnp.asarray(dual)), jnp.asarray(labels))
  np.testing.assert_allclose(float(total), ce(logits) + ce(dual), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(main), np.asarray(jnp.asarray(logits)))
  total, _ = losses.classification_loss((jnp.asarray(logits), jnp.asarray(dual)), jnp.asarray(labels),
                                        head_weights=(1.0, 0.25))
  np.testing.assert_allclose(float(total), ce(logits) + 0.25 * ce(dual), rtol=1e-5)
  with pytest.raises(ValueError, match="head_weights"):
    losses.classification_loss((jnp.asarray(logits),), jnp.asarray(labels), head_weights=(1.0, 1.0))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing="lrs")
  with pytest.raises(ValueError, match="logits"):
    losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:3]))
