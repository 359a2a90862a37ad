"""The Dynamic Temporal Filtering block (DTF, ECCV 2022), SPEC.md section 3.2.

Channels-last: the block maps ``(B, T, H, W, C) -> (B, T, H, W, C)``. Per pixel it

1. correlates every frame with its previous frame in a KxK neighbourhood (raw scores ``r``),
2-4. aggregates the KxK neighbourhood with ``softmax(r)`` and adds the *next* frame's aggregate to
   each frame (``u``; ``dtf_jax.ops.frame_wise_aggregation``),
5. takes the orthonormal real FFT of ``u`` over time (F = T//2 + 1 frequencies),
6-7. generates a per-pixel complex filter from ``[u; r]`` with a 1x1 linear map (``filter_g``),
8. modulates the spectrum with it and mixes channels with a complex linear map (``linear1``),
9. normalises real and imaginary parts with one affine-less BatchNorm (``norm1.norm``),
10. returns ``x + irfft(alpha1 * V) + bias`` (the residual bypasses the aggregation).

Parameter tree (mirrors the PyTorch ``DTFBlock`` of the original code):

* ``weights_cor``: ``FrozenParam (T, K, K, C)`` = 1/C (PyTorch ``(C, T, K, K)``, transposed
  ``(1, 2, 3, 0)`` by the converter); read through ``stop_gradient``.
* ``filter_g/kernel``: ``((C + K*K) * T, O)``, ``O = 2*C*F // factor_g``; input feature ``j*T + t``
  is feature ``j`` (``u`` channels first, then the K*K correlation taps) of frame ``t``. PyTorch's
  ``filter_g.weight (O, (C+K*K)*T, 1, 1)`` converts with ``[:, :, 0, 0].T``.
* ``linear1/complex_weight``: real ``(C_out, C_in, 2)`` (PyTorch layout, no conversion):
  ``W[o, c] = cw[o, c, 0] + i*cw[o, c, 1]``.
* ``alpha1``, ``bias``: ``(C,)`` (PyTorch ``(1, C, 1, 1, 1)``).
* ``norm1/norm``: affine-less ``BatchNorm`` with batch stats ``mean``, ``var``,
  ``num_batches_tracked``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtf_jax import ops
from dtf_jax.layers import common

Array = jax.Array

_KERNEL_IMPLS = ("auto", "xla", "pallas")


def dtf_filter_outputs(dim: int, clip_len: int, factor_g: int = 16) -> int:
  """Output features ``O = 2*C*F // factor_g`` of ``filter_g`` (``F = clip_len//2 + 1``)."""
  return 2 * dim * (clip_len // 2 + 1) // factor_g


def check_dtf_shape(dim: int, clip_len: int, factor_g: int = 16, *, where: str = "DTFBlock") -> None:
  """Raises ``ValueError`` unless ``2*C*(T//2+1)`` is a multiple of ``factor_g`` (SPEC 7.18).

  The filter of ``O = 2*C*F/factor_g`` values is expanded ``factor_g``-fold and read as ``(C, F, 2)``,
  which only works when ``2*C*F`` is divisible by ``factor_g`` (``C*F % 8 == 0`` for 16).
  """
  freqs = clip_len // 2 + 1
  if (2 * dim * freqs) % factor_g:
    raise ValueError(
        f"{where}: DTF needs 2*C*(T//2+1) divisible by factor_g={factor_g}, got C={dim} channels, "
        f"T={clip_len} frames (2*{dim}*{freqs}={2 * dim * freqs}); choose a channel width or clip "
        f"length for which C*(T//2+1) is a multiple of {factor_g // 2} (e.g. C a multiple of 8)")


@functools.lru_cache(maxsize=None)
def real_dft_matrices(clip_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Orthonormal real DFT over ``T = clip_len`` frames as small constant matrices (float32).

  ``rfft(u, norm='ortho')_f = sum_t (fwd_re[f, t] + i*fwd_im[f, t]) * u_t`` for ``f < F = T//2 + 1``
  and ``irfft(V, n=T, norm='ortho')_t = sum_f inv_re[t, f] * Re V_f + inv_im[t, f] * Im V_f``
  (the imaginary parts of the DC and, for even T, Nyquist bins get weight exactly 0, as irfft
  ignores them). With T = 4 (every released model) these are 3 x 4 matrices: applying them as
  fused elementwise sums over the frames is far cheaper on XLA than an FFT along a non-minor axis
  (which needs transposes to and from the FFT layout).
  """
  t = np.arange(clip_len)
  f = np.arange(clip_len // 2 + 1)
  angle = 2.0 * np.pi * np.outer(f, t) / clip_len  # (F, T)
  scale = 1.0 / np.sqrt(clip_len)
  fwd_re, fwd_im = np.cos(angle) * scale, -np.sin(angle) * scale
  weight = np.where((f == 0) | (2 * f == clip_len), 1.0, 2.0)[:, None]  # DC / Nyquist counted once
  inv_re = (weight * np.cos(angle) * scale).T
  inv_im = (-weight * np.sin(angle) * scale).T
  inv_im[:, (f == 0) | (2 * f == clip_len)] = 0.0
  return tuple(m.astype(np.float32) for m in (fwd_re, fwd_im, inv_re, inv_im))


def _mix_frames(coefficients: np.ndarray, frames: list[Array]) -> list[Array]:
  """``out[i] = sum_j coefficients[i, j] * frames[j]`` with constant coefficients (zeros skipped)."""
  out = []
  for row in coefficients:
    terms = [float(c) * f for c, f in zip(row, frames) if c != 0.0]
    out.append(functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(frames[0]))
  return out


class ComplexLinear(nnx.Module):
  """Complex channel mixing ``V[..., o] = sum_c W[o, c] * P[..., c]`` without bias (``FFTLinear``).

  ``complex_weight``: real ``(C_out, C_in, 2)``, ``W = cw[..., 0] + i*cw[..., 1]``, init N(0, 0.02^2).
  Works on real/imaginary pairs of float32 arrays.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.complex_weight = nnx.Param(
        common.normal_init(0.02)(rngs.params(), (out_features, in_features, 2), jnp.float32))

  def __call__(self, real: Array, imag: Array) -> tuple[Array, Array]:
    """``real``, ``imag``: ``(..., C_in)`` float32 -> ``(..., C_out)`` real and imaginary parts."""
    mixed = self.mix_gauss_operands(self.gauss_operands(real, imag))
    return mixed[..., 0, :], mixed[..., 1, :]

  @staticmethod
  def gauss_operands(real: Array, imag: Array) -> Array:
    """``(3, ..., C_in)``: ``[p + q, p, q]`` for ``P = p + iq``, the left operands of Gauss's product.

    Callers that compute ``P`` in an elementwise pass build this stack in the same pass (the DTF
    block does), so the mix reads one array.
    """
    return jnp.stack([real + imag, real, imag])

  def mix_gauss_operands(self, operands: Array) -> Array:
    """``operands (3, ..., C_in)`` from ``gauss_operands`` -> ``(..., 2, C_out)``: ``[Re V, Im V]``.

    Three real products instead of four (Gauss): with ``W = A + iB`` and ``P = p + iq``,
    ``k1 = (p + q) A^T``, ``k2 = p (B - A)^T``, ``k3 = q (A + B)^T``, ``Re V = k1 - k3``,
    ``Im V = k1 + k2``: 25% fewer FLOPs forward and backward (the map is the DTF block's largest
    cost: 2 GFLOP per Swin-S stage-3 block step). The three products run as one batched matmul
    (forward) and two (backward) rather than three and six: at the DTF stage shapes each product
    is small (e.g. 4704 x 64 x 64), and XLA:CPU runs fewer, larger matmuls faster (one DTF-R50
    mix, forward + backward: 0.72-0.93x of three separate products). Rounding differs from the
    four-product form at float32 level (relative ~1e-7 of ``|A| |P|``).
    """
    w = self.complex_weight[...]
    a, b = w[..., 0], w[..., 1]  # (C_out, C_in)
    weights = jnp.stack([a, b - a, a + b])  # (3, C_out, C_in)
    lead = operands.shape[1:-1]
    rows = operands.reshape(3, -1, operands.shape[-1])  # (3, M, C_in)
    k = jax.lax.dot_general(rows, weights, (((2,), (2,)), ((0,), (0,))),
                            precision=jax.lax.Precision.HIGHEST)  # (3, M, C_out)
    mixed = jnp.stack([k[0] - k[2], k[0] + k[1]], axis=1)  # (M, 2, C_out)
    return mixed.reshape(lead + (2, a.shape[0]))


class FFTBatchNorm(nnx.Module):
  """Affine-less BatchNorm over real and imaginary parts together (``FFTBatchNorm``, SPEC 3.2 step 9).

  Per channel, one mean/variance over the ``2*B*F*H*W`` numbers ``{Re V, Im V}``; both parts are
  normalised with it. The BatchNorm lives at ``norm`` (PyTorch ``norm1.norm``).
  """

  def __init__(self, dim: int, *, group_size: int | None = None):
    self.norm = common.BatchNorm(dim, affine=False, group_size=group_size)

  def __call__(self, real: Array, imag: Array) -> tuple[Array, Array]:
    """``real``, ``imag``: ``(B, F, H, W, C)`` float32 -> normalised pair, same shapes."""
    both = jnp.stack([real, imag], axis=1)  # (B, 2, F, H, W, C): batch axis stays leading
    out = self.norm(both)
    return out[:, 0], out[:, 1]


class DTFBlock(nnx.Module):
  """Dynamic temporal filtering with a residual connection (SPEC 3.2).

  Args:
    dim: channels C.
    clip_len: frames T of the input (fixed: ``weights_cor`` and ``filter_g`` depend on it).
    kernel_size: spatial window K of the correlation / aggregation (3 in every released model).
    factor_g: filter compression factor; ``filter_g`` has ``2*C*F // factor_g`` outputs.
    kernel_impl: ``'auto' | 'xla' | 'pallas'``, passed to ``dtf_jax.ops``.
    bn_group_size: per-device batch of the originals' BatchNorm (``common.BatchNorm.group_size``);
      ``None`` = statistics over the whole batch.
    dtype: compute dtype of ``filter_g`` (``None`` = input dtype). The FFT, the spectral
      modulation, the complex linear map and the normalisation statistics always run in float32.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Call: ``x (B, T, H, W, C)`` with ``T == clip_len`` -> ``(B, T, H, W, C)`` in ``x.dtype``.
  """

  def __init__(
      self,
      dim: int,
      clip_len: int,
      *,
      kernel_size: int = 3,
      factor_g: int = 16,
      kernel_impl: str = "auto",
      bn_group_size: int | None = None,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    if dim < 1 or clip_len < 1:
      raise ValueError(f"DTFBlock needs dim >= 1 and clip_len >= 1, got dim={dim}, clip_len={clip_len}")
    if kernel_size < 1 or kernel_size % 2 == 0:
      raise ValueError(f"DTFBlock kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_impl not in _KERNEL_IMPLS:
      raise ValueError(f"kernel_impl must be one of {_KERNEL_IMPLS}, got {kernel_impl!r}")
    check_dtf_shape(dim, clip_len, factor_g, where=f"DTFBlock(dim={dim}, clip_len={clip_len})")
    self.dim = dim
    self.clip_len = clip_len
    self.kernel_size = kernel_size
    self.factor_g = factor_g
    self.kernel_impl = kernel_impl
    self.dtype = dtype
    self.num_freqs = clip_len // 2 + 1
    taps = kernel_size * kernel_size
    self.weights_cor = common.FrozenParam(
        jnp.full((clip_len, kernel_size, kernel_size, dim), 1.0 / dim, jnp.float32))
    self.filter_g = common.linear(
        (dim + taps) * clip_len,
        dtf_filter_outputs(dim, clip_len, factor_g),
        use_bias=False,
        kernel_init=common.kaiming_normal_fan_out(),
        dtype=dtype,
        rngs=rngs,
    )
    self.linear1 = ComplexLinear(dim, dim, rngs=rngs)
    self.alpha1 = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.norm1 = FFTBatchNorm(dim, group_size=bn_group_size)

  def __call__(self, x: Array) -> Array:
    if x.ndim != 5 or x.shape[1] != self.clip_len or x.shape[-1] != self.dim:
      raise ValueError(
          f"DTFBlock(dim={self.dim}, clip_len={self.clip_len}) expects input (B, {self.clip_len}, H, W, "
          f"{self.dim}), got shape {x.shape}; the clip length after the stem must equal the clip_len "
          "the block was built with")
    with jax.named_scope("DTFBlock"):  # op names carry the block and its phases (profile_step.py)
      return self._forward(x)

  def _forward(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    freqs = self.num_freqs
    weight = jax.lax.stop_gradient(self.weights_cor[...])
    # Steps 1-4: raw correlation r (B,T,H,W,K*K) and u = x + next frame's softmax aggregation.
    with jax.named_scope("frame_wise_aggregation"):
      u, r = ops.frame_wise_aggregation(
          x, weight, kernel_size=self.kernel_size, dilation=1, impl=self.kernel_impl)

    # Step 6: filter generation from z[j*T + t] = [u; r]_t[j] (feature-major, time-minor):
    # phi = sum_t u_t @ K_u[t] + r_t @ K_r[t] with the kernel rows regrouped per frame, two batched
    # matmuls over the T frames. No concatenated, transposed copy of [u; r] is made (that copy and
    # its inverse in the backward cost more than the matmul: filter generation alone, forward +
    # backward, 0.53-0.75x at the stage shapes with >= 14x14 maps, 0.95-1.08x at the smallest).
    with jax.named_scope("filter_generation"):
      cdtype = self.dtype or x.dtype
      kernel = self.filter_g.kernel[...].astype(cdtype)  # ((C+K*K)*T, O), row j*T + t
      per_frame = jnp.swapaxes(kernel.reshape(-1, t, kernel.shape[-1]), 0, 1)  # (T, C+K*K, O)
      frames_first = lambda a: jnp.moveaxis(a.astype(cdtype), 1, 0).reshape(t, b * h * w, -1)
      frame_products = lambda a, k: jax.lax.dot_general(  # (T, BHW, I) x (T, I, O) -> (T, BHW, O)
          a, k, (((2,), (1,)), ((0,), (0,)))).sum(axis=0)
      phi = (frame_products(frames_first(u), per_frame[:, :c])
             + frame_products(frames_first(r), per_frame[:, c:]))
      phi = phi.reshape(b, h, w, -1).astype(jnp.float32)  # (B, H, W, O)

      # Step 7: each entry repeated factor_g times, read as (C, F, 2) -> filter (B, H, W, F, C).
      psi = jnp.repeat(phi, self.factor_g, axis=-1).reshape(b, h, w, c, freqs, 2)
      psi = jnp.transpose(psi, (0, 1, 2, 4, 3, 5))
      psi_r, psi_i = psi[..., 0], psi[..., 1]

    # Step 5: orthonormal real DFT over time (constant 3x4 matrices for T = 4), float32,
    # frequency-major per pixel: (B, H, W, F, C).
    fwd_re, fwd_im, inv_re, inv_im = real_dft_matrices(t)
    frames = [u[:, i].astype(jnp.float32) for i in range(t)]  # T x (B, H, W, C)
    spec_r = jnp.stack(_mix_frames(fwd_re, frames), axis=3)
    spec_i = jnp.stack(_mix_frames(fwd_im, frames), axis=3)

    # Step 8: modulation, written straight into the operands of Gauss's product, then complex
    # channel mixing. The barriers keep XLA from recomputing the modulation and the
    # normalisation's backward inside the weight-gradient transposes.
    operands = jax.lax.optimization_barrier(self.linear1.gauss_operands(
        spec_r * psi_r - spec_i * psi_i, spec_r * psi_i + spec_i * psi_r))  # (3, B, H, W, F, C)
    with jax.named_scope("complex_mix"):
      mixed = self.linear1.mix_gauss_operands(operands)  # (B, H, W, F, 2, C)
    mixed = common.materialized_cotangent(mixed)

    # Step 9: one BatchNorm over real and imaginary parts (statistics over B, H, W, F, re/im).
    normed = self.norm1.norm(mixed.reshape(b, h, w, 2 * freqs, c)).reshape(b, h, w, freqs, 2, c)

    # Step 10: scale, inverse DFT, residual on the un-aggregated input, bias.
    alpha = self.alpha1[...]
    v_r = [normed[:, :, :, f, 0] * alpha for f in range(freqs)]
    v_i = [normed[:, :, :, f, 1] * alpha for f in range(freqs)]
    y = jnp.stack([re + im for re, im in zip(_mix_frames(inv_re, v_r), _mix_frames(inv_im, v_i))],
                  axis=1)  # (B, T, H, W, C) float32
    out = x.astype(jnp.float32) + y + self.bias[...]
    return out.astype(x.dtype)
