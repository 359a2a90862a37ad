"""Argument checks shared by every implementation of the public ops.

Every public op validates its arguments here, once, before an implementation is chosen, so the XLA
reference path and the Pallas kernels see the same, already-checked shapes and knobs. All checks are
on static information (shapes, dtypes, Python ints), so they run at trace time under ``jax.jit`` and
see per-example shapes under ``jax.vmap``.

Every failure is a ``ValueError`` whose message starts with the op name, names the offending
argument, states the shape or value it got and what was expected.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

IMPLS = ('auto', 'xla', 'pallas')

X_LAYOUT = ('N', 'T', 'H', 'W', 'C')


def check_impl(op: str, impl) -> str:
  """Returns ``impl`` if it is one of ``'auto'``, ``'xla'``, ``'pallas'``; raises otherwise."""
  if not isinstance(impl, str) or impl not in IMPLS:
    raise ValueError(
        f"{op}: impl={impl!r} is not a known implementation; expected one of "
        f"{', '.join(repr(i) for i in IMPLS)}.")
  return impl


def _check_int(op: str, name: str, value, minimum: int) -> int:
  """Returns ``value`` as a Python int if it is an integer >= ``minimum``; raises otherwise."""
  if isinstance(value, bool):
    raise ValueError(f"{op}: {name}={value!r} must be an integer >= {minimum}, not a bool.")
  try:
    as_int = operator.index(value)
  except TypeError:
    raise ValueError(
        f"{op}: {name}={value!r} (type {type(value).__name__}) must be a Python integer "
        f">= {minimum}.") from None
  if as_int < minimum:
    raise ValueError(f"{op}: {name}={as_int} must be an integer >= {minimum}.")
  return as_int


def check_kernel_size(op: str, kernel_size) -> int:
  """Returns the kernel size K as an int; it must be a positive odd integer (same padding)."""
  k = _check_int(op, 'kernel_size', kernel_size, 1)
  if k % 2 != 1:
    raise ValueError(
        f"{op}: kernel_size={k} must be odd (1, 3, 5, ...): only odd kernels have a symmetric "
        f"'same' padding p = (d*(K-1)+1)//2.")
  return k


def check_dilation(op: str, dilation) -> int:
  """Returns the dilation as an int; it must be an integer >= 1."""
  return _check_int(op, 'dilation', dilation, 1)


def check_groups(op: str, groups) -> int:
  """Returns the number of groups as an int; it must be an integer >= 1."""
  return _check_int(op, 'groups', groups, 1)


def _check_floating(op: str, name: str, arr) -> None:
  dtype = jnp.result_type(arr)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{op}: `{name}` has dtype {dtype}; expected a floating-point array (float32, bfloat16, "
        f"float16 or float64).")


def check_x(op: str, x) -> tuple[int, int, int, int, int]:
  """Checks the feature map ``x`` (N, T, H, W, C) and returns its shape."""
  shape = tuple(np.shape(x))
  if len(shape) != 5:
    raise ValueError(
        f"{op}: `x` must have rank 5 with layout (N, T, H, W, C) (channels-last), got shape "
        f"{shape} (rank {len(shape)}).")
  if any(s == 0 for s in shape):
    raise ValueError(f"{op}: `x` has shape {shape} with an empty dimension; expected every "
                     f"dimension of (N, T, H, W, C) to be >= 1.")
  _check_floating(op, 'x', x)
  return shape  # type: ignore[return-value]


def check_channels_divisible(op: str, x_shape: Sequence[int], groups: int) -> None:
  """Checks that the channel count C of ``x`` is divisible by ``groups``."""
  c = x_shape[-1]
  if c % groups != 0:
    raise ValueError(
        f"{op}: `x` has shape {tuple(x_shape)} with C={c} channels, which is not divisible by "
        f"groups={groups}; expected C % groups == 0 (each group sums over C/groups channels).")


def check_shape(op: str, name: str, arr, layout: Sequence[str], expected: Sequence[int],
                context: str) -> None:
  """Checks that ``arr`` has exactly the shape ``expected``.

  Args:
    op: op name, first word of the message.
    name: argument name.
    arr: the array (anything with a shape).
    layout: a name per dimension, e.g. ``('T', 'K', 'K', 'C')``.
    expected: the expected shape.
    context: where the expectation comes from, e.g. ``"from x of shape (...) and kernel_size=3"``.
  """
  shape = tuple(np.shape(arr))
  expected = tuple(expected)
  layout_str = '(' + ', '.join(layout) + ')'
  if len(shape) != len(expected):
    raise ValueError(
        f"{op}: `{name}` must have rank {len(expected)} with layout {layout_str}, got shape "
        f"{shape} (rank {len(shape)}); expected {expected} {context}.")
  bad = [f"{dim}={got} (expected {want})"
         for dim, got, want in zip(layout, shape, expected) if got != want]
  if bad:
    raise ValueError(
        f"{op}: `{name}` has shape {shape}, expected {layout_str} = {expected} {context}; "
        f"mismatch in {', '.join(bad)}.")
  _check_floating(op, name, arr)


def _context(x_shape, kernel_size: int, groups: int | None = None) -> str:
  text = f"from x of shape {tuple(x_shape)} and kernel_size={kernel_size}"
  if groups is not None:
    text += f", groups={groups}"
  return text


def check_correlation_weight(op: str, weight, x_shape, kernel_size: int) -> None:
  """Checks the correlation weight: ``(T, K, K, C)`` (channels-last form of ``(C, T, K, K)``)."""
  _, t, _, _, c = x_shape
  check_shape(op, 'weight', weight, ('T', 'K', 'K', 'C'), (t, kernel_size, kernel_size, c),
              _context(x_shape, kernel_size))


def check_offsets(op: str, offsets, x_shape, kernel_size: int) -> None:
  """Checks deformable offsets: ``(N, T, H, W, K*K, 2)``, last axis ``(dy, dx)``."""
  n, t, h, w, _ = x_shape
  check_shape(op, 'offsets', offsets, ('N', 'T', 'H', 'W', 'K*K', '2'),
              (n, t, h, w, kernel_size * kernel_size, 2), _context(x_shape, kernel_size))


def check_attention(op: str, attn, x_shape, kernel_size: int, groups: int) -> None:
  """Checks aggregation weights: ``(N, T, H, W, groups*K*K)``, last axis ``g*K*K + k``."""
  n, t, h, w, _ = x_shape
  taps = kernel_size * kernel_size
  if groups == 1:
    layout = ('N', 'T', 'H', 'W', 'K*K')
    context = _context(x_shape, kernel_size)
  else:
    layout = ('N', 'T', 'H', 'W', 'groups*K*K')
    context = _context(x_shape, kernel_size, groups)
  check_shape(op, 'attn', attn, layout, (n, t, h, w, groups * taps), context)
