"""LR schedule (SPEC.md 6.4) and durations: values at the seams against a NumPy transcription."""

import math

import ml_collections
import numpy as np
import pytest

from dtf_jax.train import durations as durations_lib
from dtf_jax.train import schedules


def reference_lr(i, base, W, Tc, mult=100.0, min_lr=1e-6):
  """SPEC.md 6.4, transcribed in float64."""
  if i <= W:
    return base / mult * (1 + (mult - 1) * i / W)
  return min_lr + (base - min_lr) * (1 + math.cos(math.pi * (i - W - 1) / Tc)) / 2


def make_config(**kw):
  c = ml_collections.ConfigDict(dict(iter_size=1, total_epochs=None, total_steps=None))
  c.optimizer = ml_collections.ConfigDict(dict(
      base_learning_rate=0.04, warmup_epochs=None, warmup_steps=None, warmup_multiplier=100.0,
      min_lr=1e-6, schedule="cosine"))
  for k, v in kw.items():
    if k.startswith("opt_"):
      c.optimizer[k[4:]] = v
    else:
      c[k] = v
  return c


@pytest.mark.parametrize("n,epochs,warmup_epochs,base", [(37, 5, 1, 0.04), (120, 64, 5, 0.02)])
def test_lr_at_seams_matches_spec(n, epochs, warmup_epochs, base):
  rng = np.random.default_rng(0)
  W, Tc = warmup_epochs * n, (epochs - warmup_epochs) * n
  last = epochs * n - 1
  points = [0, 1, W - 1, W, W + 1, W + 2, last] + list(rng.integers(0, last, 5))
  got = np.asarray(schedules.lr_at_iteration(np.array(points), base=base, warmup_iterations=W,
                                             cosine_iterations=Tc))
  want = np.array([reference_lr(i, base, W, Tc) for i in points])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
  # base is used twice at the warm-up seam, and the first iteration is base / 100.
  assert got[3] == pytest.approx(base, rel=1e-6) and got[4] == pytest.approx(base, rel=1e-6)
  assert got[0] == pytest.approx(base / 100, rel=1e-6)
  assert got[5] < base


def test_step_schedule_uses_lr_of_the_last_iteration_of_each_step():
  # 10 iterations per epoch, iter_size 3: steps end at iterations 2, 5, 8 (iteration 9 is
  # discarded), then 12, 15, 18 in epoch 1, ...
  n, iter_size, epochs, base = 10, 3, 4, 0.1
  config = make_config(iter_size=iter_size, total_epochs=epochs, opt_warmup_epochs=1,
                       opt_base_learning_rate=base)
  d = durations_lib.resolve_durations(config, n)
  assert (d.steps_per_epoch, d.total_steps, d.warmup_iterations, d.cosine_iterations) == (3, 12, 10, 30)
  ends = [d.last_iteration_of_step(s) for s in range(d.total_steps)]
  assert ends == [2, 5, 8, 12, 15, 18, 22, 25, 28, 32, 35, 38]
  schedule = schedules.make_step_schedule(config.optimizer, d)
  got = np.array([float(schedule(s)) for s in range(d.total_steps)])
  want = np.array([reference_lr(i, base, 10, 30) for i in ends])
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_durations_from_steps_and_errors():
  d = durations_lib.resolve_durations(make_config(total_steps=7, iter_size=2, opt_warmup_steps=2), 5)
  assert d.total_steps == 7 and d.steps_per_epoch == 2 and d.warmup_iterations == 4
  assert d.schedule_iterations == d.last_iteration_of_step(6) + 1 == 3 * 5 + 2
  # total_steps wins over total_epochs (command-line override of an epoch-based config).
  assert durations_lib.resolve_durations(make_config(total_steps=7, total_epochs=2), 5).total_steps == 7
  with pytest.raises(ValueError, match="total_epochs or total_steps"):
    durations_lib.resolve_durations(make_config(), 5)
  with pytest.raises(ValueError, match="iter_size"):
    durations_lib.resolve_durations(make_config(total_steps=7, iter_size=8), 5)
  with pytest.raises(ValueError, match="warm-up"):
    durations_lib.resolve_durations(make_config(total_epochs=1, opt_warmup_epochs=1), 5)
  c = make_config(total_epochs=2)
  c.eval_every_epochs, c.eval_every_steps = 0.5, None
  assert durations_lib.every_steps(c, "eval", durations_lib.resolve_durations(c, 8)) == 4
