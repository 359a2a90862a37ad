"""Keep XLA:CPU's per-step working memory mapped between steps (Linux, glibc).

XLA:CPU allocates an executable's whole temporary buffer (hundreds of MiB for a training step) with
``malloc`` when the executable runs and frees it when it ends. By default jax runs CPU executables
on a worker thread, and glibc serves an allocation that large from a worker thread with a fresh
``mmap`` (whatever ``M_MMAP_MAX`` says) that ``free`` unmaps again, so every step touches brand-new
pages: one page fault per 4 KiB, e.g. 116k per DTF-ResNet-50 step (~20% of its time) and 275k per
DTF-Swin-S step on a 2-core CPU, where PyTorch, which keeps its freed heap, takes 0-27k.

``reuse_step_memory`` removes that cost on the CPU backend:

* ``jax_cpu_enable_async_dispatch = False``: executables run on the calling (main) thread, so the
  buffer comes from glibc's main arena;
* ``mallopt(M_MMAP_MAX, 0)``: the main arena serves large requests from its heap instead of ``mmap``;
* ``mallopt(M_TRIM_THRESHOLD, -1)``: freed heap memory is not handed back to the kernel, so the next
  step's buffer reuses the same, already mapped pages.

Measured (``benchmarks/README.md``, page faults): zero page faults per step, DTF-R50 step 619-667 ->
507-600 ms, DTF-Swin-S 1996 -> 1608 ms, resident set within +2% and flat over the run. The cost:
memory the main thread frees stays with the process (as PyTorch's does), and ``jax`` calls on the
CPU backend return when their result is ready rather than right away. ``train.py`` and ``eval.py``
call this after ``jax.distributed`` has started; ``DTF_JAX_REUSE_STEP_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

import jax

ENV_SWITCH = "DTF_JAX_REUSE_STEP_MEMORY"
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def _glibc():
  """``libc.so.6`` if this is a glibc Linux process (``gnu_get_libc_version`` exists), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (musl has no such symbol)
  except (OSError, AttributeError):
    return None
  return libc


def reuse_step_memory(environ=None) -> bool:
  """Makes repeated CPU executions reuse their memory; returns whether it was applied.

  Applies only when jax's default backend is the CPU, the process uses glibc, and
  ``DTF_JAX_REUSE_STEP_MEMORY`` is not ``0``. Process-wide and not undone; call it once at start-up,
  after ``jax.distributed.initialize`` and before any other jax computation (the dispatch setting is
  read when jax creates its CPU client, which this call does to learn the default backend).
  """
  environ = os.environ if environ is None else environ
  if environ.get(ENV_SWITCH, "1").strip() == "0":
    return False
  libc = _glibc()
  if libc is None:
    return False
  # Read when the CPU client is created, so before jax.default_backend() creates it; it changes
  # nothing but CPU-backend executions.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if jax.default_backend() != "cpu":
    return False
  return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
