"""Swin blocks with temporal interaction: DTF-Swin (SPEC.md 3.7) and SIFA-Swin (SPEC.md 3.8).

Both blocks see tokens ``(N * T', H'*W', D)`` with rows ``n * T' + t`` and view them logically as a
clip ``(N, T', H', W', D)`` (the originals' GPU kernels saw a scrambled buffer instead, SPEC.md
2.7; this port implements the logical semantics).

Extra parameters (kept even where the forward never reads them, SPEC.md 7.7):

* ``DTFSwinTransformerBlock``: ``dtf_block`` (``DTFBlock(D, clip_len)``, K = 3) and ``conv``
  (the originals' ``Conv2d(D, D, [1, 3])``, unused).
* ``SIFASwinTransformerBlock``: ``def_cor/weight`` (FrozenParam ``(T', K, K, D)`` = 1/D; PyTorch
  ``(D, T', K, K)``), ``conv`` (temporal conv, read by shifted blocks) and ``tda_norm``
  (LayerNorm initialised to weight 0, bias 0, read by unshifted blocks).

``conv/kernel`` is a Flax ``Conv`` kernel ``(1, 3, D_in, D_out)`` applied to the tokens laid out
``(N, L, T', D)``: tap ``j`` reads tubelet ``t + j - 1`` (zero padded), exactly the originals'
``Conv2d`` on ``(N, D, L, T')``; the PyTorch weight ``(O, I, 1, 3)`` converts with
``transpose(2, 3, 1, 0)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax import ops
from dtf_jax.layers import common
from dtf_jax.layers.dtf_block import DTFBlock
from dtf_jax.layers.swin import SwinTransformerBlock, swin_layer_norm

Array = jax.Array


def temporal_tubelet_conv(dim: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
  """The blocks' ``conv``: PyTorch ``Conv2d(D, D, [1, 3], padding [0, 1], no bias)``, default init.

  Applied to ``(N, L, T', D)``: a 3-tap convolution over the tubelet axis per token.
  """
  return nnx.Conv(dim, dim, (1, 3), padding=((0, 0), (1, 1)), use_bias=False,
                  kernel_init=common.torch_default_kernel_init(), dtype=dtype,
                  param_dtype=jnp.float32, rngs=rngs)


class CorrelationWeight(nnx.Module):
  """Holds the frozen correlation weight ``weight (T, K, K, C)`` = 1/C (SIFA ``DefCorFixW``).

  The PyTorch parameter is ``def_cor.weight (C, T, K, K)`` with ``requires_grad=False``; it is a
  ``FrozenParam`` here (saved, counted, never optimised) and read through ``stop_gradient``.
  """

  def __init__(self, channels: int, clip_len: int, kernel_size: int):
    self.weight = common.FrozenParam(
        jnp.full((clip_len, kernel_size, kernel_size, channels), 1.0 / channels, jnp.float32))

  def __call__(self) -> Array:
    return jax.lax.stop_gradient(self.weight[...])


class _ClipBlockMixin:
  """Token <-> clip views shared by the temporal Swin blocks."""

  clip_len: int
  input_resolution: tuple[int, int]

  def _to_clip(self, x: Array) -> Array:
    """``(N*T', H'*W', D) -> (N, T', H', W', D)`` (rows ``n*T' + t``)."""
    rows, _, c = x.shape
    if rows % self.clip_len:
      raise ValueError(
          f"{type(self).__name__}: {rows} token rows are not a multiple of clip_len={self.clip_len}; "
          "the tubelet count T' = clip_length / early_stride must equal the block's clip_len")
    height, width = self.input_resolution
    return x.reshape(rows // self.clip_len, self.clip_len, height, width, c)

  @staticmethod
  def _to_tokens(x: Array) -> Array:
    n, t, h, w, c = x.shape
    return x.reshape(n * t, h * w, c)


class DTFSwinTransformerBlock(_ClipBlockMixin, SwinTransformerBlock):
  """Swin block with a DTF block after the attention residual in unshifted blocks (SPEC.md 3.7).

  Forward: ``x += DP(attn(LN1(x)))``; if ``shift_size == 0``: ``x = DTF(x viewed (N, T', H', W', D))``
  (DTF includes its own residual); ``x += DP(MLP(LN2(x)))``. Shifted blocks own an unused
  ``dtf_block``; every block owns an unused ``conv``.

  Args (beyond ``SwinTransformerBlock``):
    clip_len: tubelets T' per clip (``clip_length // early_stride``).
    kernel_impl: ``'auto' | 'xla' | 'pallas'`` for the DTF ops.
    bn_group_size: per-device batch of DTF's BatchNorm statistics (None = whole batch).
  """

  def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, *,
               clip_len: int, kernel_impl: str = "auto", bn_group_size: int | None = None,
               dtype=None, rngs: nnx.Rngs, **block_kwargs):
    super().__init__(dim, input_resolution, num_heads, dtype=dtype, rngs=rngs, **block_kwargs)
    self.clip_len = clip_len
    self.conv = temporal_tubelet_conv(dim, dtype=dtype, rngs=rngs)
    self.dtf_block = DTFBlock(dim, clip_len, kernel_size=3, kernel_impl=kernel_impl,
                              bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)

  def temporal_interaction(self, x: Array) -> Array:
    if self.shift_size:
      return x
    return self._to_tokens(self.dtf_block(self._to_clip(x)))


class SIFASwinTransformerBlock(_ClipBlockMixin, SwinTransformerBlock):
  """Swin block with SIFA's inter-frame attention (SPEC.md 3.8).

  After ``x += DP(attn(LN1(x)))``:

  * ``shift_size == 0`` (``forward_rtc``): with ``o = x`` viewed ``(N, T', H', W', D)``,
    ``rho_t = corr(o_{max(t-1,0)} at (h, w), o_t in the KxK window)`` weighted by ``def_cor``
    (``ops.temporal_correlation``), ``m_t = sum_k rho_t,k * o_t(window tap k)``
    (``ops.temporal_aggregation``, **no softmax**; both in one op,
    ``ops.temporal_correlation_aggregation``), ``s_t = m_{t+1}`` for ``t < T'-1``,
    ``s_{T'-1} = 0``, ``x += tda_norm(s)``. The originals' offsets are always zero (SPEC.md 7.3), so
    this is the non-deformable local correlation; the originals' forward-shifted copy only fed a
    discarded gating term, so ``sifa_prev_frame`` (SPEC.md 2.6) has no counterpart here.
  * ``shift_size > 0`` (``forward_vtc``): ``x += conv(x)`` with the 3-tap temporal ``conv``.

  Then ``x += DP(MLP(LN2(x)))``.

  Args (beyond ``SwinTransformerBlock``):
    clip_len: tubelets T' per clip.
    sifa_kernel: spatial window K of the correlation (3 in released models).
    kernel_impl: ``'auto' | 'xla' | 'pallas'`` for the ops.
  """

  def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, *,
               clip_len: int, sifa_kernel: int = 3, kernel_impl: str = "auto",
               dtype=None, rngs: nnx.Rngs, **block_kwargs):
    super().__init__(dim, input_resolution, num_heads, dtype=dtype, rngs=rngs, **block_kwargs)
    if not isinstance(sifa_kernel, int) or sifa_kernel < 1 or sifa_kernel % 2 == 0:
      raise ValueError(f"SIFASwinTransformerBlock: sifa_kernel must be a positive odd int (the "
                       f"correlation window K), got {sifa_kernel!r}")
    self.clip_len = clip_len
    self.sifa_kernel = sifa_kernel
    self.kernel_impl = kernel_impl
    self.def_cor = CorrelationWeight(dim, clip_len, sifa_kernel)
    self.conv = temporal_tubelet_conv(dim, dtype=dtype, rngs=rngs)
    self.tda_norm = swin_layer_norm(dim, zero_init=True, dtype=dtype, rngs=rngs)

  def inter_frame_attention(self, x: Array) -> Array:
    """``forward_rtc`` without the residual: ``tda_norm(s)`` on tokens ``(N*T', L, D)``."""
    clip = self._to_clip(x)
    k = self.sifa_kernel
    weight = self.def_cor()  # float32; the ops compute in float32 and return clip.dtype
    m = ops.temporal_correlation_aggregation(clip, weight, kernel_size=k, impl=self.kernel_impl)
    s = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    return self.tda_norm(self._to_tokens(s.astype(x.dtype)))

  def tubelet_conv(self, x: Array) -> Array:
    """``forward_vtc``: the 3-tap temporal conv of the tokens, ``(N*T', L, D)``.

    ``y_t = x_{t-1} @ W_0 + x_t @ W_1 + x_{t+1} @ W_2`` (zero outside the clip) with
    ``W_j = conv.kernel[0, j]``: matmuls on the token rows as they are laid out, shifted along
    the tubelet axis afterwards, instead of transposing the tokens to ``(N, L, T', D)`` for a
    (1, 3) convolution and back (four full transposes per block with the backward pass). The edge
    taps multiply only the T'-1 frames whose products are used (the zero padding's products are
    not computed): 5/6 of the full taps' FLOPs at T' = 4, forward and backward.
    """
    rows, length, c = x.shape
    n, t = rows // self.clip_len, self.clip_len
    kernel = self.conv.kernel[...]  # (1, 3, D_in, D_out)
    dtype = self.conv.dtype or jnp.result_type(x, kernel)
    frames = x.astype(dtype).reshape(n, t, length, c)
    weights = [kernel[0, j].astype(dtype) for j in range(3)]
    y = jnp.matmul(frames, weights[1])  # (N, T', L, D)
    if t > 1:
      from_previous = jnp.matmul(frames[:, :-1], weights[0])  # lands on frames 1 .. T'-1
      from_next = jnp.matmul(frames[:, 1:], weights[2])  # lands on frames 0 .. T'-2
      zero = jnp.zeros_like(y[:, :1])
      y = (y + jnp.concatenate([zero, from_previous], axis=1)
           + jnp.concatenate([from_next, zero], axis=1))
    return y.reshape(rows, length, -1)

  def temporal_interaction(self, x: Array) -> Array:
    if self.shift_size:
      self._to_clip(x)  # validates the row count
      return x + self.tubelet_conv(x)
    return x + self.inter_frame_attention(x)
