"""Key tables: Flax parameter paths <-> PyTorch state_dict keys and tensor layouts (SPEC.md 1.2, 5.1).

The model's parameter tree mirrors the originals' PyTorch module paths (``layer2/1/conv_offset``,
``layers/0/blocks/1/attn/qkv``), so a key is the dotted Flax path with the Flax leaf name replaced by
PyTorch's (``kernel``/``scale`` -> ``weight``, ``mean``/``var`` -> ``running_mean``/``running_var``).
Every leaf has a :class:`Layout` that converts the tensor both ways. The default layout follows from
the leaf: a rank-5 ``kernel`` is a Conv3d kernel, a rank-2 ``kernel`` a Linear weight,
``num_batches_tracked`` an int64 counter, anything else is stored unchanged. Each family's
:class:`KeyTable` lists the exceptions explicitly (one small table per family), plus the PyTorch
buffers that are constants in JAX (Swin's relative-position index and shift masks).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A PyTorch <-> Flax tensor layout change.

  Attributes:
    name: short description (shown in error messages).
    to_flax: PyTorch array -> Flax array.
    to_torch: Flax array -> PyTorch array.
    torch_shape: Flax shape -> the PyTorch shape it comes from.
  """

  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[Shape], Shape]


def _transpose(perm: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
  return lambda a: np.transpose(a, perm)


def _permute_shape(shape: Shape, perm: Sequence[int]) -> Shape:
  return tuple(shape[p] for p in perm)


IDENTITY = Layout("unchanged", lambda a: a, lambda a: a, lambda s: tuple(s))

# Conv3d: torch (O, I/g, kt, kh, kw) <-> flax (kt, kh, kw, I/g, O).
CONV3D = Layout(
    "Conv3d (O,I,kt,kh,kw) <-> (kt,kh,kw,I,O)",
    _transpose((2, 3, 4, 1, 0)), _transpose((4, 3, 0, 1, 2)),
    lambda s: _permute_shape(s, (4, 3, 0, 1, 2)))

# Linear: torch (O, I) <-> flax (I, O).
LINEAR = Layout("Linear (O,I) <-> (I,O)", lambda a: a.T, lambda a: a.T, lambda s: tuple(s[::-1]))

# DTF filter_g: torch Conv2d 1x1 (O, I, 1, 1) <-> flax Dense (I, O).
CONV1X1_AS_DENSE = Layout(
    "Conv2d 1x1 (O,I,1,1) <-> Dense (I,O)",
    lambda a: _require_trailing_ones(a, 2).reshape(a.shape[:2]).T,
    lambda a: a.T.reshape(a.shape[::-1] + (1, 1)),
    lambda s: (s[1], s[0], 1, 1))

# Correlation weights (weights_cor, def_cor.weight): torch (C, T, K, K) <-> flax (T, K, K, C).
CORRELATION = Layout(
    "correlation weight (C,T,K,K) <-> (T,K,K,C)",
    _transpose((1, 2, 3, 0)), _transpose((3, 0, 1, 2)),
    lambda s: _permute_shape(s, (3, 0, 1, 2)))

# DTF alpha1 / bias: torch (1, C, 1, 1, 1) <-> flax (C,).
CHANNEL_5D = Layout(
    "per-channel (1,C,1,1,1) <-> (C,)",
    lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1, 1, 1), lambda s: (1, s[0], 1, 1, 1))

# Swin blocks' temporal conv: torch Conv2d (O, I, 1, 3) <-> flax Conv (1, 3, I, O) on (N, L, T', D).
SWIN_TEMPORAL_CONV = Layout(
    "Conv2d [1,3] (O,I,1,3) <-> (1,3,I,O)",
    _transpose((2, 3, 1, 0)), _transpose((3, 2, 0, 1)),
    lambda s: _permute_shape(s, (3, 2, 0, 1)))

# BatchNorm num_batches_tracked: torch int64 () <-> flax int32 ().
COUNTER = Layout("int64 counter <-> int32 counter", lambda a: a, lambda a: a.astype(np.int64),
                 lambda s: tuple(s))


def _require_trailing_ones(a: np.ndarray, rank: int) -> np.ndarray:
  if a.ndim < rank or any(d != 1 for d in a.shape[rank:]):
    raise ValueError(f"expected trailing singleton axes after axis {rank}, got shape {a.shape}")
  return a


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class KeyTable:
  """The per-family exceptions to the default key/layout rules.

  Attributes:
    family: ``'resnet'`` or ``'swin'``.
    layouts: ``(regex on the dotted Flax path, Layout)``; the first match wins over the default.
    imagenet_missing: regexes of PyTorch keys an ImageNet checkpoint cannot provide (the model's
      own initialisation is kept for them; SPEC.md 5.3 "expected load results").
    imagenet_ignored: regexes of ImageNet keys the model has no place for (reported, not loaded).
    constants: ``fn(model) -> {torch_key: array}``: PyTorch buffers that are constants in JAX. On
      import they are checked against the recomputed values, on export they are written.
  """

  family: str
  layouts: tuple[tuple[str, Layout], ...] = ()
  imagenet_missing: tuple[str, ...] = ()
  imagenet_ignored: tuple[str, ...] = ()
  constants: Callable[[object], dict[str, np.ndarray]] | None = None

  def torch_key(self, path: Sequence[str | int]) -> str:
    """Dotted PyTorch key of a Flax leaf path, e.g. ``('layer1', 0, 'bn1', 'mean')``."""
    *parents, leaf = (str(p) for p in path)
    return ".".join(parents + [_LEAF_NAMES.get(leaf, leaf)])

  def layout(self, path: Sequence[str | int], shape: Shape) -> Layout:
    """The layout of the Flax leaf at ``path`` with shape ``shape``."""
    dotted = ".".join(str(p) for p in path)
    for pattern, layout in self.layouts:
      if re.search(pattern, dotted):
        return layout
    leaf = str(path[-1])
    if leaf == "num_batches_tracked":
      return COUNTER
    if leaf == "kernel":
      if len(shape) == 5:
        return CONV3D
      if len(shape) == 2:
        return LINEAR
      raise ValueError(f"no layout rule for the rank-{len(shape)} kernel {dotted!r} {shape}; add one to "
                       f"the {self.family} key table in dtf_jax/convert/keymap.py")
    return IDENTITY


