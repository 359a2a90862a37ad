"""Blocks for research use without the trainer: ``from dtf_jax.layers import DTFBlock``.

Exports are resolved lazily so that importing ``dtf_jax.layers.common`` does not pull in the ops.
"""

import importlib

_EXPORTS = {
    "DTFBlock": "dtf_jax.layers.dtf_block",
    "Bottleneck": "dtf_jax.layers.resnet_blocks",
    "DTFBottleneck": "dtf_jax.layers.resnet_blocks",
    "DEFLocalTransBottleneck": "dtf_jax.layers.resnet_blocks",
    "GBottleneck": "dtf_jax.layers.resnet_blocks",
    "SwinTransformerBlock": "dtf_jax.layers.swin",
    "DTFSwinTransformerBlock": "dtf_jax.layers.swin_temporal",
    "SIFASwinTransformerBlock": "dtf_jax.layers.swin_temporal",
    "BatchNorm": "dtf_jax.layers.common",
    "DropPath": "dtf_jax.layers.common",
    "FrozenParam": "dtf_jax.layers.common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'dtf_jax.layers' has no attribute {name!r}")
