"""Classification losses (SPEC.md 6.5, 7.11).

* ``cross_entropy``: mean softmax cross-entropy (the originals' default).
* ``lsr_cross_entropy``: the originals' ``LSR(e)`` -- target ``e/(K-1) + (1-e)*[j = label]``, so the
  targets sum to ``1 + e/(K-1)`` (not a distribution; kept for parity, ``label_smoothing='lsr'``).
* ``smoothed_cross_entropy``: standard label smoothing, target ``(1-e)*onehot + e/K``
  (``label_smoothing='standard'``).
* ``classification_loss``: one of the above summed over a model's heads (SIFA-ResNet returns
  ``(main, dual)``: ``CE(main) + CE(dual)``), with per-head weights.

Logits ``(N, K)`` of any float dtype are promoted to float32; labels ``(N,)`` int.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _check(logits, labels):
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"expected logits (N, K) and labels (N,), got logits {logits.shape} and labels {labels.shape}")


def cross_entropy(logits, labels):
  """Mean over the batch of ``-log softmax(logits)[label]``."""
  _check(logits, labels)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def _soft_target_loss(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def lsr_cross_entropy(logits, labels, epsilon: float = 0.1):
  """The originals' LSR: target ``e/(K-1) + (1-e)*onehot`` (sums to ``1 + e/(K-1)``)."""
  _check(logits, labels)
  k = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  return _soft_target_loss(logits, epsilon / (k - 1) + (1.0 - epsilon) * onehot)


def smoothed_cross_entropy(logits, labels, epsilon: float = 0.1):
  """Standard label smoothing: target ``(1-e)*onehot + e/K``."""
  _check(logits, labels)
  k = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  return _soft_target_loss(logits, (1.0 - epsilon) * onehot + epsilon / k)


_LOSSES = {"none": cross_entropy, "lsr": lsr_cross_entropy, "standard": smoothed_cross_entropy}


def classification_loss(outputs, labels, *, label_smoothing: str = "none", epsilon: float = 0.1,
                        head_weights: Sequence[float] | None = None):
  """Loss of a model's output(s): a logits array, or a tuple of logits (one per head).

  Args:
    outputs: ``(N, K)`` logits or a tuple of them (SIFA-ResNet: ``(main, dual)``).
    labels: ``(N,)`` int labels.
    label_smoothing: 'none' (plain CE), 'lsr' (the originals' LSR) or 'standard'.
    epsilon: smoothing factor for 'lsr'/'standard'.
    head_weights: weight of each head's loss (default 1 each: ``CE(main) + CE(dual)``).

  Returns:
    ``(loss, main_logits)``: the scalar float32 loss and the first head's logits.
  """
  if label_smoothing not in _LOSSES:
    raise ValueError(f"label_smoothing must be one of {sorted(_LOSSES)}, got {label_smoothing!r}")
  fn = _LOSSES[label_smoothing]
  heads = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
  weights = tuple(head_weights) if head_weights is not None else (1.0,) * len(heads)
  if len(weights) != len(heads):
    raise ValueError(f"head_weights {weights} has {len(weights)} entries for {len(heads)} model heads")
  total = 0.0
  for w, logits in zip(weights, heads):
    total = total + w * (cross_entropy(logits, labels) if fn is cross_entropy
                         else fn(logits, labels, epsilon))
  return total, heads[0]
