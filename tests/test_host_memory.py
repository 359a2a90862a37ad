"""``dtf_jax.host_memory``: XLA:CPU's large per-call buffers get transparent huge pages after the
relaunch, and the relaunch happens only where it helps and only once.

The behaviour tests run fresh processes (glibc reads its tunables at start): a jitted function whose
72 MiB intermediate is materialised on XLA's threads, page faults per call counted with
``getrusage``. With glibc's defaults each call faults the buffer in 4 KiB at a time (~18k faults);
relaunched with the tunable, one fault per 2 MiB.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dtf_jax import host_memory

_PROBE = r"""
import os, resource, sys
import numpy as np
from dtf_jax import host_memory
host_memory.relaunch_with_huge_pages()
import jax, jax.numpy as jnp
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
err = max(float(np.max(np.abs(np.asarray(cols) - h.sum(0)))),
          float(np.max(np.abs(np.asarray(rows) - h.sum(1)))))
print(os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1], float(np.median(faults)), err)
"""

_HELPS_HERE = host_memory.huge_page_environment(
    {}, mode=host_memory.thp_mode(), glibc=host_memory.glibc_version()) is not None


def _probe(switch: str | None, seed: int) -> tuple[str, str, float, float]:
  env = {k: v for k, v in os.environ.items() if k not in (host_memory.ENV_SWITCH, "GLIBC_TUNABLES")}
  if switch is not None:
    env[host_memory.ENV_SWITCH] = switch
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _PROBE, str(seed)], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  tunables, argument, faults, err = out.stdout.split()[-4:]
  return tunables, argument, float(faults), float(err)


@pytest.mark.skipif(not _HELPS_HERE, reason="needs glibc >= 2.35 and the kernel's THP mode madvise")
def test_relaunched_process_faults_large_xla_buffers_in_by_huge_pages():
  seed = int(np.random.default_rng().integers(1 << 30))
  tunables, argument, huge_faults, huge_err = _probe(None, seed)
  default_tunables, _, default_faults, default_err = _probe("0", seed)
  # The relaunch kept the command line and added the tunable; the switch prevented it.
  assert tunables == "glibc.malloc.hugetlb=1" and argument == str(seed)
  assert default_tunables == "-"
  # Same values either way (float32 sums of 4-5k tanh values against float64).
  assert huge_err < 1e-2 and default_err < 1e-2
  # 72 MiB = 18432 pages of 4 KiB: glibc's default maps the buffer afresh every call ...
  assert default_faults > 9000, default_faults
  # ... with huge pages it takes ~36 faults of 2 MiB (plus small ones elsewhere).
  assert huge_faults < 0.05 * default_faults, (huge_faults, default_faults)


@pytest.mark.parametrize("environ, mode, glibc, expected", [
    ({}, "madvise", (2, 36), "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 39),
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),  # the user's tunables stay
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), None),  # the user's value
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", (2, 36), None),  # no second relaunch
    ({host_memory.ENV_SWITCH: "0"}, "madvise", (2, 36), None),  # switched off
    ({}, "always", (2, 36), None),  # every large mapping gets huge pages already
    ({}, "never", (2, 36), None),  # none can
    ({}, None, (2, 36), None),  # no THP on this kernel
    ({}, "madvise", (2, 34), None),  # glibc before the tunable
    ({}, "madvise", None, None),  # not glibc
])
def test_relaunch_only_where_it_changes_something(environ, mode, glibc, expected):
  env = host_memory.huge_page_environment(environ, mode=mode, glibc=glibc)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected
    assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
        k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def test_thp_mode_and_glibc_version_readers(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None
  version = host_memory.glibc_version()
  if version is not None:
    assert version >= (2, 17)
    assert os.confstr("CS_GNU_LIBC_VERSION").startswith(f"glibc {version[0]}.{version[1]}")
