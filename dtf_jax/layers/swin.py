"""Swin Transformer (v1) pieces with the originals' PyTorch semantics (SPEC.md 3.6, 4.4).

Token layout: a stage works on tokens ``(B, L, C)`` with ``L = H' * W'`` (token ``l = h * W' + w``).
In the video networks the batch axis holds one row per clip and tubelet, row ``n * T' + t``
(SPEC.md 1.1), so a plain Swin block never mixes tubelets.

Modules and their parameter paths (mirroring the PyTorch module paths of SPEC.md 5.1):

* ``WindowAttention``: ``qkv`` (Linear D -> 3D), ``proj`` (Linear D -> D),
  ``relative_position_bias_table`` ``((2ws-1)^2, nh)``. The relative position index and the
  shifted-window mask are trace-time constants (NumPy), not state.
* ``Mlp``: ``fc1`` (D -> 4D), exact GELU, ``fc2`` (4D -> D).
* ``SwinTransformerBlock``: ``norm1``, ``attn``, ``drop_path``, ``norm2``, ``mlp``.
* ``PatchMerging``: ``norm`` (LN 4D), ``reduction`` (Linear 4D -> 2D, no bias).
* ``TubeletEmbed``: ``proj`` (Conv3d 3 -> D, kernel = stride = (early_stride, patch, patch), bias).
* ``SwinStage`` (PyTorch ``BasicLayer``): ``blocks`` (``nnx.List``), ``downsample``.

Initialisation (``init``): ``"swin"`` is the Swin ``_init_weights`` (Linear weights N(0, 0.02^2),
biases 0); ``"torch"`` is PyTorch's default Linear init (weight and bias U(+-1/sqrt(fan_in))), which
the originals' DTF/SIFA-Swin stages end up with (SPEC.md 4.6, 7.9). LayerNorms are 1/0 and the
relative-position tables N(0, 0.02^2) in both cases.

Precision: parameters are float32; ``dtype`` is the compute dtype (float32 or bfloat16). Attention
logits, the softmax and LayerNorm statistics are computed in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtf_jax.layers import common

Array = jax.Array

INITS = ("swin", "torch")


def _check_init(init: str) -> None:
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def swin_linear(in_features: int, out_features: int, *, use_bias: bool = True, init: str = "swin",
                dtype=None, rngs: nnx.Rngs) -> nnx.Linear:
  """A PyTorch ``nn.Linear`` with the Swin init (``"swin"``) or PyTorch's default (``"torch"``)."""
  _check_init(init)
  if init == "swin":
    return common.linear(in_features, out_features, use_bias=use_bias,
                         kernel_init=common.normal_init(0.02), bias_init=nnx.initializers.zeros,
                         dtype=dtype, rngs=rngs)
  return common.linear(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs)


def swin_layer_norm(num_features: int, *, zero_init: bool = False, dtype=None,
                    rngs: nnx.Rngs) -> nnx.LayerNorm:
  """PyTorch ``nn.LayerNorm`` (eps 1e-5) with a two-pass float32 variance like PyTorch.

  ``zero_init`` sets weight and bias to 0 (SIFA's ``tda_norm``).
  """
  norm = common.layer_norm(num_features, dtype=dtype, rngs=rngs)
  norm.use_fast_variance = False
  if zero_init:
    norm.scale[...] = jnp.zeros_like(norm.scale[...])
  return norm


# ----------------------------------------------------------------------------------------------
# Constants: relative position index, shifted-window mask, window partition.
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def relative_position_index(window_size: int) -> np.ndarray:
  """Index into the bias table for every token pair of a window, ``(ws*ws, ws*ws)`` int32.

  Tokens are row-major inside the window; ``index[i, j] = (yi - yj + ws - 1) * (2ws - 1) +
  (xi - xj + ws - 1)``.
  """
  ys, xs = np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + window_size - 1
  dx = xs[:, None] - xs[None, :] + window_size - 1
  index = (dy * (2 * window_size - 1) + dx).astype(np.int32)
  index.setflags(write=False)
  return index


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """Additive attention mask of the shifted windows, ``(nW, ws*ws, ws*ws)`` float32 (0 or -100).

  The (rolled) feature map is labelled by the slices ``[0, S-ws)``, ``[S-ws, S-sh)``, ``[S-sh, S)``
  of each axis (9 regions); two tokens of a window may attend to each other only if they carry the
  same label. Windows are ordered row-major over ``(H/ws, W/ws)``.
  """
  labels = np.zeros((height, width), np.float32)
  bounds_h = ((0, height - window_size), (height - window_size, height - shift_size),
              (height - shift_size, height))
  bounds_w = ((0, width - window_size), (width - window_size, width - shift_size),
              (width - shift_size, width))
  count = 0
  for h0, h1 in bounds_h:
    for w0, w1 in bounds_w:
      labels[h0:h1, w0:w1] = count
      count += 1
  windows = window_partition(labels[None, :, :, None], window_size)[..., 0]  # (nW, ws*ws)
  diff = windows[:, None, :] - windows[:, :, None]
  mask = np.where(diff != 0, -100.0, 0.0).astype(np.float32)
  mask.setflags(write=False)
  return mask


