"""``dtf_jax.host_memory.reuse_step_memory``: repeated CPU executions stop faulting their buffers in.

The behaviour test runs fresh processes (the allocator settings are process-wide): a jitted function
whose 72 MiB intermediate is materialised, called repeatedly, page faults per call counted with
``getrusage``. With glibc's defaults each call maps the buffer afresh (~18k faults of 4 KiB); with
``reuse_step_memory`` the same pages are reused (a few hundred at most). The result is checked
against float64 NumPy in both processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dtf_jax import host_memory

_PROBE = r"""
import resource, sys
import numpy as np
import jax, jax.numpy as jnp
from dtf_jax import host_memory
applied = host_memory.reuse_step_memory()
rng = np.random.default_rng(int(sys.argv[1]))
a = jnp.asarray(rng.normal(size=4096), jnp.float32)
b = jnp.asarray(rng.normal(size=4608), jnp.float32)

@jax.jit
def sums(a, b):
  h = jax.lax.optimization_barrier(jnp.tanh(a[:, None] * b[None, :]))  # 72 MiB, materialised
  return h.sum(0), h.sum(1)

for _ in range(2):
  jax.block_until_ready(sums(a, b))
faults = []
for _ in range(5):
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  cols, rows = jax.block_until_ready(sums(a, b))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
h = np.tanh(np.asarray(a, np.float64)[:, None] * np.asarray(b, np.float64)[None, :])
err = max(float(np.max(np.abs(np.asarray(cols) - h.sum(0)) / (1 + np.abs(h.sum(0))))),
          float(np.max(np.abs(np.asarray(rows) - h.sum(1)) / (1 + np.abs(h.sum(1))))))
print(applied, float(np.median(faults)), err)
"""


def _probe(switch: str, seed: int) -> tuple[str, float, float]:
  env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_SWITCH}
  env.update({host_memory.ENV_SWITCH: switch, "JAX_PLATFORMS": "cpu"})
  out = subprocess.run([sys.executable, "-c", _PROBE, str(seed)], env=env, capture_output=True,
                       text=True, timeout=180)
  assert out.returncode == 0, out.stderr[-2000:]
  applied, faults, err = out.stdout.split()
  return applied, float(faults), float(err)


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs Linux with glibc")  # pylint: disable=protected-access
def test_repeated_calls_reuse_their_buffer_pages():
  seed = int.from_bytes(os.urandom(2), "little")
  applied_off, faults_off, err_off = _probe("0", seed)
  applied_on, faults_on, err_on = _probe("1", seed)
  assert (applied_off, applied_on) == ("False", "True")
  assert faults_off > 10_000  # the 72 MiB buffer mapped afresh: 18k pages of 4 KiB
  assert faults_on < 1_000
  assert err_off < 1e-5 and err_on < 1e-5  # same values either way


def test_switch_off_leaves_jax_alone(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc", lambda: pytest.fail("must not touch the allocator"))
  import jax  # pylint: disable=import-outside-toplevel
  before = jax.config.values["jax_cpu_enable_async_dispatch"]
  assert host_memory.reuse_step_memory({host_memory.ENV_SWITCH: "0"}) is False
  assert jax.config.values["jax_cpu_enable_async_dispatch"] == before
