"""The converter's output: an orbax model-state directory plus a small JSON describing the model.

Layout of ``DIR`` (the ``--output`` of ``python -m dtf_jax.convert``):

* the orbax checkpoint of the model's ``nnx.State`` written by
  ``dtf_jax.model_state.save_model_state`` (parameters, frozen parameters, BatchNorm
  statistics as a pure nested dict; no RNG streams), so ``DIR`` is what ``train.py`` takes as
  ``config.init_from`` and ``eval.py`` as its checkpoint;
* ``DIR/dtf_jax_model.json``: ``{"format", "model", "num_classes", "clip_length", "image_size",
  "model_overrides", "converted_from"}`` -- everything needed to rebuild the network
  (``create_model(model, num_classes=..., clip_length=..., image_size=..., **model_overrides)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from dtf_jax import model_state
from dtf_jax.convert.mapping import assemble_model, checkpointed_state
from dtf_jax.models import create_model

META_FILE = "dtf_jax_model.json"
FORMAT = "dtf_jax.model_state/1"


def model_meta(name: str, *, num_classes: int, clip_length: int, image_size: int,
               model_overrides: Mapping[str, Any] | None = None,
               converted_from: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The JSON record of a saved model (constructor arguments must be JSON values)."""
  meta = {
      "format": FORMAT,
      "model": name,
      "num_classes": int(num_classes),
      "clip_length": int(clip_length),
      "image_size": int(image_size),
      "model_overrides": dict(model_overrides or {}),
      "converted_from": dict(converted_from or {}),
  }
  try:
    json.dumps(meta)
  except TypeError as e:
    raise ValueError(f"model_overrides must be JSON values (numbers, strings, lists), got "
                     f"{meta['model_overrides']!r}: {e}") from e
  return meta


def save_model(directory: str | os.PathLike, model: nnx.Module, meta: Mapping[str, Any]) -> None:
  """Writes ``model``'s checkpointed state to the new directory ``directory`` plus the JSON record."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise ValueError(f"output directory {directory!r} already exists; choose a new path")
  model_state.save_model_state(directory, checkpointed_state(model))
  with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
    json.dump(dict(meta), f, indent=2, sort_keys=True)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The JSON record of a directory written by :func:`save_model`."""
  path = os.path.join(os.fspath(directory), META_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{os.fspath(directory)!r} has no {META_FILE}: not a directory written by "
                     "python -m dtf_jax.convert (or dtf_jax.convert.save_model)")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def load_model(directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None
               ) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds the network recorded in ``directory`` and restores its state.

  Returns:
    ``(model, meta)``. ``rngs`` seeds the model's RNG streams (dropout / drop-path), default 0.
  """
  meta = read_meta(directory)
  rngs = rngs if rngs is not None else nnx.Rngs(0)

  def build(r):
    return create_model(meta["model"], num_classes=meta["num_classes"],
                        clip_length=meta["clip_length"], image_size=meta["image_size"], rngs=r,
                        **meta["model_overrides"])

  abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  state = model_state.load_model_state(os.path.abspath(os.fspath(directory)),
                                            checkpointed_state(abstract))
  model = assemble_model(abstract, state, rngs)
  if model is None:  # state beyond tensors and RNG streams: initialise, then overwrite
    model = build(rngs)
    nnx.update(model, state)
  return model, meta