def window_partition(x, window_size: int):
  """``(B, H, W, C) -> (B * nW, ws*ws, C)``; windows row-major per image, tokens row-major inside.

  Works on NumPy and JAX arrays. ``H`` and ``W`` must be multiples of ``window_size``.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * (h // window_size) * (w // window_size), window_size * window_size, c)


def window_reverse(windows, window_size: int, height: int, width: int):
  """Inverse of ``window_partition``: ``(B * nW, ws*ws, C) -> (B, H, W, C)``."""
  nh, nw = height // window_size, width // window_size
  c = windows.shape[-1]
  x = windows.reshape(-1, nh, nw, window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, c)


# ----------------------------------------------------------------------------------------------
# Attention, MLP, block.
# ----------------------------------------------------------------------------------------------

def _biased_softmax(logits: Array, bias: Array, mask: Array | None) -> Array:
  """``softmax(logits + B + M)`` over the last axis; logits ``(B * nW, nh, N, N)`` float32."""
  b_, nh, n, _ = logits.shape
  z = logits + bias[None]
  if mask is not None:
    nw = mask.shape[0]
    z = (z.reshape(b_ // nw, nw, nh, n, n) + mask[None, :, None]).reshape(b_, nh, n, n)
  return jax.nn.softmax(z, axis=-1)


def _split_heads(tokens: Array, num_heads: int) -> Array:
  """``(B_, N, nh * hd) -> (B_, nh, N, hd)`` (head-major features)."""
  b_, n, c = tokens.shape
  return tokens.reshape(b_, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)


def _split_qkv(qkv: Array, num_heads: int) -> tuple[Array, Array, Array]:
  """``qkv (B_, N, 3D)`` ([q; k; v], each head-major) -> q, k, v ``(B_, nh, N, hd)``."""
  dim = qkv.shape[-1] // 3
  return tuple(_split_heads(qkv[..., i * dim:(i + 1) * dim], num_heads) for i in range(3))


def _softmax_dtype(dtype) -> jnp.dtype:
  """Logits and softmax run in float32, or in float64 for float64 inputs (the tests' oracle)."""
  return jnp.promote_types(dtype, jnp.float32)


def _window_attention_forward(qkv, bias, mask, num_heads, scale):
  b_, n, c3 = qkv.shape
  q, k, v = _split_qkv(qkv, num_heads)
  logits = jnp.matmul(q * jnp.asarray(scale, q.dtype), common.row_major_swap(k),
                      preferred_element_type=_softmax_dtype(q.dtype))
  attn = _biased_softmax(logits, bias, mask)
  out = jnp.matmul(attn.astype(v.dtype), v)  # (B_, nh, N, hd)
  return out.transpose(0, 2, 1, 3).reshape(b_, n, c3 // 3), attn


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def window_attention_core(qkv: Array, bias: Array, mask: Array | None, num_heads: int,
                          scale: float) -> Array:
  """Multi-head window attention between the ``qkv`` and ``proj`` Linears.

  ``softmax(q * scale @ k^T + B + M) @ v`` for every window and head, heads concatenated.

  Args:
    qkv: ``(B * nW, N, 3D)``: the ``qkv`` Linear's output, features ``[q; k; v]``, each head-major
      (``head * hd + j``); windows of one image consecutive. Compute dtype (float32 / bfloat16).
    bias: ``(nh, N, N)`` float32 relative position bias (differentiable).
    mask: ``(nW, N, N)`` constant additive shift mask, or None.
    num_heads: ``nh`` (static).
    scale: the logit scale ``hd^-0.5`` (static).

  Returns:
    ``(B * nW, N, D)`` in ``qkv``'s dtype, heads concatenated head-major. Logits and the softmax
    are float32 (float64 for float64 ``qkv``).

  The hand-written backward keeps only ``qkv`` and the attention weights, returns the gradient of
  ``qkv`` as one ``(B * nW, N, 3D)`` array (autodiff built it from three padded slices added
  together, then transposed it again for the Linear's weight and bias gradients), and runs every
  attention dot on row-major operands (``common.row_major_swap``). Window attention fwd + bwd at
  the Swin-S stage shapes takes 25-50% less time than autodiff did (benchmarks/README.md).
  """
  return _window_attention_forward(qkv, bias, mask, num_heads, scale)[0]


def _window_attention_core_fwd(qkv, bias, mask, num_heads, scale):
  out, attn = _window_attention_forward(qkv, bias, mask, num_heads, scale)
  return out, (qkv, attn, mask)


def _window_attention_core_bwd(num_heads, scale, residuals, g):
  qkv, attn, mask = residuals
  dtype = qkv.dtype
  q, k, v = _split_qkv(qkv, num_heads)
  q = q * jnp.asarray(scale, dtype)
  g = _split_heads(g.astype(dtype), num_heads)  # (B_, nh, N, hd)
  d_attn = jnp.matmul(g, common.row_major_swap(v), preferred_element_type=attn.dtype)
  d_logits = attn * (d_attn - jnp.sum(attn * d_attn, axis=-1, keepdims=True))  # softmax bwd
  d_logits_c = d_logits.astype(dtype)
  dq = jnp.matmul(d_logits_c, k) * jnp.asarray(scale, dtype)
  dk = jnp.matmul(common.row_major_swap(d_logits_c), q)
  dv = jnp.matmul(common.row_major_swap(attn.astype(dtype)), g)
  b_, n, c3 = qkv.shape
  dqkv = jnp.stack([dq, dk, dv], axis=0).transpose(1, 3, 0, 2, 4).reshape(b_, n, c3)
  # Materialised: otherwise XLA fuses the qkv bias gradient (a sum over windows and tokens) into
  # this transpose and runs it as a reduce-window over the head-major layout (~10 ms per Swin-S
  # stage-2 block instead of a plain column sum).
  dqkv = jax.lax.optimization_barrier(dqkv.astype(dtype))
  d_mask = None if mask is None else jnp.zeros_like(mask)
  return dqkv, jnp.sum(d_logits, axis=0), d_mask


window_attention_core.defvjp(_window_attention_core_fwd, _window_attention_core_bwd)


class WindowAttention(nnx.Module):
  """Multi-head self-attention inside ``ws x ws`` windows with a relative position bias.

  ``qkv`` output features are ``[q; k; v]``, each head-major (``head * hd + j``, ``hd = D / nh``);
  ``softmax(q * hd^-0.5 @ k^T + B + M) @ v``, heads concatenated head-major, then ``proj``.
  """

  def __init__(self, dim: int, window_size: int, num_heads: int, *, qkv_bias: bool = True,
               init: str = "swin", dtype=None, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"WindowAttention: dim={dim} is not divisible by num_heads={num_heads}")
    self.dim = dim
    self.window_size = window_size
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.dtype = dtype
    self.relative_position_bias_table = nnx.Param(common.normal_init(0.02)(
        rngs.params(), ((2 * window_size - 1) ** 2, num_heads), jnp.float32))
    self.qkv = swin_linear(dim, 3 * dim, use_bias=qkv_bias, init=init, dtype=dtype, rngs=rngs)
    self.proj = swin_linear(dim, dim, init=init, dtype=dtype, rngs=rngs)

  def relative_position_bias(self) -> Array:
    """The bias ``B`` of every head, ``(nh, ws*ws, ws*ws)`` float32."""
    index = relative_position_index(self.window_size).reshape(-1)
    n = self.window_size * self.window_size
    bias = self.relative_position_bias_table[...][index].reshape(n, n, self.num_heads)
    return bias.transpose(2, 0, 1)

  def __call__(self, windows: Array, mask: np.ndarray | None = None) -> Array:
    """Args:
      windows: ``(B * nW, N, D)`` tokens of every window (``N = ws*ws``), windows of one image
        consecutive.
      mask: optional additive mask ``(nW, N, N)``.

    Returns:
      ``(B * nW, N, D)``.
    """
    out = window_attention_core(self.qkv(windows), self.relative_position_bias(),
                                None if mask is None else jnp.asarray(mask), self.num_heads,
                                self.scale)
    return self.proj(out)


class Mlp(nnx.Module):
  """``fc2(GELU_exact(fc1(x)))`` on the last axis."""

  def __init__(self, in_features: int, hidden_features: int, *, init: str = "swin", dtype=None,
               rngs: nnx.Rngs):
    self.fc1 = swin_linear(in_features, hidden_features, init=init, dtype=dtype, rngs=rngs)
    self.fc2 = swin_linear(hidden_features, in_features, init=init, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    # fc2 and the GELU share one custom VJP that keeps only fc1's output for the backward.
    return common.gelu_then_linear(self.fc1(x), self.fc2)


def effective_window(resolution: tuple[int, int], window_size: int, shift_size: int
                     ) -> tuple[int, int]:
  """The originals' rule: if ``min(resolution) <= ws``, no shift and one window of the whole map."""
  if min(resolution) <= window_size:
    return min(resolution), 0
  return window_size, shift_size


class SwinTransformerBlock(nnx.Module):
  """Standard Swin block: ``x += DP(attn(LN1(x)))``, [temporal hook], ``x += DP(MLP(LN2(x)))``.

  ``__call__`` maps tokens ``(B, H'*W', D) -> (B, H'*W', D)``. The window size and shift follow
  ``effective_window`` (stored as ``self.window_size`` / ``self.shift_size``). The same
  ``drop_path`` module (one rate) serves both residual branches.

  Subclasses add temporal interaction by overriding ``temporal_interaction`` (applied to the
  tokens after the attention residual, before the MLP branch).
  """

  def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, *,
               window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
               qkv_bias: bool = True, drop_path: float = 0.0, init: str = "swin", dtype=None,
               rngs: nnx.Rngs):
    height, width = input_resolution
    ws, sh = effective_window((height, width), window_size, shift_size)
    if not 0 <= sh < ws:
      raise ValueError(f"SwinTransformerBlock: shift_size={shift_size} must be in [0, window_size="
                       f"{ws})")
    if height % ws or width % ws:
      raise ValueError(
          f"SwinTransformerBlock: resolution {height}x{width} is not divisible by the window size "
          f"{ws}; choose image_size / window_size so that every stage resolution is a multiple of "
          "the window (or not larger than it)")
    self.dim = dim
    self.input_resolution = (height, width)
    self.num_heads = num_heads
    self.window_size = ws
    self.shift_size = sh
    self.norm1 = swin_layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = WindowAttention(dim, ws, num_heads, qkv_bias=qkv_bias, init=init, dtype=dtype,
                                rngs=rngs)
    self.drop_path = common.DropPath(drop_path, rngs=rngs)
    self.norm2 = swin_layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), init=init, dtype=dtype, rngs=rngs)

  def attention_mask(self) -> np.ndarray | None:
    """The shifted-window mask ``(nW, ws*ws, ws*ws)``, or None when the block is not shifted."""
    if self.shift_size == 0:
      return None
    return shifted_window_mask(*self.input_resolution, self.window_size, self.shift_size)

  def _check_tokens(self, x: Array) -> None:
    height, width = self.input_resolution
    if x.ndim != 3 or x.shape[1] != height * width or x.shape[2] != self.dim:
      raise ValueError(f"{type(self).__name__}: expected tokens (B, {height * width}, {self.dim}) "
                       f"for a {height}x{width} map, got shape {x.shape}")

  def attention_branch(self, x: Array) -> Array:
    """``x + DP(W-MSA / SW-MSA(LN1(x)))`` on tokens ``(B, H'*W', D)``."""
    height, width = self.input_resolution
    b, _, c = x.shape
    y = self.norm1(x).reshape(b, height, width, c)
    sh, ws = self.shift_size, self.window_size
    if sh:
      y = jnp.roll(y, (-sh, -sh), axis=(1, 2))
    windows = self.attn(window_partition(y, ws), mask=self.attention_mask())
    y = window_reverse(windows, ws, height, width)
    if sh:
      y = jnp.roll(y, (sh, sh), axis=(1, 2))
    return x + self.drop_path(y.reshape(b, height * width, c))

  def mlp_branch(self, x: Array) -> Array:
    """``x + DP(MLP(LN2(x)))``."""
    return x + self.drop_path(self.mlp(self.norm2(x)))

  def temporal_interaction(self, x: Array) -> Array:
    """Hook between the two residual branches; identity in the plain (C2D) block."""
    return x

  def __call__(self, x: Array) -> Array:
    self._check_tokens(x)
    # The residual stream's gradient is materialised at every block input: otherwise XLA:CPU
    # fuses its sum over all later blocks into each consumer (see common.materialized_cotangent).
    x = common.materialized_cotangent(x)
    return self.mlp_branch(self.temporal_interaction(self.attention_branch(x)))


