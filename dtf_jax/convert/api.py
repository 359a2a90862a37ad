"""Python API of the converter: PyTorch checkpoints -> Flax models, and Flax models -> PyTorch.

* :func:`from_pytorch`: a registered network with a PyTorch checkpoint's weights loaded, from the
  originals' own checkpoints (``source='original'``) or from 2-D ImageNet weights inflated as the
  originals' ``transfer_weights`` do (``source='imagenet'``).
* :func:`load_into`: the same into an existing model; :func:`convert_state_dict`: the same without
  building the real model (returns the converted ``nnx.State``).
* :func:`to_pytorch` / :func:`export_pytorch`: the model's state as a state_dict with the originals'
  key names and layouts (loads into the original PyTorch networks with ``strict=True``).

Strictness: unknown, missing or shape-mismatched keys raise ONE :class:`ConversionError` listing
them all. Only keys dropped by an explicit rule (``remove_fc``, ``remove_defcor_weight``,
``convert_fft_weight``), the classifier with ``allow_missing_head``, and (for ImageNet sources) the
keys SPEC.md 5.3 expects to be unmatched may be absent; those keep the model's own initialisation
and are reported.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from dtf_jax.convert import imagenet, keymap, rules
from dtf_jax.convert.loading import StateDict, read_state_dict, write_state_dict
from dtf_jax.convert.mapping import (ConversionError, ConversionReport, assemble_model, flax_to_torch,
                                     leaf_specs, torch_to_flax)
from dtf_jax.models import create_model, list_models

SOURCES = ("original", "imagenet")
EARLY_STRIDE = 4  # the originals' transfer_weights is always called with the default 4

SWIN_GPU_LAYOUT_WARNING = (
    "this DTF/SIFA-Swin checkpoint was trained with the original GPU ops, which read the blocks' "
    "permuted inputs as if they were contiguous (SPEC.md 2.7): the original network computed its "
    "correlation/aggregation on a memory-scrambled tensor. dtf_jax implements the logical "
    "(intended) semantics, so these weights will not reproduce the original logits exactly; "
    "fine-tune or re-evaluate before relying on them.")

Checkpoint = str | os.PathLike | Mapping[str, Any]


def model_variant(name: str) -> str:
  """``'c2d'``, ``'dtf'`` or ``'sifa'`` for a registered model name."""
  if name not in list_models():
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
  if "_dtf_" in name:
    return "dtf"
  if "_sifa_" in name:
    return "sifa"
  return "c2d"


def prepare_state_dict(
    name: str,
    state_dict: Mapping[str, np.ndarray],
    *,
    source: str = "original",
    remove_fc: bool = False,
    remove_defcor_weight: bool = False,
    convert_fft_weight: bool = False,
) -> tuple[StateDict, dict[str, str]]:
  """Applies the originals' pre-load rules in their order (SPEC.md 5.2-5.3).

  ``source='imagenet'`` first inflates the 2-D weights (``transfer_weights``) and, for ResNets,
  always drops ``fc.*`` (the originals' ImageNet configs set ``remove_fc``). Then ``remove_fc``,
  ``remove_defcor_weight`` and ``convert_fft_weight`` as requested.

  Returns:
    ``(state_dict, dropped)`` with ``dropped = {key: rule name}``.
  """
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  variant = model_variant(name)
  table = keymap.table_for(name)
  sd = dict(state_dict)
  dropped: dict[str, str] = {}
  if source == "imagenet":
    if table.family == "resnet":
      sd = imagenet.inflate_resnet(sd, early_stride=EARLY_STRIDE, dual_branch=variant == "sifa")
      remove_fc = True
    else:
      sd = imagenet.inflate_swin(sd, early_stride=EARLY_STRIDE, add_temporal_conv=variant != "c2d")
  if remove_fc:
    sd, gone = rules.remove_fc(name, sd)
    dropped.update({k: "remove_fc" for k in gone})
  if remove_defcor_weight:
    sd, gone = rules.remove_defcor_weight(name, sd)
    dropped.update({k: "remove_defcor_weight" for k in gone})
  if convert_fft_weight:
    sd, gone = rules.convert_fft_weight(sd)
    dropped.update({k: "convert_fft_weight" for k in gone})
  return sd, dropped


def load_into(
    model: nnx.Module,
    name: str,
    checkpoint: Checkpoint,
    *,
    source: str = "original",
    remove_fc: bool = False,
    remove_defcor_weight: bool = False,
    convert_fft_weight: bool = False,
    allow_missing_head: bool = False,
) -> ConversionReport:
  """Loads a PyTorch checkpoint into ``model`` (built as ``create_model(name, ...)``) in place.

  Args:
    model: the target network.
    name: its registered name (selects the key table and the rules).
    checkpoint: a file path (``.pth``/``.pt`` read with ``torch.load(weights_only=True)``, or
      ``.safetensors``) or an in-memory state_dict (torch tensors or numpy arrays), bare or wrapped
      under ``'model'`` / ``'state_dict'``, with or without DDP's ``'module.'`` prefix.
    source: ``'original'`` (the originals' video checkpoints, or ours exported back) or
      ``'imagenet'`` (torchvision ResNet / official Swin 2-D checkpoints, inflated).
    remove_fc, remove_defcor_weight, convert_fft_weight: the originals' key-dropping rules.
    allow_missing_head: the classifier (``fc.*``, ``fc_dual.*``) may be absent from the checkpoint.

  Returns:
    The :class:`ConversionReport`.
  """
  raw = read_state_dict(checkpoint)
  state, report = _convert(model, name, raw, source=source, remove_fc=remove_fc,
                           remove_defcor_weight=remove_defcor_weight,
                           convert_fft_weight=convert_fft_weight,
                           allow_missing_head=allow_missing_head)
  nnx.update(model, state)
  return report


def _convert(model, name, raw, *, source, remove_fc, remove_defcor_weight, convert_fft_weight,
             allow_missing_head) -> tuple[nnx.State, ConversionReport]:
  table = keymap.table_for(name)
  report = ConversionReport(model=name, source=source)
  sd, dropped = prepare_state_dict(name, raw, source=source, remove_fc=remove_fc,
                                   remove_defcor_weight=remove_defcor_weight,
                                   convert_fft_weight=convert_fft_weight)
  report.dropped_by_rule = dropped
  missing_ok = set(dropped)
  missing_patterns: tuple[str, ...] = ()
  ignored_patterns: tuple[str, ...] = ()
  if allow_missing_head:
    missing_patterns += (r"^fc\.", r"^fc_dual\.")
  if source == "imagenet":
    missing_patterns += table.imagenet_missing
    ignored_patterns += table.imagenet_ignored
  state = torch_to_flax(
      sd, model, table, model_name=name, report=report,
      may_be_missing=lambda k: k in missing_ok or keymap.matches_any(k, missing_patterns),
      may_be_ignored=lambda k: keymap.matches_any(k, ignored_patterns),
      hints=lambda err: _hints(err, name, source, sd))
  if source == "original" and table.family == "swin" and model_variant(name) != "c2d":
    report.warnings.append(SWIN_GPU_LAYOUT_WARNING)
    warnings.warn(SWIN_GPU_LAYOUT_WARNING, UserWarning, stacklevel=3)
  return state, report


def _hints(error: ConversionError, name: str, source: str, sd: Mapping[str, np.ndarray]) -> list[str]:
  hints = []
  mismatched = [m.split(":")[0] for m in error.mismatched]
  if any(re.match(r"^fc(_dual)?\.", k) for k in mismatched):
    n = sd["fc.weight"].shape[0] if "fc.weight" in sd else "?"
    hints.append(f"the classifier differs: the checkpoint has {n} classes; pass num_classes={n} "
                 "(--num-classes), or remove_fc=True (--remove-fc) to keep the model's own head")
  if any(("def_cor" in k or "weights_cor" in k or "filter_g" in k) for k in mismatched):
    hints.append("correlation weights and DTF filter_g depend on the clip length: pass the "
                 "checkpoint's clip_length (--clip-length), or drop def_cor/weights_cor with "
                 "remove_defcor_weight / convert_fft_weight (filter_g cannot be converted)")
  if source == "original" and any(sd.get(k) is not None and np.ndim(sd[k]) == 4 and
                                  k in ("conv1.weight", "patch_embed.proj.weight") for k in mismatched):
    hints.append("the stem kernel is 2-D: this is an ImageNet checkpoint, use source='imagenet'")
  if len(error.unexpected) + len(error.missing) > 8:
    guess = _guess_architecture(sd)
    hints.append(f"many keys differ: this looks like a checkpoint of {guess}, not of {name!r}")
  return hints


def _guess_architecture(sd: Mapping[str, np.ndarray]) -> str:
  keys = " ".join(sd)
  if "patch_embed" in keys:
    kind = "DTF-Swin" if "dtf_block" in keys else "SIFA-Swin" if "tda_norm" in keys else "a plain Swin"
  elif "layer1." in keys:
    kind = ("DTF-ResNet" if "dtf_blk" in keys else
            "SIFA-ResNet" if "conv_offset" in keys or "layer4_dual" in keys else "a plain (C2D) ResNet")
  else:
    kind = "an unknown architecture"
  return kind


def _make_model(name, *, num_classes, clip_length, image_size, rngs, model_overrides):
  return create_model(name, num_classes=num_classes, clip_length=clip_length,
                      image_size=image_size, rngs=rngs, **model_overrides)


def convert_state_dict(
    name: str,
    checkpoint: Checkpoint,
    *,
    source: str = "original",
    num_classes: int,
    clip_length: int = 16,
    image_size: int = 224,
    remove_fc: bool = False,
    remove_defcor_weight: bool = False,
    convert_fft_weight: bool = False,
    allow_missing_head: bool = False,
    **model_overrides,
) -> tuple[nnx.State, ConversionReport]:
  """Converts without building the network: the model's tree comes from ``nnx.eval_shape``.

  Returns ``(state, report)``; ``state`` holds numpy arrays for the converted leaves (parameters,
  frozen parameters, batch stats), ready for ``nnx.update`` or saving.
  """
  abstract = nnx.eval_shape(lambda: _make_model(
      name, num_classes=num_classes, clip_length=clip_length, image_size=image_size,
      rngs=nnx.Rngs(0), model_overrides=model_overrides))
  raw = read_state_dict(checkpoint)
  return _convert(abstract, name, raw, source=source, remove_fc=remove_fc,
                  remove_defcor_weight=remove_defcor_weight, convert_fft_weight=convert_fft_weight,
                  allow_missing_head=allow_missing_head)


def from_pytorch(
    name: str,
    checkpoint: Checkpoint,
    *,
    source: str = "original",
    num_classes: int,
    clip_length: int = 16,
    image_size: int = 224,
    rngs: nnx.Rngs | None = None,
    remove_fc: bool = False,
    remove_defcor_weight: bool = False,
    convert_fft_weight: bool = False,
    allow_missing_head: bool = False,
    return_report: bool = False,
    **model_overrides,
):
  """Builds ``create_model(name, ...)`` with a PyTorch checkpoint's weights (see :func:`load_into`).

  The conversion runs on the abstract model (``nnx.eval_shape``). When the checkpoint provides every
  parameter, frozen parameter and BatchNorm statistic, the network is assembled from them directly
  (no random initialisation is computed) and its RNG streams (dropout / drop-path) are seeded from
  ``rngs``; otherwise the network is initialised with ``rngs`` and the converted tensors replace
  the initial ones (so every tensor the checkpoint lacks keeps its own initialisation).

  Args:
    name: registered model name, e.g. ``'c2d_dtf_resnet50'``.
    checkpoint: path or in-memory state_dict.
    source: ``'original'`` or ``'imagenet'``.
    num_classes, clip_length, image_size, **model_overrides: passed to ``create_model``.
    rngs: initialisation / RNG streams (default ``nnx.Rngs(0)``).
    remove_fc, remove_defcor_weight, convert_fft_weight, allow_missing_head: see :func:`load_into`.
    return_report: also return the :class:`ConversionReport`.

  Returns:
    The model (``nnx.Module``), or ``(model, report)`` with ``return_report``.
  """
  rngs = rngs if rngs is not None else nnx.Rngs(0)

  def build(r):
    return _make_model(name, num_classes=num_classes, clip_length=clip_length,
                       image_size=image_size, rngs=r, model_overrides=model_overrides)

  abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  raw = read_state_dict(checkpoint)
  state, report = _convert(abstract, name, raw, source=source, remove_fc=remove_fc,
                           remove_defcor_weight=remove_defcor_weight,
                           convert_fft_weight=convert_fft_weight,
                           allow_missing_head=allow_missing_head)
  model = assemble_model(abstract, state, rngs) if not report.missing else None
  if model is None:
    model = build(rngs)
    nnx.update(model, state)
  return (model, report) if return_report else model


def to_pytorch(model: nnx.Module, name: str) -> dict[str, np.ndarray]:
  """The model's state as a PyTorch state_dict ``{key: numpy array}`` in the originals' layout.

  Includes BatchNorm running statistics (``num_batches_tracked`` int64), the frozen correlation
  weights, and Swin's constant ``relative_position_index`` / ``attn_mask`` buffers.
  """
  model_variant(name)  # validates the name
  return flax_to_torch(model, keymap.table_for(name))


def torch_shapes(model: nnx.Module, name: str) -> dict[str, tuple[int, ...]]:
  """The PyTorch state_dict keys and shapes of ``model`` (real or ``nnx.eval_shape`` abstract).

  The keys are exactly those of the original network's ``state_dict()`` (SPEC.md 5.1), including
  the constant buffers.
  """
  model_variant(name)
  table = keymap.table_for(name)
  shapes = {spec.torch_key: spec.torch_shape for spec in leaf_specs(model, table)}
  if table.constants:
    shapes.update({k: tuple(v.shape) for k, v in table.constants(model).items()})
  return shapes


def export_pytorch(model: nnx.Module, name: str, path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Writes :func:`to_pytorch` to ``path`` (``.safetensors`` or ``.pth``) and returns it."""
  state_dict = to_pytorch(model, name)
  write_state_dict(path, state_dict)
  return state_dict
