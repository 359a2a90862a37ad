"""The originals' key-dropping helpers on raw PyTorch-layout state_dicts (SPEC.md 5.3).

Each helper takes ``{key: numpy array}`` and returns ``(new_state_dict, dropped_keys)``; the input is
not modified. Keys dropped by a rule may be absent at load time (the model keeps its own
initialisation for them) and are reported as "dropped by rule".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.ndimage

StateDict = dict[str, np.ndarray]


def remove_fc(model_name: str, state_dict: Mapping[str, np.ndarray]) -> tuple[StateDict, list[str]]:
  """Drops the classifier ``fc.weight`` / ``fc.bias`` (the original ``remove_fc``).

  As in the original, the SIFA dual head ``fc_dual.*`` is *kept* for ``c2d_sifa_*`` (the original only
  drops it for other model families), and ``_fc.*`` / ``fc_g.*`` are dropped for the families that
  own them.
  """
  if model_name.startswith("c2d_eftnet"):
    names = ["_fc.weight", "_fc.bias"]
  else:
    names = ["fc.weight", "fc.bias"]
    if model_name.startswith(("lgd3d_", "lgd_p3d_")):
      names += ["fc_g.weight", "fc_g.bias"]
    if model_name.startswith(("dg_p3da_", "dg_p3d_", "dgtc_c2d_")):
      names += ["fc_dual.weight", "fc_dual.bias"]
  return _drop(state_dict, lambda k: k in names)


def remove_defcor_weight(model_name: str,
                         state_dict: Mapping[str, np.ndarray]) -> tuple[StateDict, list[str]]:
  """Drops every key containing ``'def_cor.weight'`` (SIFA; its shape depends on the clip length)."""
  del model_name
  return _drop(state_dict, lambda k: "def_cor.weight" in k)


def convert_fft_weight(state_dict: Mapping[str, np.ndarray]) -> tuple[StateDict, list[str]]:
  """The original DTF ``convert_fft_weight``: drops ``weights_cor`` / ``freq_`` keys, resizes ``filter2``.

  A ``*filter2.complex_weight`` of shape ``(1, C, t, 1, 1, 2)`` is resized along ``t`` to ``2t - 1``
  (``t + 1`` if the key contains ``'dual'``) by linear interpolation of the real and imaginary
  ``(C, t)`` planes, as ``skimage.transform.resize`` (order 1, mode 'reflect') did in the original.
  Released DTF blocks have no ``filter2``, so in practice this only drops ``weights_cor`` (note that
  ``filter_g`` still depends on the clip length and is left untouched, SPEC.md 7.16).
  """
  out, dropped = _drop(state_dict, lambda k: "weights_cor" in k or "freq_" in k)
  for key, value in out.items():
    if "filter2.complex_weight" not in key:
      continue
    if value.ndim != 6 or value.shape[0] != 1 or value.shape[3:] != (1, 1, 2):
      raise ValueError(f"convert_fft_weight: {key!r} must have shape (1, C, t, 1, 1, 2), got {value.shape}")
    channels, t = value.shape[1], value.shape[2]
    t_new = t + 1 if "dual" in key else 2 * t - 1
    planes = value.reshape(channels, t, 2).astype(np.float64)
    if t_new != t:
      planes = np.stack([_resize_linear(planes[..., i], t_new) for i in range(2)], axis=-1)
    out[key] = planes.reshape(1, channels, t_new, 1, 1, 2).astype(value.dtype)
  return out, dropped


def _resize_linear(plane: np.ndarray, new_len: int) -> np.ndarray:
  """``skimage.transform.resize(plane, (rows, new_len))`` with order 1 for upsampling (no anti-aliasing).

  skimage maps its 'reflect' mode to ndimage 'mirror' and zooms with half-pixel (grid) coordinates.
  """
  zoom = (1.0, new_len / plane.shape[1])
  return scipy.ndimage.zoom(plane, zoom, order=1, mode="mirror", grid_mode=True)


def _drop(state_dict: Mapping[str, np.ndarray], predicate) -> tuple[StateDict, list[str]]:
  kept, dropped = {}, []
  for key, value in state_dict.items():
    if predicate(key):
      dropped.append(key)
    else:
      kept[key] = value
  return kept, dropped