# ------------------------------------------------------------------------------------------------
# Swin constant buffers, recomputed independently of the model code (SPEC.md 3.6).
# ------------------------------------------------------------------------------------------------

def swin_relative_position_index(window_size: int) -> np.ndarray:
  """``relative_position_index (ws*ws, ws*ws)`` int64: ``(yi-yj+ws-1)*(2ws-1) + (xi-xj+ws-1)``."""
  ws = window_size
  ys, xs = np.divmod(np.arange(ws * ws), ws)
  dy = ys[:, None] - ys[None, :] + ws - 1
  dx = xs[:, None] - xs[None, :] + ws - 1
  return (dy * (2 * ws - 1) + dx).astype(np.int64)


def swin_attention_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """Shifted-window ``attn_mask (nW, ws*ws, ws*ws)`` float32: -100 between different regions, else 0."""
  ws, sh = window_size, shift_size

  def region(coord, size):
    # Regions [0, size-ws), [size-ws, size-sh), [size-sh, size) along one axis.
    return np.where(coord < size - ws, 0, np.where(coord < size - sh, 1, 2))

  rows = region(np.arange(height), height)
  cols = region(np.arange(width), width)
  label = rows[:, None] * 3 + cols[None, :]  # (H, W)
  windows = label.reshape(height // ws, ws, width // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
  differs = windows[:, :, None] != windows[:, None, :]
  return np.where(differs, -100.0, 0.0).astype(np.float32)


def swin_constant_buffers(model) -> dict[str, np.ndarray]:
  """Every Swin block's ``attn.relative_position_index`` and (shifted blocks) ``attn_mask``.

  Reads ``window_size``, ``shift_size`` and ``input_resolution`` of each block ``layers.s.blocks.j``
  (the effective values after the "resolution <= window" rule).
  """
  out: dict[str, np.ndarray] = {}
  for s, stage in enumerate(model.layers):
    for j, block in enumerate(stage.blocks):
      prefix = f"layers.{s}.blocks.{j}."
      ws, sh = int(block.window_size), int(block.shift_size)
      out[prefix + "attn.relative_position_index"] = swin_relative_position_index(ws)
      if sh > 0:
        h, w = block.input_resolution
        out[prefix + "attn_mask"] = swin_attention_mask(int(h), int(w), ws, sh)
  return out


# ------------------------------------------------------------------------------------------------
# The two family tables.
# ------------------------------------------------------------------------------------------------

RESNET = KeyTable(
    family="resnet",
    layouts=(
        (r"(^|\.)dtf_blk\.filter_g\.kernel$", CONV1X1_AS_DENSE),
        (r"(^|\.)dtf_blk\.weights_cor$", CORRELATION),
        (r"(^|\.)dtf_blk\.(alpha1|bias)$", CHANNEL_5D),
        (r"(^|\.)def_cor\.weight$", CORRELATION),
    ),
    imagenet_missing=(
        r"^fc\.", r"^fc_dual\.", r"(^|\.)num_batches_tracked$", r"\.dtf_blk\.", r"\.conv_offset\.",
        r"\.def_cor\.", r"\.fc1\.", r"\.fc2\.",
    ),
)

SWIN = KeyTable(
    family="swin",
    layouts=(
        (r"\.blocks\.\d+\.conv\.kernel$", SWIN_TEMPORAL_CONV),
        (r"\.dtf_block\.filter_g\.kernel$", CONV1X1_AS_DENSE),
        (r"\.dtf_block\.weights_cor$", CORRELATION),
        (r"\.dtf_block\.(alpha1|bias)$", CHANNEL_5D),
        (r"\.def_cor\.weight$", CORRELATION),
    ),
    imagenet_missing=(r"^fc\.", r"\.dtf_block\.", r"\.def_cor\.", r"\.tda_norm\."),
    imagenet_ignored=(r"^head\.", r"^patch_embed\.norm\."),
    constants=swin_constant_buffers,
)


def table_for(model_name: str) -> KeyTable:
  """The key table of a registered model name (``*swin*`` -> Swin, else ResNet)."""
  return SWIN if "swin" in model_name else RESNET


def matches_any(key: str, patterns: Sequence[str]) -> bool:
  """Whether ``key`` matches one of the regexes."""
  return any(re.search(p, key) for p in patterns)