class PatchMerging(nnx.Module):
  """2x2 patch merging: ``(B, H'*W', D) -> (B, H'/2 * W'/2, 2D)``.

  Features of a merged token are ``[x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)]``
  (rows, cols), then ``LN(4D)`` and ``Linear(4D, 2D, no bias)``.
  """

  def __init__(self, input_resolution: tuple[int, int], dim: int, *, init: str = "swin",
               dtype=None, rngs: nnx.Rngs):
    height, width = input_resolution
    if height % 2 or width % 2:
      raise ValueError(f"PatchMerging: resolution {height}x{width} must be even in both axes")
    self.input_resolution = (height, width)
    self.dim = dim
    self.reduction = swin_linear(4 * dim, 2 * dim, use_bias=False, init=init, dtype=dtype,
                                 rngs=rngs)
    self.norm = swin_layer_norm(4 * dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    height, width = self.input_resolution
    b, l, c = x.shape
    if l != height * width or c != self.dim:
      raise ValueError(f"PatchMerging: expected tokens (B, {height * width}, {self.dim}), got "
                       f"{x.shape}")
    x = x.reshape(b, height, width, c)
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = x.reshape(b, (height // 2) * (width // 2), 4 * c)
    return self.reduction(self.norm(x))


class TubeletEmbed(nnx.Module):
  """Tubelet stem: clip ``(N, L, H, W, 3)`` -> tokens ``(N * T', (H/p) * (W/p), D)``.

  The clip is split into ``T' = L / early_stride`` consecutive groups of ``early_stride`` frames,
  folded into the batch (row ``n * T' + t``), and embedded by
  ``proj = Conv3d(3, D, kernel = stride = (early_stride, p, p), bias)`` (PyTorch default init).
  No LayerNorm follows (SPEC.md 4.4, 7.8).
  """

  def __init__(self, *, image_size: int, early_stride: int = 4, patch_size: int = 4,
               in_chans: int = 3, embed_dim: int, dtype=None, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"TubeletEmbed: image_size={image_size} is not divisible by patch_size="
                       f"{patch_size}")
    self.image_size = image_size
    self.early_stride = early_stride
    self.patch_size = patch_size
    self.in_chans = in_chans
    self.dtype = dtype
    kernel = (early_stride, patch_size, patch_size)
    self.proj = common.conv3d(in_chans, embed_dim, kernel, strides=kernel, use_bias=True,
                              dtype=dtype, rngs=rngs)

  def __call__(self, video: Array) -> Array:
    n, length, height, width, chans = video.shape
    if (height, width, chans) != (self.image_size, self.image_size, self.in_chans):
      raise ValueError(
          f"TubeletEmbed: expected a clip (N, L, {self.image_size}, {self.image_size}, "
          f"{self.in_chans}), got shape {video.shape}")
    if length % self.early_stride:
      raise ValueError(f"TubeletEmbed: clip length {length} is not divisible by early_stride="
                       f"{self.early_stride}")
    tubelets = length // self.early_stride
    x = video.reshape(n * tubelets, self.early_stride, height, width, chans)
    x = self.proj(x)  # (N*T', 1, H/p, W/p, D)
    return x.reshape(n * tubelets, -1, x.shape[-1])


class SwinStage(nnx.Module):
  """One Swin stage (PyTorch ``BasicLayer``): ``blocks`` then the optional ``downsample``.

  Args:
    blocks: the stage's blocks (shift 0 at even, ``ws // 2`` at odd indices, built by the caller).
    downsample: a ``PatchMerging`` or None.
    remat: rematerialise every block in the backward pass (``nnx.remat``).
  """

  def __init__(self, blocks: list[nnx.Module], downsample: PatchMerging | None, *,
               remat: bool = False):
    self.blocks = nnx.List(blocks)
    self.downsample = downsample
    self.remat = remat

  def __call__(self, x: Array) -> Array:
    for block in self.blocks:
      x = nnx.remat(_call_module)(block, x) if self.remat else block(x)
    if self.downsample is not None:
      x = self.downsample(x)
    return x


def _call_module(module: Callable[[Array], Array], x: Array) -> Array:
  return module(x)
