"""Safe reading and writing of PyTorch checkpoints as ``{key: numpy array}`` dictionaries.

Reading never runs a full unpickle: ``.safetensors`` files are read with ``safetensors.numpy`` and
every other file with ``torch.load(weights_only=True)``, which only rebuilds tensors, plain
containers and numbers. The one class added to torch's allow-list is ``argparse.Namespace``: the
original training script stores its options as one under ``'opt'`` (SPEC.md 5.2), and rebuilding
it only sets attributes. A file that asks for anything else (a pickle that would call a function)
is refused with :class:`UnsafeCheckpointError` before any of its code runs.

torch is an optional dependency (``pip install 'dtf_jax[torch]'``) and is imported only here, inside
functions, so ``import dtf_jax.convert`` works without it.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

StateDict = dict[str, np.ndarray]

INSTALL_HINT = "pip install 'dtf_jax[torch]'  (installs torch and safetensors)"


class UnsafeCheckpointError(ValueError):
  """A checkpoint file holds pickled objects that a weights-only load refuses to rebuild."""


def require_torch():
  """Imports and returns ``torch``, or raises ``ImportError`` saying how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "PyTorch checkpoint conversion needs torch, which is an optional dependency of dtf_jax: "
        f"{INSTALL_HINT}") from e
  return torch


def _require_safetensors_numpy():
  try:
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading/writing .safetensors files needs safetensors: {INSTALL_HINT}") from e
  return safetensors.numpy


def tensor_to_numpy(value: Any, *, key: str = "?") -> np.ndarray:
  """A torch tensor or array-like as a numpy array (float16/bfloat16 widened to float32)."""
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith("torch"):
    torch = require_torch()
    if isinstance(value, torch.Tensor):
      t = value.detach().cpu()
      if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
      # Copy: .numpy() shares memory with the tensor, and a caller that keeps training the torch
      # module would otherwise change the converted JAX arrays in place.
      return t.numpy().copy()
  if isinstance(value, (int, float, np.generic)) or hasattr(value, "__array__"):
    return np.asarray(value)
  raise ValueError(
      f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; a state_dict must map "
      "parameter names to tensors")


def unwrap_state_dict(obj: Any, *, where: str = "checkpoint") -> dict[str, Any]:
  """The state_dict inside a loaded checkpoint object (SPEC.md 5.2).

  Accepts a bare state_dict, or a dict holding it under ``'model'`` (the original training script's
  ``{'opt', 'model', 'optimizer', 'scheduler', 'epoch'}``) or ``'state_dict'``. A leading DDP
  ``'module.'`` prefix is removed from every key.
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where}: expected a dict (a state_dict or a dict holding one under 'model' or "
                     f"'state_dict'), got a {type(obj).__name__}")
  for wrapper in ("model", "state_dict"):
    if wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  out: dict[str, Any] = {}
  for key, value in obj.items():
    if not isinstance(key, str):
      raise ValueError(f"{where}: state_dict keys must be strings, got {key!r}")
    name = key[len("module."):] if key.startswith("module.") else key
    if name in out:
      raise ValueError(f"{where}: key {name!r} appears both with and without the 'module.' prefix")
    out[name] = value
  not_tensors = [k for k, v in out.items() if isinstance(v, (Mapping, list, tuple, str, type(None)))]
  if not_tensors:
    raise ValueError(
        f"{where}: these entries are not tensors, so this does not look like a state_dict: "
        f"{', '.join(sorted(not_tensors)[:20])}{' ...' if len(not_tensors) > 20 else ''}")
  return out


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
  """Reads a checkpoint (path or in-memory dict) into ``{key: numpy array}`` (see module docstring).

  Raises:
    UnsafeCheckpointError: the file needs a full unpickle (it holds arbitrary Python objects).
    ImportError: torch (for .pth files) or safetensors is not installed.
    ValueError: the content is not a state_dict.
  """
  if isinstance(source, Mapping):
    raw = unwrap_state_dict(source, where="in-memory checkpoint")
    return {k: tensor_to_numpy(v, key=k) for k, v in raw.items()}
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path!r}")
  if path.endswith(".safetensors"):
    loaded = dict(_require_safetensors_numpy().load_file(path))
  else:
    loaded = _torch_load_weights_only(path)
  raw = unwrap_state_dict(loaded, where=path)
  return {k: tensor_to_numpy(v, key=k) for k, v in raw.items()}


def _torch_load_weights_only(path: str) -> Any:
  torch = require_torch()
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    detail = str(e).strip().splitlines()
    reason = next((line for line in detail if "GLOBAL" in line or "Unsupported" in line),
                  detail[0] if detail else "")
    raise UnsafeCheckpointError(
        f"refused to load {path!r}: it contains pickled Python objects other than tensors and plain "
        f"containers, and unpickling them could run arbitrary code ({reason.strip()}). Only files "
        "that torch.load(weights_only=True) accepts, or .safetensors files, are read. If you trust "
        "the file, re-save just its weights in a separate Python process, e.g. "
        "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth').") from e


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes ``{key: array}`` as ``.safetensors`` (no torch needed) or as a torch ``.pth`` file."""
  path = os.fspath(path)
  arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
  if path.endswith(".safetensors"):
    _require_safetensors_numpy().save_file(arrays, path)
  elif path.endswith((".pth", ".pt", ".bin")):
    torch = require_torch()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
  else:
    raise ValueError(f"output file {path!r}: use a '.safetensors' or '.pth' suffix")
