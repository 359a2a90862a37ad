"""Implementation selection for the public ops: the seam where the Pallas kernels plug in.

Each public op (``dtf_jax.ops.api``) validates its arguments and then calls the function of the same
name here with the validated arrays (positional) and its static knobs (keywords) plus ``impl``.
Every such function does one thing: ``_select(op_name, impl, xla_fn)(*arrays, **knobs)``.

``_select`` is the only place that decides between implementations, and ``_pallas_implementation``
the only place that looks a Pallas kernel up (in the top-level ``kernels`` package, which never
imports ``dtf_jax``). Current behaviour:
  * ``'xla'``: the pure-jnp reference in ``dtf_jax.ops.reference``;
  * ``'auto'``: the same as ``'xla'`` (until kernels are wired in);
  * ``'pallas'``: ``NotImplementedError``.

Intended wiring (kernels helper): for ``'pallas'``, ``jax.lax.platform_dependent(*arrays,
cuda=<compiled kernel>, default=<interpret-mode kernel>)``; for ``'auto'``,
``jax.lax.platform_dependent(*arrays, cuda=<compiled kernel>, default=<xla_fn>)`` (bind the knobs with
``functools.partial``). Kernel functions must take the same positional arrays and keyword knobs as
the reference function they replace and return the same shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from dtf_jax.ops import reference

Array = jax.Array


def _pallas_implementation(op_name: str) -> Callable[..., object]:
  """Returns the Pallas implementation of ``op_name``; the one place kernels are looked up."""
  raise NotImplementedError(
      f"{op_name}: impl='pallas' is not available yet (no Pallas kernel is wired into "
      f"dtf_jax.ops.dispatch); use impl='xla' or impl='auto'.")


def _select(op_name: str, impl: str, xla_fn: Callable[..., object]) -> Callable[..., object]:
  """Returns the function that runs ``op_name`` for a validated ``impl``.

  The returned callable takes the op's arrays positionally and its static knobs as keywords.
  """
  if impl in ('auto', 'xla'):
    return xla_fn
  if impl == 'pallas':
    return _pallas_implementation(op_name)
  raise ValueError(f"{op_name}: unknown impl={impl!r}.")  # Unreachable after validation.


def temporal_correlation(x: Array, weight: Array, *, kernel_size: int, dilation: int,
                         groups: int, impl: str) -> Array:
  fn = _select('temporal_correlation', impl, reference.temporal_correlation)
  return fn(x, weight, kernel_size=kernel_size, dilation=dilation, groups=groups)


def temporal_aggregation(x: Array, attn: Array, *, kernel_size: int, dilation: int,
                         impl: str) -> Array:
  fn = _select('temporal_aggregation', impl, reference.temporal_aggregation)
  return fn(x, attn, kernel_size=kernel_size, dilation=dilation)


def deformable_correlation(x: Array, offsets: Array, weight: Array, *, kernel_size: int,
                           dilation: int, groups: int, impl: str) -> Array:
  fn = _select('deformable_correlation', impl, reference.deformable_correlation)
  return fn(x, offsets, weight, kernel_size=kernel_size, dilation=dilation, groups=groups)


def deformable_aggregation(x: Array, offsets: Array, attn: Array, *, kernel_size: int,
                           dilation: int, groups: int, impl: str) -> Array:
  fn = _select('deformable_aggregation', impl, reference.deformable_aggregation)
  return fn(x, offsets, attn, kernel_size=kernel_size, dilation=dilation, groups=groups)


def frame_wise_aggregation(x: Array, weight: Array, *, kernel_size: int, dilation: int,
                           impl: str) -> tuple[Array, Array]:
  fn = _select('frame_wise_aggregation', impl, reference.frame_wise_aggregation)
  return fn(x, weight, kernel_size=kernel_size, dilation=dilation)
