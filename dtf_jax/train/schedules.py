"""Learning-rate schedule of the originals (SPEC.md 6.4): linear warm-up, then cosine.

With ``W`` warm-up iterations, ``Tc`` cosine iterations and iteration index ``i`` from 0::

  lr(i) = base / m * (1 + (m - 1) * i / W)                         for i <= W
  lr(i) = min_lr + (base - min_lr) * (1 + cos(pi * (i - W - 1) / Tc)) / 2   for i > W

(``m`` = warmup_multiplier = 100, ``min_lr`` = 1e-6), so ``base`` is used at both ``i = W`` and
``i = W + 1``. The schedule advances once per *data-loader iteration*; the optimizer step that
completes at iteration ``i`` uses ``lr(i)`` (see ``Durations.last_iteration_of_step``).
``W = 0`` (no warm-up; the original would divide by zero) gives ``lr(0) = base`` and the cosine
from ``i = 1``.
"""

from __future__ import annotations

import jax.numpy as jnp

from dtf_jax.train.durations import Durations


def lr_at_iteration(iteration, *, base: float, warmup_iterations: int, cosine_iterations: int,
                    warmup_multiplier: float = 100.0, min_lr: float = 1e-6):
  """``lr(i)`` of the original scheduler for iteration index(es) ``iteration`` (int or array)."""
  if cosine_iterations <= 0:
    raise ValueError(f"cosine_iterations must be > 0, got {cosine_iterations}")
  if warmup_multiplier <= 1.0:
    raise ValueError(f"warmup_multiplier must be > 1, got {warmup_multiplier}")
  i = jnp.asarray(iteration, jnp.float32)
  w = float(warmup_iterations)
  if warmup_iterations > 0:
    warm = base / warmup_multiplier * (1.0 + (warmup_multiplier - 1.0) * i / w)
  else:
    warm = jnp.full_like(i, base)
  cosine = min_lr + (base - min_lr) * (1.0 + jnp.cos(jnp.pi * (i - w - 1.0) / cosine_iterations)) / 2
  return jnp.where(i <= w, warm, cosine)


def make_step_schedule(optimizer_config, durations: Durations):
  """An optax schedule ``step -> lr``: the optimizer step's learning rate ``lr(i(step))``.

  Args:
    optimizer_config: reads ``base_learning_rate``, ``warmup_multiplier`` (100), ``min_lr`` (1e-6)
      and ``schedule`` ('cosine' as the original, or 'constant').
    durations: the run's durations (the one place that maps steps to iterations).
  """
  base = float(optimizer_config.base_learning_rate)
  kind = optimizer_config.get("schedule", "cosine")
  if kind == "constant":
    return lambda step: jnp.full((), base, jnp.float32)
  if kind != "cosine":
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {kind!r}")
  kwargs = dict(
      base=base,
      warmup_iterations=durations.warmup_iterations,
      cosine_iterations=durations.cosine_iterations,
      warmup_multiplier=float(optimizer_config.get("warmup_multiplier", 100.0)),
      min_lr=float(optimizer_config.get("min_lr", 1e-6)))

  def schedule(step):
    return lr_at_iteration(durations.last_iteration_of_step(jnp.asarray(step, jnp.int32)), **kwargs)

  return schedule
