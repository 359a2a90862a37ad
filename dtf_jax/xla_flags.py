"""XLA compiler flags that dtf_jax's entry points add on CPU.

XLA reads ``XLA_FLAGS`` once, when jax creates its first backend, so ``add_default_flags`` must run
before the first jax computation of the process (``train.py``, ``eval.py`` and the benchmarks call
it first thing). A flag the user already put in ``XLA_FLAGS`` (any value) is left as it is.

* ``--xla_cpu_prefer_vector_width=512``: XLA:CPU's own (LLVM-generated) loops - BatchNorm, ReLU,
  the DTF block's elementwise stages, softmax - use 512-bit vectors where the CPU has AVX-512
  (the default is 256). Measured on the 2-core Zen 4 machine, DTF-ResNet50 training step, four
  process pairs: 5% less CPU time per step in every pair (``benchmarks/README.md``). CPUs without
  AVX-512 ignore it; GPU backends ignore all ``xla_cpu`` flags.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_FLAGS = ("--xla_cpu_prefer_vector_width=512",)


def add_default_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Appends each of ``DEFAULT_FLAGS`` whose name is not already in ``environ['XLA_FLAGS']``.

  Returns the resulting ``XLA_FLAGS``.
  """
  current = environ.get("XLA_FLAGS", "").split()
  names = {flag.split("=", 1)[0] for flag in current}
  added = [flag for flag in DEFAULT_FLAGS if flag.split("=", 1)[0] not in names]
  value = " ".join(current + added)
  environ["XLA_FLAGS"] = value
  return value
