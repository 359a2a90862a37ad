"""Test helper: copy a PyTorch reference's ``state_dict`` into a ``dtf_jax`` ResNet-family module.

A small stand-in for the checkpoint converter (SPEC.md 1.2): the Flax path ``a/0/b/leaf`` is the
torch key ``a.0.b.<leaf>`` with ``kernel|scale -> weight``, ``mean -> running_mean``,
``var -> running_var``; layouts:

* Conv3d ``(O, I, kt, kh, kw)`` -> ``(kt, kh, kw, I, O)``; 1x1 Conv2d ``filter_g`` ``(O, I, 1, 1)`` ->
  ``(I, O)``; Linear ``(O, I)`` -> ``(I, O)``;
* ``weights_cor`` / ``def_cor.weight`` ``(C, T, K, K)`` -> ``(T, K, K, C)``;
* DTF ``alpha1`` / ``bias`` ``(1, C, 1, 1, 1)`` -> ``(C,)``; everything else unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dtf_jax.layers.common import FrozenParam

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
CHECKPOINT_VARIABLES = nnx.Any(nnx.Param, FrozenParam, nnx.BatchStat)


def torch_key(path) -> str:
  """Flax path tuple -> PyTorch ``state_dict`` key."""
  parts = [str(p) for p in path]
  return ".".join(parts[:-1] + [LEAF_TO_TORCH.get(parts[-1], parts[-1])])


def torch_to_flax_layout(key: str, value: np.ndarray) -> np.ndarray:
  """One tensor's layout change (see module docstring)."""
  leaf = key.rsplit(".", 1)[-1]
  if key.endswith("weights_cor") or key.endswith("def_cor.weight"):
    return value.transpose(1, 2, 3, 0)
  if leaf in ("alpha1", "bias") and value.ndim == 5:
    return value.reshape(-1)
  if leaf == "weight" and value.ndim == 5:
    return value.transpose(2, 3, 4, 1, 0)
  if leaf == "weight" and value.ndim == 4:
    assert value.shape[2:] == (1, 1), (key, value.shape)
    return value[:, :, 0, 0].T
  if leaf == "weight" and value.ndim == 2:
    return value.T
  return value


def flax_shapes_as_torch(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """``{torch key: Flax shape}`` of every checkpointed variable (params, frozen, batch stats)."""
  flat = nnx.to_flat_state(nnx.state(module, CHECKPOINT_VARIABLES))
  return {torch_key(path): tuple(var.shape) for path, var in flat}


def copy_torch_to_flax(torch_module: torch.nn.Module, flax_module: nnx.Module) -> None:
  """Copies every parameter and BatchNorm buffer of ``torch_module`` into ``flax_module`` in place.

  Raises ``KeyError`` if a key is missing on either side and ``ValueError`` on a shape mismatch.
  """
  # Copies: on CPU, jnp.asarray of a numpy view of a torch tensor may alias torch's memory, and
  # torch updates its BatchNorm buffers in place.
  sd = {k: v.detach().cpu().numpy().copy() for k, v in torch_module.state_dict().items()}
  flat = nnx.to_flat_state(nnx.state(flax_module, CHECKPOINT_VARIABLES))
  used = set()
  for path, _ in flat:
    key = torch_key(path)
    if key not in sd:
      raise KeyError(f"no torch tensor {key!r} for Flax variable {path}")
    value = torch_to_flax_layout(key, sd[key])
    target = flax_module
    for p in path[:-1]:
      target = target[p] if isinstance(p, int) else getattr(target, p)
    var = getattr(target, str(path[-1]))
    if tuple(var[...].shape) != value.shape:
      raise ValueError(f"{key}: torch {sd[key].shape} -> {value.shape}, Flax {var[...].shape}")
    var[...] = jnp.array(value, var[...].dtype, copy=True)
    used.add(key)
  left = sorted(set(sd) - used)
  if left:
    raise KeyError(f"torch tensors without a Flax counterpart: {left}")


def randomize_torch(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
  """Random values for every parameter (frozen and zero-initialised ones too) and non-trivial BN
  running statistics, at magnitudes that keep activations O(1) (so float32 parity is meaningful):

  * kernels / matrices ``(O, I, ...)``: ``N(0, 1/prod(shape[1:]))`` (fan-in scaling);
  * correlation weights ``weights_cor`` / ``def_cor.weight`` ``(C, T, K, K)``: ``U(0.5, 1.5)/C``;
  * per-channel vectors (BN weight/bias, biases, DTF ``alpha1``/``bias``): ``N(0, scale^2)``, BN
    weights shifted by +1;
  * running mean ``N(0, 0.1^2)``, running var ``U(0.5, 1.5)``, ``num_batches_tracked = 3``.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(("weights_cor", "def_cor.weight")):
        p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5) / p.shape[0])
      elif p.numel() == max(p.shape):  # vector-like, e.g. (C,) or (1, C, 1, 1, 1)
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / fan_in**0.5)
    for m in module.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
        m.weight.add_(1.0)  # BN scales around 1
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
      elif name.endswith("num_batches_tracked"):
        b.fill_(3)


def flax_batch_stats_as_torch(flax_module: nnx.Module) -> dict[str, np.ndarray]:
  """``{torch key: value}`` of every BatchNorm buffer of ``flax_module``."""
  flat = nnx.to_flat_state(nnx.state(flax_module, nnx.BatchStat))
  return {torch_key(path): np.asarray(var[...]) for path, var in flat}
