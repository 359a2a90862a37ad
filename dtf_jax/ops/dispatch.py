"""Implementation selection for the public ops: the seam where the Pallas kernels plug in.

Each public op (``dtf_jax.ops.api``) validates its arguments and then calls the function of the same
name here with the validated arrays (positional) and its static knobs (keywords) plus ``impl``.
Every such function does one thing: ``_select(op_name, impl, xla_fn)(*arrays, **knobs)``.

``_select`` is the only place that decides between implementations, and ``_pallas_implementation``
the only place that looks a Pallas kernel up (in the top-level ``kernels`` package, which never
imports ``dtf_jax``). Behaviour:
  * ``'xla'``: the pure-jnp reference in ``dtf_jax.ops.reference`` (for ``frame_wise_aggregation``
    and ``temporal_correlation_aggregation`` their unrolled twins with hand-written backwards,
    ``dtf_jax.ops.frame_wise``: same values);
  * ``'pallas'``: the Pallas kernels (``temporal_correlation_aggregation``: the correlation and
    aggregation kernels in sequence): compiled (Triton) when lowered for ``cuda``, Pallas interpret
    mode on any other platform (slow; for tests and debugging);
  * ``'auto'``: the compiled Pallas kernels when lowered for ``cuda``, the XLA reference elsewhere.

The choice is made by the *lowering* platform with ``jax.lax.platform_dependent`` (not by
``jax.default_backend()``), so one jitted function lowers to the compiled kernel for ``cuda`` and to
the other branch for CPU, including ahead-of-time lowering for a platform other than the local one.
Kernel functions take the same positional arrays and keyword knobs as the reference function they
replace, plus ``interpret``, and return the same shapes and dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from dtf_jax.ops import frame_wise
from dtf_jax.ops import reference

Array = jax.Array


def _pallas_implementation(op_name: str) -> Callable[..., object]:
  """Returns the Pallas kernel function of ``op_name``; the one place kernels are looked up."""
  # Imported lazily: the kernels pull in Pallas, which the XLA path never needs.
  from kernels import dtf_local  # pylint: disable=g-import-not-at-top
  from kernels import sifa_deformable  # pylint: disable=g-import-not-at-top
  return {
      'temporal_correlation': dtf_local.temporal_correlation,
      'temporal_aggregation': dtf_local.temporal_aggregation,
      'frame_wise_aggregation': dtf_local.frame_wise_aggregation,
      'temporal_correlation_aggregation': functools.partial(
          _correlation_then_aggregation, dtf_local.temporal_correlation,
          dtf_local.temporal_aggregation),
      'deformable_correlation': sifa_deformable.deformable_correlation,
      'deformable_aggregation': sifa_deformable.deformable_aggregation,
  }[op_name]


def _correlation_then_aggregation(correlation, aggregation, x, weight, *, kernel_size, dilation,
                                  interpret):
  """The two kernels in sequence (``rho`` in ``x.dtype`` between them; no fused kernel)."""
  rho = correlation(x, weight, kernel_size=kernel_size, dilation=dilation, groups=1,
                    interpret=interpret)
  return aggregation(x, rho, kernel_size=kernel_size, dilation=dilation, interpret=interpret)


def _by_lowering_platform(cuda_fn: Callable[..., object],
                          default_fn: Callable[..., object]) -> Callable[..., object]:
  """``cuda_fn`` when lowered for CUDA, ``default_fn`` otherwise (same arrays and knobs)."""
  def run(*arrays, **knobs):
    return jax.lax.platform_dependent(*arrays, cuda=functools.partial(cuda_fn, **knobs),
                                      default=functools.partial(default_fn, **knobs))
  return run


def _select(op_name: str, impl: str, xla_fn: Callable[..., object]) -> Callable[..., object]:
  """Returns the function that runs ``op_name`` for a validated ``impl``.

  The returned callable takes the op's arrays positionally and its static knobs as keywords.
  """
  if impl == 'xla':
    return xla_fn
  if impl in ('auto', 'pallas'):
    kernel = _pallas_implementation(op_name)
    compiled = functools.partial(kernel, interpret=False)
    fallback = xla_fn if impl == 'auto' else functools.partial(kernel, interpret=True)
    return _by_lowering_platform(compiled, fallback)
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


def temporal_correlation_aggregation(x: Array, weight: Array, *, kernel_size: int, dilation: int,
                                     impl: str) -> Array:
  fn = _select('temporal_correlation_aggregation', impl,
               frame_wise.temporal_correlation_aggregation)
  return fn(x, weight, kernel_size=kernel_size, dilation=dilation)


def frame_wise_aggregation(x: Array, weight: Array, *, kernel_size: int, dilation: int,
                           impl: str) -> tuple[Array, Array]:
  fn = _select('frame_wise_aggregation', impl, frame_wise.frame_wise_aggregation)
  return fn(x, weight, kernel_size=kernel_size, dilation=dilation)
