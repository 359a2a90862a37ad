"""C2D / DTF / SIFA Swin Transformers for video (SPEC.md 3.6-3.8, 4.4-4.7).

A clip ``(N, L, H, W, 3)`` is cut into ``T' = L / early_stride`` tubelets that are embedded and
folded into the batch (row ``n * T' + t``); four Swin stages process every tubelet as an image
(``temporal_block='none'``), with DTF blocks (``'dtf'``) or with SIFA blocks (``'sifa'``) that
exchange information between the tubelets of a clip; the head averages the per-tubelet logits.

Registered names (SPEC.md 4.4): ``c2d_swin_vit_{s,b,l}_p4_w7``, ``c2d_dtf_swin_vit_{s,b,l}_p4_w7``,
``c2d_sifa_swin_vit_{s,b,l}_p4_w7``. Builders: ``builder(*, num_classes, clip_length, image_size,
rngs, **overrides)``; see ``C2DSwinTransformer`` for the overrides.

Parameter tree (PyTorch ``state_dict`` path -> Flax path; Flax leaf names kernel/bias/scale):
``patch_embed.proj`` -> ``patch_embed/proj``; ``layers.s.blocks.j.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`` -> ``layers/s/blocks/j/...``;
``layers.s.downsample.{norm, reduction}``; ``norm``; ``fc``; DTF-Swin: ``.../dtf_block/...``,
``.../conv``; SIFA-Swin: ``.../def_cor/weight``, ``.../conv``, ``.../tda_norm``. The buffers
``relative_position_index`` and ``attn_mask`` are recomputed constants, not state.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtf_jax.layers.dtf_block import check_dtf_shape
from dtf_jax.layers.swin import (PatchMerging, SwinStage, SwinTransformerBlock, TubeletEmbed,
                                 swin_layer_norm, swin_linear)
from dtf_jax.layers.swin_temporal import DTFSwinTransformerBlock, SIFASwinTransformerBlock
from dtf_jax.models.registry import register

Array = jax.Array

TEMPORAL_BLOCKS = ("none", "dtf", "sifa")
KERNEL_IMPLS = ("auto", "xla", "pallas")

# Variant table of SPEC.md 4.4: embed dim, depths, heads, drop_path_rate.
SWIN_VARIANTS = {
    "s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "l": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.5),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _canonical_dtype(dtype) -> type:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in _DTYPES:
    raise ValueError(f"dtype must be float32 or bfloat16 (compute dtype; parameters stay float32), "
                     f"got {dtype!r}")
  return _DTYPES[name]


def _stage_resolutions(image_size: int, patch_size: int, num_stages: int) -> list[int]:
  if image_size < 1 or patch_size < 1 or image_size % patch_size:
    raise ValueError(f"image_size={image_size} must be a positive multiple of the patch size "
                     f"{patch_size}")
  res = [image_size // patch_size]
  for s in range(num_stages - 1):
    if res[-1] % 2:
      raise ValueError(
          f"image_size={image_size}: stage {s} resolution {res[-1]}x{res[-1]} is odd, so patch "
          "merging cannot halve it; image_size / patch_size must be divisible by "
          f"2**{num_stages - 1}")
    res.append(res[-1] // 2)
  return res


def _check_windows(resolutions: Sequence[int], window_size: int, image_size: int) -> None:
  if window_size < 1:
    raise ValueError(f"window_size must be >= 1, got {window_size}")
  for s, r in enumerate(resolutions):
    if r > window_size and r % window_size:
      raise ValueError(
          f"image_size={image_size}, window_size={window_size}: stage {s} resolution {r}x{r} is "
          "neither a multiple of the window size nor smaller than or equal to it (e.g. 224 -> "
          "56, 28, 14, 7 with window 7); pick an image size / window size that fits")


class C2DSwinTransformer(nnx.Module):
  """Video Swin network of the originals: tubelet stem, 4 Swin stages, per-tubelet head.

  Call: ``video (N, L, H, W, 3)`` float -> logits ``(N, num_classes)`` float32.

  Args:
    num_classes: classifier outputs.
    clip_length: frames L per clip; must be a multiple of ``early_stride`` (T' = L / 4 tubelets).
    image_size: square input size; ``image_size / patch_size`` must be halvable between stages
      and every stage resolution a multiple of ``window_size`` or at most ``window_size``.
    temporal_block: ``'none'`` (C2D-Swin), ``'dtf'`` (DTF-Swin) or ``'sifa'`` (SIFA-Swin).
    embed_dim, depths, num_heads, window_size: Swin width / depth (stage s has dim
      ``embed_dim * 2**s``, ``depths[s]`` blocks and ``num_heads[s]`` heads).
    patch_size, early_stride: tubelet size (4 x patch x patch).
    mlp_ratio: MLP hidden width factor.
    drop_path_rate: stochastic depth, ``linspace(0, rate, sum(depths))`` over the blocks in order.
    dropout_ratio: dropout before ``fc``.
    dtype: compute dtype, ``float32`` or ``bfloat16``; parameters are float32; softmax, LayerNorm
      statistics, the DTF FFT and the logits are float32.
    remat: rematerialise every block in the backward pass (``nnx.remat``).
    kernel_impl: ``'auto' | 'xla' | 'pallas'`` for the DTF / SIFA ops.
    bn_group_size: per-device batch of the DTF blocks' BatchNorm statistics (None = whole batch).
    sifa_kernel: correlation window K of SIFA blocks (an odd int; the builders take element 0 of
      a list, as the originals do, so a ResNet-style ``[1, 3, 3, 3]`` gives K = 1).
    swin_init: apply the Swin init to the DTF/SIFA stages too (the originals leave them at the
      PyTorch default init, SPEC.md 7.9). The plain C2D-Swin always uses the Swin init.
    rngs: ``nnx.Rngs`` (``params``; ``dropout`` for training with dropout / drop path).
  """

  def __init__(
      self,
      *,
      num_classes: int,
      clip_length: int,
      image_size: int,
      temporal_block: str = "none",
      embed_dim: int = 96,
      depths: Sequence[int] = (2, 2, 18, 2),
      num_heads: Sequence[int] = (3, 6, 12, 24),
      window_size: int = 7,
      patch_size: int = 4,
      early_stride: int = 4,
      mlp_ratio: float = 4.0,
      drop_path_rate: float = 0.3,
      dropout_ratio: float = 0.5,
      dtype=jnp.float32,
      remat: bool = False,
      kernel_impl: str = "auto",
      bn_group_size: int | None = None,
      sifa_kernel: int = 3,
      swin_init: bool = False,
      rngs: nnx.Rngs,
  ):
    if temporal_block not in TEMPORAL_BLOCKS:
      raise ValueError(f"temporal_block must be one of {TEMPORAL_BLOCKS}, got {temporal_block!r}")
    if num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
    if not depths or len(depths) != len(num_heads) or min(depths) < 1 or min(num_heads) < 1:
      raise ValueError(f"depths={depths} and num_heads={num_heads} must be non-empty positive "
                       "sequences of the same length (one entry per stage)")
    dims = [embed_dim * 2 ** s for s in range(len(depths))]
    for s, (d, h) in enumerate(zip(dims, num_heads)):
      if d % h:
        raise ValueError(f"stage {s}: dim {d} (embed_dim={embed_dim} * 2**{s}) is not divisible by "
                         f"num_heads[{s}]={h}")
    if early_stride < 1 or clip_length < early_stride or clip_length % early_stride:
      raise ValueError(f"clip_length={clip_length} must be a positive multiple of early_stride="
                       f"{early_stride} (the tubelet length)")
    resolutions = _stage_resolutions(image_size, patch_size, len(depths))
    _check_windows(resolutions, window_size, image_size)
    if not 0.0 <= drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if not 0.0 <= dropout_ratio < 1.0:
      raise ValueError(f"dropout_ratio must be in [0, 1), got {dropout_ratio}")
    if kernel_impl not in KERNEL_IMPLS:
      raise ValueError(f"kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
    if bn_group_size is not None and (not isinstance(bn_group_size, int) or bn_group_size < 1):
      raise ValueError(f"bn_group_size must be None or a positive int, got {bn_group_size!r}")
    if not isinstance(sifa_kernel, int) or sifa_kernel < 1 or sifa_kernel % 2 == 0:
      raise ValueError(f"sifa_kernel must be a positive odd int (SIFA correlation window K; the "
                       f"ops support odd K only), got {sifa_kernel!r}")
    if not isinstance(swin_init, bool):
      raise ValueError(f"swin_init must be a bool, got {swin_init!r}")
    if not isinstance(remat, bool):
      raise ValueError(f"remat must be a bool, got {remat!r}")
    dtype = _canonical_dtype(dtype)
    clip_len = clip_length // early_stride
    if temporal_block == "dtf":
      for s, d in enumerate(dims):
        check_dtf_shape(d, clip_len, where=f"DTF-Swin stage {s} (dim {d}, clip_len {clip_len})")

    self.num_classes = num_classes
    self.clip_length = clip_length
    self.image_size = image_size
    self.temporal_block = temporal_block
    self.early_stride = early_stride
    self.clip_len = clip_len
    self.dtype = dtype
    self.num_features = dims[-1]

    self.patch_embed = TubeletEmbed(image_size=image_size, early_stride=early_stride,
                                    patch_size=patch_size, embed_dim=embed_dim, dtype=dtype,
                                    rngs=rngs)
    rates = [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depths), dtype=np.float32)]
    stage_init = "swin" if (temporal_block == "none" or swin_init) else "torch"
    stages = []
    for s, depth in enumerate(depths):
      res = (resolutions[s], resolutions[s])
      blocks = []
      for j in range(depth):
        kwargs = dict(window_size=window_size, shift_size=0 if j % 2 == 0 else window_size // 2,
                      mlp_ratio=mlp_ratio, drop_path=rates[sum(depths[:s]) + j], init=stage_init,
                      dtype=dtype, rngs=rngs)
        if temporal_block == "none":
          blocks.append(SwinTransformerBlock(dims[s], res, num_heads[s], **kwargs))
        elif temporal_block == "dtf":
          blocks.append(DTFSwinTransformerBlock(
              dims[s], res, num_heads[s], clip_len=clip_len, kernel_impl=kernel_impl,
              bn_group_size=bn_group_size, **kwargs))
        else:
          blocks.append(SIFASwinTransformerBlock(
              dims[s], res, num_heads[s], clip_len=clip_len, sifa_kernel=sifa_kernel,
              kernel_impl=kernel_impl, **kwargs))
      downsample = (PatchMerging(res, dims[s], init=stage_init, dtype=dtype, rngs=rngs)
                    if s < len(depths) - 1 else None)
      stages.append(SwinStage(blocks, downsample, remat=remat))
    self.layers = nnx.List(stages)
    self.norm = swin_layer_norm(self.num_features, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_ratio, rngs=rngs)
    self.fc = swin_linear(self.num_features, num_classes, init="swin", dtype=dtype, rngs=rngs)

  def features(self, video: Array) -> Array:
    """Pooled per-tubelet features ``(N * T', 8D)`` (after the final LayerNorm)."""
    if video.ndim != 5:
      raise ValueError(f"expected a clip batch (N, L, H, W, 3), got shape {video.shape}")
    if video.shape[1] != self.clip_length:
      raise ValueError(f"the model was built for clip_length={self.clip_length} frames, got a clip "
                       f"of {video.shape[1]} frames (input shape {video.shape})")
    x = self.patch_embed(video.astype(self.dtype))
    for stage in self.layers:
      x = stage(x)
    x = self.norm(x)
    return jnp.mean(x.astype(jnp.float32), axis=1)

  def __call__(self, video: Array) -> Array:
    n = video.shape[0]
    x = self.dropout(self.features(video).astype(self.dtype))
    logits = self.fc(x).astype(jnp.float32)
    return jnp.mean(logits.reshape(n, self.clip_len, self.num_classes), axis=1)


# ----------------------------------------------------------------------------------------------
# Registered builders.
# ----------------------------------------------------------------------------------------------

_COMMON_OVERRIDES = ("embed_dim", "depths", "num_heads", "window_size", "drop_path_rate",
                     "dropout_ratio", "dtype", "remat", "mlp_ratio", "early_stride", "swin_init")
_FAMILY_OVERRIDES = {
    "none": _COMMON_OVERRIDES,
    "dtf": _COMMON_OVERRIDES + ("kernel_impl", "bn_group_size", "region_kernel"),
    "sifa": _COMMON_OVERRIDES + ("kernel_impl", "sifa_kernel", "sifa_prev_frame"),
}


def _sifa_kernel_size(sifa_kernel) -> int:
  """The originals' rule: ``K = sifa_kernel[0]`` if a (non-empty) list is given, else 3 / the int.

  Caution (SPEC.md 4.4, 7.15): a ResNet-style ``[1, 3, 3, 3]`` gives K = 1.
  """
  if sifa_kernel is None:
    return 3
  if isinstance(sifa_kernel, (list, tuple)):
    if not sifa_kernel:
      return 3
    sifa_kernel = sifa_kernel[0]
  if isinstance(sifa_kernel, bool) or not isinstance(sifa_kernel, (int, np.integer)):
    raise ValueError(f"sifa_kernel must be an int or a list of ints, got {sifa_kernel!r}")
  return int(sifa_kernel)


def build_swin(variant: str, temporal_block: str, *, num_classes: int, clip_length: int,
               image_size: int, rngs: nnx.Rngs, **overrides) -> C2DSwinTransformer:
  """Builds a Swin variant (``'s' | 'b' | 'l'``) with the given temporal block and overrides.

  Overrides (all optional): ``embed_dim, depths, num_heads, window_size, drop_path_rate`` (default
  per variant), ``dropout_ratio`` (0.5), ``dtype``, ``remat``, ``mlp_ratio``, ``early_stride``,
  ``swin_init``; DTF-Swin also ``kernel_impl, bn_group_size`` and ``region_kernel`` (accepted and
  ignored, as in the originals); SIFA-Swin also ``kernel_impl``, ``sifa_kernel`` (int or list:
  element 0 is used) and ``sifa_prev_frame`` (``'shift' | 'first'``, validated; no effect on
  SIFA-Swin, see SPEC.md 2.6/3.8). Unknown names raise ``ValueError``.
  """
  allowed = _FAMILY_OVERRIDES[temporal_block]
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for a {temporal_block!r}-Swin model; allowed: "
                     f"{sorted(allowed)}")
  config = dict(SWIN_VARIANTS[variant])
  config.update(overrides)
  # DTF-Swin's region_kernel has no effect in the originals (its DTF blocks always use K = 3).
  config.pop("region_kernel", None)
  if temporal_block == "sifa":
    config["sifa_kernel"] = _sifa_kernel_size(config.get("sifa_kernel"))
    # SPEC.md 2.6's corrupted forward shift only feeds SIFA-Swin's discarded gating term (the
    # correlation reads frame max(t-1, 0) inside the op), so both modes give the same network.
    prev_frame = config.pop("sifa_prev_frame", "shift")
    if prev_frame not in ("shift", "first"):
      raise ValueError(f"sifa_prev_frame must be 'shift' or 'first', got {prev_frame!r}")
  return C2DSwinTransformer(num_classes=num_classes, clip_length=clip_length,
                            image_size=image_size, temporal_block=temporal_block, rngs=rngs,
                            **config)


def _make_builder(name: str, variant: str, temporal_block: str):
  def builder(*, num_classes: int, clip_length: int = 16, image_size: int = 224,
              rngs: nnx.Rngs, **overrides) -> C2DSwinTransformer:
    return build_swin(variant, temporal_block, num_classes=num_classes, clip_length=clip_length,
                      image_size=image_size, rngs=rngs, **overrides)

  builder.__name__ = builder.__qualname__ = name
  builder.__doc__ = (f"{name}: Swin-{variant.upper()} with temporal block {temporal_block!r} "
                     "(SPEC.md 4.4); overrides as in ``C2DSwinTransformer``.")
  return builder


def _register_family(prefix: str, temporal_block: str) -> None:
  for variant in SWIN_VARIANTS:
    name = f"{prefix}_{variant}_p4_w7"
    register(name)(_make_builder(name, variant, temporal_block))


_register_family("c2d_swin_vit", "none")
_register_family("c2d_dtf_swin_vit", "dtf")
_register_family("c2d_sifa_swin_vit", "sifa")
