"""Inflation of 2-D ImageNet checkpoints to the video networks (the originals' ``transfer_weights``).

Works on raw PyTorch-layout state_dicts ``{key: numpy array}`` (SPEC.md 5.3, 5.4); the result is then
loaded like any PyTorch-layout checkpoint, with the expected unmatched keys reported.

* ResNet (torchvision layout, C2D / DTF / SIFA): every 4-D kernel whose key contains ``'conv'`` or
  ``'downsample.0'`` gets a temporal axis of size 1, ``(O, I, kh, kw) -> (O, I, 1, kh, kw)``; the stem
  ``conv1.weight`` is zero-padded in time to ``early_stride`` slices with the 2-D kernel at index
  ``early_stride // 2`` (unscaled). SIFA additionally copies every ``layer4.*`` tensor to
  ``layer4_dual.*`` so the dual branch starts from ImageNet layer4.
* Swin (official ``*_patch4_window7_224`` layout): the patch-embedding kernel ``(D, 3, 4, 4)`` is
  inflated the same way; DTF/SIFA-Swin add a zero ``conv.weight (D, D, 1, 3)`` next to every
  ``mlp.fc1.weight`` (so the temporal convs start as no-ops).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

StateDict = dict[str, np.ndarray]


def inflate_stem_kernel(kernel: np.ndarray, early_stride: int = 4, *, key: str = "conv1.weight") -> np.ndarray:
  """``(O, I, kh, kw) -> (O, I, early_stride, kh, kw)``: 2-D kernel at ``early_stride // 2``, zeros elsewhere."""
  if kernel.ndim != 4:
    raise ValueError(
        f"ImageNet inflation: {key!r} must be a 2-D conv kernel (O, I, kh, kw), got shape {kernel.shape}; "
        "is this already a video checkpoint? Then convert it with source='original'")
  if early_stride < 1:
    raise ValueError(f"early_stride must be >= 1, got {early_stride}")
  out = np.zeros(kernel.shape[:2] + (early_stride,) + kernel.shape[2:], np.float32)
  out[:, :, early_stride // 2] = kernel
  return out


def inflate_resnet(state_dict: Mapping[str, np.ndarray], *, early_stride: int = 4,
                   dual_branch: bool = False) -> StateDict:
  """The ResNet ``transfer_weights`` (C2D, DTF and SIFA files); ``dual_branch`` = the SIFA copy."""
  out: StateDict = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if "conv" in key or "downsample.0" in key:
      if value.ndim != 4:
        raise ValueError(
            f"ImageNet inflation: {key!r} must be a 2-D conv kernel (O, I, kh, kw), got shape {value.shape}; "
            "is this already a video checkpoint? Then convert it with source='original'")
      if "conv1" in key and "layer" not in key:
        value = inflate_stem_kernel(value, early_stride, key=key)
      else:
        value = value[:, :, None].astype(np.float32)
    out[key] = value
    if dual_branch and "layer4" in key:
      out[key.replace("layer4", "layer4_dual")] = value
  return out


def inflate_swin(state_dict: Mapping[str, np.ndarray], *, early_stride: int = 4,
                 add_temporal_conv: bool = False) -> StateDict:
  """The Swin ``transfer_weights``; ``add_temporal_conv`` for DTF/SIFA-Swin (zero ``conv.weight``)."""
  out: StateDict = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key == "patch_embed.proj.weight":
      value = inflate_stem_kernel(value, early_stride, key=key)
    out[key] = value
    if add_temporal_conv and "mlp.fc1.weight" in key:
      dim = value.shape[1]
      out[key.replace("mlp.fc1.weight", "conv.weight")] = np.zeros((dim, dim, 1, 3), np.float32)
  return out
