"""The one place that turns epochs into steps (and steps into data-loader iterations).

Vocabulary (SPEC.md 6.4):
  * an *iteration* is one data-loader batch (``config.batch_size`` clips over all hosts); the
    original's learning-rate scheduler advances once per iteration;
  * a *step* is one optimizer update, taken every ``iter_size`` iterations (gradient
    accumulation); the iterations left over at the end of an epoch (``n % iter_size``) are
    discarded, as in the original.

Durations in the config are given in epochs or in steps: ``total_epochs`` | ``total_steps``,
``warmup_epochs`` | ``warmup_steps``, and for periodic actions ``{name}_every_epochs`` |
``{name}_every_steps`` (``eval``, ``checkpoint``, ``log``). When both of a pair are set, the
``_steps`` value wins (so ``--config.total_steps=100`` overrides a config's ``total_epochs``
without having to unset it; command-line flags cannot set a float field to None).
"""

from __future__ import annotations

import dataclasses
import logging
import math


@dataclasses.dataclass(frozen=True)
class Durations:
  """Resolved lengths of a run.

  Attributes:
    iterations_per_epoch: data-loader iterations per epoch, ``n``.
    iter_size: iterations per optimizer step (gradient accumulation).
    total_steps: optimizer steps of the whole run.
    warmup_iterations: ``W`` of the LR schedule, in iterations.
    schedule_iterations: iterations the LR schedule spans (``epochs * n`` for an epoch-based
      run); the cosine lasts ``schedule_iterations - W`` iterations (``Tc``).
  """

  iterations_per_epoch: int
  iter_size: int
  total_steps: int
  warmup_iterations: int
  schedule_iterations: int

  @property
  def steps_per_epoch(self) -> int:
    return self.iterations_per_epoch // self.iter_size

  @property
  def cosine_iterations(self) -> int:
    return self.schedule_iterations - self.warmup_iterations

  def last_iteration_of_step(self, step):
    """0-based data-loader iteration whose backward pass completes optimizer step ``step``.

    Works on Python ints and on jax/numpy integer arrays. The optimizer step ``step`` uses
    ``lr(last_iteration_of_step(step))`` (SPEC.md 6.4).
    """
    spe = self.steps_per_epoch
    return (step // spe) * self.iterations_per_epoch + (step % spe + 1) * self.iter_size - 1

  def epoch_of_step(self, step: int) -> float:
    """Fractional epoch reached after ``step`` optimizer steps."""
    return step / self.steps_per_epoch


def _either(config, epochs_key: str, steps_key: str):
  """``(epochs, steps)`` with at most one of them not None (steps win)."""
  epochs = config.get(epochs_key, None)
  steps = config.get(steps_key, None)
  if steps is not None:
    if epochs is not None:
      logging.info("%s=%s overrides %s=%s", steps_key, steps, epochs_key, epochs)
    return None, steps
  return epochs, None


def resolve_durations(config, iterations_per_epoch: int) -> Durations:
  """Computes the run's durations from ``config`` and the loader's epoch length.

  Args:
    config: the experiment ConfigDict (reads ``iter_size``, ``total_epochs``/``total_steps``,
      ``optimizer.warmup_epochs``/``optimizer.warmup_steps``).
    iterations_per_epoch: data-loader iterations per epoch at the global batch size.
  """
  iter_size = int(config.get("iter_size", 1))
  if iter_size < 1:
    raise ValueError(f"iter_size must be >= 1, got {iter_size}")
  if iterations_per_epoch < iter_size:
    raise ValueError(
        f"an epoch has {iterations_per_epoch} iterations, fewer than iter_size={iter_size}: no "
        "optimizer step would ever be taken; use a smaller batch_size or iter_size")
  n = int(iterations_per_epoch)
  spe = n // iter_size
  epochs, steps = _either(config, "total_epochs", "total_steps")
  if epochs is None and steps is None:
    raise ValueError("config must set total_epochs or total_steps")
  if epochs is not None:
    if epochs <= 0:
      raise ValueError(f"total_epochs must be > 0, got {epochs}")
    total_steps = int(round(epochs * spe))
    schedule_iterations = int(round(epochs * n))
  else:
    total_steps = int(steps)
    if total_steps <= 0:
      raise ValueError(f"total_steps must be > 0, got {steps}")
  tmp = Durations(n, iter_size, total_steps, 0, 1)
  if steps is not None:
    schedule_iterations = tmp.last_iteration_of_step(total_steps - 1) + 1
  opt = config.get("optimizer", {})
  w_epochs, w_steps = _either(opt, "warmup_epochs", "warmup_steps")
  if w_steps is not None:
    warmup = int(w_steps) * iter_size
  else:
    warmup = int(round((w_epochs or 0) * n))
  if not 0 <= warmup < schedule_iterations:
    raise ValueError(
        f"warm-up of {warmup} iterations does not fit in a schedule of {schedule_iterations} "
        "iterations; shorten optimizer.warmup_epochs/warmup_steps")
  return Durations(n, iter_size, total_steps, warmup, schedule_iterations)


def every_steps(config, name: str, durations: Durations, default_steps: int | None = None):
  """Period in optimizer steps of the periodic action ``name`` (None = never).

  Reads ``config.{name}_every_epochs`` or ``config.{name}_every_steps``.
  """
  epochs, steps = _either(config, f"{name}_every_epochs", f"{name}_every_steps")
  if epochs is not None:
    return max(1, int(math.floor(epochs * durations.steps_per_epoch)))
  if steps is not None:
    return max(1, int(steps))
  return default_steps
