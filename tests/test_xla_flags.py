"""``dtf_jax.xla_flags``: the entry points' XLA flags are added once, never over a user's value,
and this jax's XLA accepts them (an unknown flag aborts the process)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from dtf_jax import xla_flags


def test_adds_missing_flags_and_keeps_the_users():
  env = {}
  assert xla_flags.add_default_flags(env) == " ".join(xla_flags.DEFAULT_FLAGS)
  assert xla_flags.add_default_flags(env) == " ".join(xla_flags.DEFAULT_FLAGS)  # idempotent
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_prefer_vector_width=256"}
  value = xla_flags.add_default_flags(env)
  assert value.split() == ["--xla_force_host_platform_device_count=8",
                           "--xla_cpu_prefer_vector_width=256"]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.add_default_flags(env).split() == (
      ["--xla_force_host_platform_device_count=2"] + list(xla_flags.DEFAULT_FLAGS))


def test_this_xla_accepts_the_flags():
  code = ("from dtf_jax import xla_flags; xla_flags.add_default_flags(); import jax, jax.numpy as jnp; "
          "x = jnp.arange(1000.0); print(float(jax.jit(lambda v: jnp.sum(jnp.tanh(v) * v))(x)))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = sum(math.tanh(v) * v for v in range(1000))
  assert abs(float(out.stdout.split()[-1]) - expected) <= 1e-5 * expected
