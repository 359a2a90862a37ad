"""Registered networks: C2D / DTF / SIFA ResNets and Swin Transformers (SPEC.md section 4)."""

from dtf_jax.models.registry import create_model, list_models, register
from dtf_jax.models.resnet import sifa_combined_probs

__all__ = ["create_model", "list_models", "register", "sifa_combined_probs"]
