"""Optimisers: the originals' SGD recipe and the modern variants (SPEC.md 6.4, 7.10).

``recipe='original'`` (default) reproduces ``torch.optim.SGD`` as the SIFA script drives it:

  1. clip the global L2 norm of all trainable gradients to ``clip_gradient`` (40), PyTorch style:
     ``g <- g * min(1, clip / (norm + 1e-6))``;
  2. ``d = g + weight_decay * theta`` for **every** trainable parameter (norms, biases, tables...);
  3. momentum without dampening or Nesterov: ``buf <- d`` on the first step, else
     ``buf <- momentum * buf + d`` (``optax.trace`` starting from a zero buffer gives exactly
     ``buf = d`` on the first step when there is no dampening);
  4. ``theta <- theta - lr(i) * buf`` with the per-iteration schedule of ``schedules.py``.

``recipe='modern'``: Nesterov momentum and no decay on parameters with fewer than two dimensions
(norm scales, biases, DTF ``alpha``-style vectors) nor on relative-position tables.
``optimizer.name='adamw'``: AdamW (``b1``, ``b2``, ``eps``) with the same decay mask under
'modern' (all parameters under 'original').

Only ``nnx.Param`` leaves are optimised; ``FrozenParam`` and ``BatchStat`` never reach the
optimiser (they are separate collections of the train state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtf_jax.train.durations import Durations
from dtf_jax.train.schedules import make_step_schedule

_NO_DECAY_NAME_PARTS = ("relative_position_bias_table", "position_embedding", "pos_embed", "table")


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(params):
  """``True`` for parameters the 'modern' recipe decays: >= 2-D and not a position table."""

  def keep(path, leaf):
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
    if any(part in names for part in _NO_DECAY_NAME_PARTS):
      return False
    return jnp.ndim(leaf) >= 2

  return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(optimizer_config, durations: Durations, *, trainable_mask=None):
  """Builds the optax transformation and the step -> learning-rate schedule.

  Args:
    optimizer_config: ``config.optimizer`` (name 'sgd'|'adamw', recipe 'original'|'modern',
      base_learning_rate, momentum, weight_decay, clip_gradient (None: no clipping), nesterov
      (None: decided by the recipe), b1, b2, eps, warm-up/schedule keys of ``schedules.py``).
    durations: the run's durations.
    trainable_mask: optional params-shaped bool tree; parameters marked False are left exactly
      unchanged (no decay, no momentum) -- the originals' handling of parameters whose gradient
      is None (``steps.parameters_reaching_loss``).

  Returns:
    ``(tx, schedule)``.
  """
  recipe = optimizer_config.get("recipe", "original")
  if recipe not in ("original", "modern"):
    raise ValueError(f"optimizer.recipe must be 'original' or 'modern', got {recipe!r}")
  name = optimizer_config.get("name", "sgd")
  schedule = make_step_schedule(optimizer_config, durations)
  weight_decay = float(optimizer_config.get("weight_decay", 1e-4))
  mask = None if recipe == "original" else decay_mask
  chain = []
  clip = optimizer_config.get("clip_gradient", 40.0)
  if clip is not None:
    chain.append(clip_by_global_norm_torch(float(clip)))
  if name == "sgd":
    nesterov = optimizer_config.get("nesterov", None)
    if nesterov is None:
      nesterov = recipe == "modern"   # the original's `nesterov: True` is never passed (SPEC 7.10)
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay, mask))
    chain.append(optax.trace(decay=float(optimizer_config.get("momentum", 0.9)), nesterov=bool(nesterov)))
  elif name == "adamw":
    chain.append(optax.scale_by_adam(
        b1=float(optimizer_config.get("b1", 0.9)), b2=float(optimizer_config.get("b2", 0.999)),
        eps=float(optimizer_config.get("eps", 1e-8))))
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay, mask))
  else:
    raise ValueError(f"optimizer.name must be 'sgd' or 'adamw', got {name!r}")
  chain.append(optax.scale_by_learning_rate(schedule))
  return only_trainable(optax.chain(*chain), trainable_mask), schedule


def only_trainable(tx: optax.GradientTransformation, trainable_mask=None
                   ) -> optax.GradientTransformation:
  """``tx`` restricted to the parameters marked True in ``trainable_mask`` (None: all of them).

  Masked-out leaves pass their (zero) gradient through unchanged: a zero update, as
  ``torch.optim.SGD`` skips a parameter whose gradient is None.
  """
  if trainable_mask is None or all(jax.tree.leaves(trainable_mask)):
    return tx
  return optax.masked(tx, trainable_mask)
