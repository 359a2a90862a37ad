"""Registered networks: C2D / DTF / SIFA ResNets and Swin Transformers (SPEC.md section 4)."""

from dtf_jax.models.registry import create_model, list_models, register

__all__ = ["create_model", "list_models", "register"]
