"""Optimiser recipes against torch.optim (SPEC.md 6.4, 7.10)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from dtf_jax.train import durations as durations_lib
from dtf_jax.train import optim

SHAPES = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)},
          "attn": {"relative_position_bias_table": (9, 2)}, "fc": {"kernel": (4, 5), "bias": (5,)}}


def flat_names(tree, prefix=""):
  out = []
  for k, v in sorted(tree.items()):  # jax's leaf order
    out += flat_names(v, f"{prefix}{k}/") if isinstance(v, dict) else [f"{prefix}{k}"]
  return out


def random_tree(rng, scale=1.0):
  return jax.tree.map(lambda s: rng.normal(size=s) * scale, SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def opt_config(**kw):
  c = ml_collections.ConfigDict(dict(
      name="sgd", recipe="original", base_learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
      nesterov=None, clip_gradient=40.0, warmup_epochs=None, warmup_steps=1, warmup_multiplier=100.0,
      min_lr=1e-6, schedule="cosine", b1=0.9, b2=0.999, eps=1e-8))
  c.update(kw)
  return c


def run_both(config, *, steps, grad_scale, torch_factory, decay_names=None):
  """Applies the same gradient sequence with optax (float64) and torch; returns both params."""
  rng = np.random.default_rng(0)
  params0 = random_tree(rng)
  grads = [random_tree(rng, grad_scale) for _ in range(steps)]
  d = durations_lib.resolve_durations(
      ml_collections.ConfigDict(dict(iter_size=1, total_steps=steps + 2, total_epochs=None,
                                     optimizer=config)), steps + 2)
  with jax.enable_x64(True):
    tx, schedule = optim.build_optimizer(config, d)
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
      params = optax.apply_updates(params, updates)
    ours = {n: np.asarray(v) for n, v in zip(flat_names(params), jax.tree.leaves(
        params, is_leaf=lambda x: not isinstance(x, dict)))}
    lrs = [float(schedule(s)) for s in range(steps)]
  names = flat_names(params0)
  leaves0 = dict(zip(names, [params0[a][b] for a, b in (n.split("/") for n in names)]))
  tparams = {n: torch.nn.Parameter(torch.tensor(leaves0[n], dtype=torch.float64)) for n in names}
  groups = [{"params": [tparams[n] for n in names if decay_names is None or n in decay_names]},
            {"params": [tparams[n] for n in names if decay_names is not None and n not in decay_names],
             "weight_decay": 0.0}]
  groups = [g for g in groups if g["params"]]
  topt = torch_factory(groups)
  for s, g in enumerate(grads):
    for n in names:
      a, b = n.split("/")
      tparams[n].grad = torch.tensor(g[a][b], dtype=torch.float64)
    if config.clip_gradient is not None:
      torch.nn.utils.clip_grad_norm_(list(tparams.values()), config.clip_gradient)
    for group in topt.param_groups:
      group["lr"] = lrs[s]
    topt.step()
  theirs = {n: p.detach().numpy() for n, p in tparams.items()}
  return ours, theirs, lrs


@pytest.mark.parametrize("grad_scale", [0.3, 30.0])  # 30: the 40-norm clip is active
def test_original_sgd_matches_torch_including_first_step(grad_scale):
  config = opt_config()
  for steps in (1, 4):  # the first step alone (momentum buffer = d), then several
    ours, theirs, lrs = run_both(
        config, steps=steps, grad_scale=grad_scale,
        torch_factory=lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                dampening=0, nesterov=False))
    assert len(set(lrs)) > 1 or steps == 1
    for n in ours:
      np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-12, atol=1e-12, err_msg=n)


def test_first_step_is_lr_times_clipped_gradient_plus_decay():
  # buf <- d on step 1 (not 0.9 * 0 + 0.1 * d or similar): theta1 = theta0 - lr0 * (g + wd*theta0).
  config = opt_config(clip_gradient=None, weight_decay=1e-2)
  rng = np.random.default_rng(1)
  p0, g = random_tree(rng), random_tree(rng)
  d = durations_lib.resolve_durations(ml_collections.ConfigDict(dict(
      iter_size=1, total_steps=5, total_epochs=None, optimizer=config)), 5)
  with jax.enable_x64(True):
    tx, schedule = optim.build_optimizer(config, d)
    upd, _ = tx.update(jax.tree.map(jnp.asarray, g), tx.init(jax.tree.map(jnp.asarray, p0)),
                       jax.tree.map(jnp.asarray, p0))
    lr0 = float(schedule(0))
  assert lr0 == pytest.approx(0.1 / 100)
  want = jax.tree.map(lambda p, gg: -lr0 * (gg + 1e-2 * p), p0, g)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12)


def test_modern_recipe_is_nesterov_without_decay_on_norms_biases_tables():
  config = opt_config(recipe="modern", weight_decay=0.05)
  decayed = {"conv/kernel", "fc/kernel"}
  ours, theirs, _ = run_both(
      config, steps=3, grad_scale=0.5, decay_names=decayed,
      torch_factory=lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=0.05,
                                              nesterov=True))
  for n in ours:
    np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-12, atol=1e-12, err_msg=n)
  mask = optim.decay_mask(jax.tree.map(np.zeros, SHAPES, is_leaf=lambda x: isinstance(x, tuple)))
  assert {n for n, m in zip(flat_names(SHAPES), jax.tree.leaves(mask)) if m} == decayed


def test_adamw_modern_matches_torch():
  config = opt_config(name="adamw", recipe="modern", weight_decay=0.05, clip_gradient=1.0)
  ours, theirs, _ = run_both(
      config, steps=3, grad_scale=1.0, decay_names={"conv/kernel", "fc/kernel"},
      torch_factory=lambda g: torch.optim.AdamW(g, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                                                weight_decay=0.05))
  # torch AdamW decays by lr * wd * theta before the Adam step; optax adds wd * theta to the
  # Adam direction; both give theta - lr * (adam + wd * theta_old).
  for n in ours:
    np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-10, atol=1e-12, err_msg=n)


def test_bad_optimizer_options_raise():
  d = durations_lib.Durations(10, 1, 10, 1, 10)
  with pytest.raises(ValueError, match="recipe"):
    optim.build_optimizer(opt_config(recipe="fancy"), d)
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.build_optimizer(opt_config(name="lamb"), d)
