"""Transparent huge pages for XLA:CPU's per-step buffers (Linux, glibc >= 2.35).

XLA:CPU allocates a step's temporary buffer (hundreds of MiB for a training step) with ``malloc``
on its worker threads and frees it when the step ends. glibc serves such a request with a fresh
``mmap`` and returns it with ``munmap``, so every step faults the whole buffer in again, 4 KiB at a
time: ~116k page faults per DTF-ResNet50 training step on the 2-core benchmark machine, where they
took ~15% of the step (``benchmarks/README.md``). On kernels whose transparent-huge-page mode is
``madvise`` (the default of many distributions) the glibc tunable ``glibc.malloc.hugetlb=1`` makes
``malloc`` advise huge pages for those mappings: one fault per 2 MiB. Measured, DTF-ResNet50
training step, two process pairs: 630 / 623 ms -> 532 / 509 ms, page faults per step 116k -> 650,
the same peak resident set.

glibc reads tunables only when a process starts, so ``relaunch_with_huge_pages`` re-executes the
running program (same interpreter, arguments and process id) with the tunable added to
``GLIBC_TUNABLES``. ``train.py`` and ``eval.py`` call it first thing; it does nothing when

* ``DTF_JAX_HUGE_PAGES=0`` is in the environment (the switch),
* ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` (any value: the user's choice, and what
  stops a second relaunch),
* the C library is not glibc >= 2.35 (older glibc ignores the tunable), or
* the kernel's mode (``/sys/kernel/mm/transparent_hugepage/enabled``) is not ``madvise``: with
  ``always`` every large mapping already gets huge pages, with ``never`` none can.

The same command line with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` set by hand is equivalent.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

ENV_SWITCH = "DTF_JAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
TUNABLE_VALUE = "1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``), or None."""
  try:
    with open(path) as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def glibc_version() -> tuple[int, int] | None:
  """``(major, minor)`` of the running glibc, or None for another C library."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. 'glibc 2.36'
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  match = re.match(r"(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else None


def huge_page_environment(environ: Mapping[str, str], *, mode: str | None,
                          glibc: tuple[int, int] | None) -> dict[str, str] | None:
  """The environment to relaunch with, or None when the process should run as it is.

  Args:
    environ: the current environment.
    mode: the kernel's THP mode (``thp_mode()``).
    glibc: the glibc version (``glibc_version()``).
  """
  if environ.get(ENV_SWITCH, "1").strip() == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":")):
    return None
  if glibc is None or glibc < MIN_GLIBC or mode != "madvise":
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}={TUNABLE_VALUE}"]))
  return env


def relaunch_with_huge_pages(argv: Sequence[str] | None = None) -> None:
  """Re-executes this program with ``glibc.malloc.hugetlb=1`` where that helps; else returns.

  Call it before the program starts threads or opens resources it must not lose (the process
  image is replaced; the process id, open files and the working directory stay). ``argv``:
  the interpreter's full command line (default ``sys.orig_argv``).
  """
  env = huge_page_environment(os.environ, mode=thp_mode(), glibc=glibc_version())
  if env is None:
    return
  argv = list(sys.orig_argv if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)
