"""Model registry: the originals' network names -> builder functions.

Builders are registered with ``@register('c2d_dtf_resnet50')`` and called by ``create_model``.
Every builder has the signature ``builder(*, num_classes, clip_length, image_size, rngs, **overrides)``
and returns an ``nnx.Module`` mapping a video ``(N, L, H, W, 3)`` to logits ``(N, num_classes)``
(SIFA-ResNet: a tuple ``(main, dual)``).
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
  """Decorator registering a model builder under ``name`` (the original code's name)."""

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn

  return wrap


def list_models() -> list[str]:
  """Sorted names of every registered network."""
  _import_families()
  return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    num_classes: int,
    clip_length: int = 16,
    image_size: int = 224,
    rngs: nnx.Rngs,
    **overrides,
) -> nnx.Module:
  """Builds the registered network ``name``.

  Args:
    name: one of ``list_models()`` (the originals' names, e.g. ``c2d_dtf_resnet50``).
    num_classes: classifier outputs.
    clip_length: frames L of the input clip ``(N, L, H, W, 3)``.
    image_size: spatial size of the (square) input.
    rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training) streams.
    **overrides: family-specific options (depths, widths, dtype, remat, kernel_impl, ...).
  """
  _import_families()
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name](
      num_classes=num_classes, clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)


def _import_families():
  # Importing the family modules runs their @register decorators.
  import importlib
  for mod in ("dtf_jax.models.resnet", "dtf_jax.models.swin"):
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:  # a family not written yet
      if e.name != mod:
        raise
