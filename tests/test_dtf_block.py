"""DTF block (SPEC.md 3.2): numerical parity with a PyTorch reference written from the spec.

The reference (``tests/torch_reference/dtf_block.py``) is channels-first, uses torch's complex FFT
and the literal tap loops of ``torch_reference.temporal_ops``; weights are randomised in torch
(every parameter, the frozen ``weights_cor`` and the BatchNorm running statistics) and copied across.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dtf_jax.layers import common
from dtf_jax.layers.dtf_block import ComplexLinear, DTFBlock
from torch_reference import dtf_block as tdtf
from torch_reference.flax_copy import copy_torch_to_flax, flax_batch_stats_as_torch, randomize_torch

ATOL = 1e-5
GRAD_RTOL = 1e-5  # gradients are sums over up to B*T*H*W terms of size O(10)


@nnx.jit
def apply(block, x):
  """Jitted call (one compile per block structure and mode: far cheaper than eager op-by-op)."""
  return block(x)


def rbg_rngs(seed: int = 0) -> nnx.Rngs:
  # rbg keys: fast to compile on CPU (threefry compiles slowly for many small shapes).
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def to_torch_layout(x: np.ndarray) -> torch.Tensor:
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # NTHWC -> NCTHW


def from_torch_layout(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 4, 1)


def make_pair(dim: int, clip_len: int, seed: int):
  tblock = tdtf.DTFBlock(dim, clip_len)
  randomize_torch(tblock, seed)
  jblock = DTFBlock(dim, clip_len, kernel_impl="xla", rngs=rbg_rngs(seed))
  copy_torch_to_flax(tblock, jblock)
  return tblock, jblock


def assert_close(a, b, what, atol=ATOL, rtol=0.0):
  """``max|a - b| <= atol + rtol * max|b|`` (rtol for gradients: sums over many float32 terms)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  bound = atol + rtol * float(np.max(np.abs(b)))
  assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("clip_len,dim", [(2, 4), (4, 8), (5, 8)])
def test_dtf_block_matches_torch_train_then_eval(clip_len, dim):
  rng = np.random.default_rng(clip_len)
  tblock, jblock = make_pair(dim, clip_len, seed=clip_len)
  x = rng.normal(size=(2, clip_len, 5, 6, dim)).astype(np.float32)
  cot = rng.normal(size=x.shape).astype(np.float32)

  # Train mode: output, input gradient, parameter gradients, running statistics.
  tblock.train()
  xt = to_torch_layout(x).requires_grad_(True)
  yt = tblock(xt)
  (yt * to_torch_layout(cot)).sum().backward()

  def loss(block, xj, cotangent):
    return jnp.sum(block(xj) * cotangent)

  yj = apply(jblock, jnp.asarray(x))  # separate call: the grad call below updates the stats once more
  assert_close(yj, from_torch_layout(yt), "train output")
  grad_fn = nnx.jit(nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1)))
  gparams, gx = grad_fn(jblock, jnp.asarray(x), jnp.asarray(cot))
  assert_close(gx, from_torch_layout(xt.grad), "input gradient", rtol=GRAD_RTOL)
  assert_close(gparams["alpha1"][...], tblock.alpha1.grad.reshape(-1), "alpha1 gradient", rtol=GRAD_RTOL)
  assert_close(gparams["bias"][...], tblock.bias.grad.reshape(-1), "bias gradient", rtol=GRAD_RTOL)
  assert_close(gparams["linear1"]["complex_weight"][...], tblock.linear1.complex_weight.grad,
               "complex_weight gradient", rtol=GRAD_RTOL)
  assert_close(gparams["filter_g"]["kernel"][...], tblock.filter_g.weight.grad[:, :, 0, 0].T,
               "filter_g gradient", rtol=GRAD_RTOL)
  assert "weights_cor" not in gparams  # frozen: not differentiated

  # Running stats: torch saw one train forward; replay one on a fresh copy for the JAX side.
  tblock2, jblock2 = make_pair(dim, clip_len, seed=clip_len)
  with torch.no_grad():
    tblock2.train()(to_torch_layout(x))
  apply(jblock2, jnp.asarray(x))
  stats = flax_batch_stats_as_torch(jblock2)
  for key in ("norm1.norm.running_mean", "norm1.norm.running_var"):
    assert_close(stats[key], tblock2.state_dict()[key], key)
  assert int(stats["norm1.norm.num_batches_tracked"]) == 4  # 3 (randomised) + 1

  # Eval mode with the updated (non-trivial) running statistics.
  tblock2.eval()
  jblock2.eval()
  x2 = rng.normal(size=x.shape).astype(np.float32)
  with torch.no_grad():
    yt2 = tblock2(to_torch_layout(x2))
  assert_close(apply(jblock2, jnp.asarray(x2)), from_torch_layout(yt2), "eval output")


def test_complex_linear_value_and_gradients_match_complex128_numpy():
  # V = P W^T with W = A + iB; for L = sum(Re V * g_re + Im V * g_im) and H = conj(G) W:
  # dL/dRe P = Re H, dL/dIm P = -Im H, dL/dA = Re(conj(G)^T P), dL/dB = -Im(conj(G)^T P).
  # C_out != C_in and odd leading dims catch a transposed or misbatched Gauss product.
  c_in, c_out = 12, 20
  rng = np.random.default_rng(11)
  layer = ComplexLinear(c_in, c_out, rngs=rbg_rngs(11))
  cw = rng.normal(size=(c_out, c_in, 2)).astype(np.float32)
  layer.complex_weight[...] = jnp.asarray(cw)
  p, q = (rng.normal(size=(2, 3, 5, c_in)).astype(np.float32) for _ in range(2))
  g_re, g_im = (rng.normal(size=(2, 3, 5, c_out)).astype(np.float32) for _ in range(2))

  w = cw[..., 0].astype(np.float64) + 1j * cw[..., 1]
  big_p = p.astype(np.float64) + 1j * q
  big_g = g_re.astype(np.float64) + 1j * g_im
  v = big_p @ w.T
  re, im = layer(jnp.asarray(p), jnp.asarray(q))
  np.testing.assert_allclose(np.asarray(re), v.real, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(im), v.imag, rtol=1e-5, atol=1e-4)

  def loss(layer, p, q):
    re, im = layer(p, q)
    return jnp.sum(re * g_re) + jnp.sum(im * g_im)

  d_layer, d_p, d_q = nnx.grad(loss, argnums=(0, 1, 2))(layer, jnp.asarray(p), jnp.asarray(q))
  d_w = d_layer["complex_weight"][...]
  h = np.conj(big_g) @ w
  outer = np.conj(big_g).reshape(-1, c_out).T @ big_p.reshape(-1, c_in)  # sum over rows
  np.testing.assert_allclose(np.asarray(d_p), h.real, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(d_q), -h.imag, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(d_w[..., 0]), outer.real, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(d_w[..., 1]), -outer.imag, rtol=1e-5, atol=1e-3)


def test_dtf_block_is_identity_at_init_and_init_statistics():
  dim, clip_len = 32, 4
  block = DTFBlock(dim, clip_len, rngs=rbg_rngs(3))
  x = np.random.default_rng(0).normal(size=(1, clip_len, 3, 3, dim)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(apply(block, jnp.asarray(x))), x)  # alpha1 = bias = 0
  np.testing.assert_array_equal(np.asarray(block.weights_cor[...]),
                                np.full((4, 3, 3, dim), 1 / dim, np.float32))
  assert isinstance(block.weights_cor, common.FrozenParam)
  cw = np.asarray(block.linear1.complex_weight[...])
  assert cw.shape == (dim, dim, 2) and abs(cw.std() - 0.02) < 0.001 and abs(cw.mean()) < 0.001
  kernel = np.asarray(block.filter_g.kernel[...])
  freqs = clip_len // 2 + 1
  out = 2 * dim * freqs // 16
  assert kernel.shape == ((dim + 9) * clip_len, out)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / out), rtol=0.05)  # Kaiming fan-out
  assert not hasattr(block.norm1.norm, "scale")  # affine-less


def test_dtf_block_batch_norm_groups_match_per_group_torch_calls():
  dim, clip_len = 8, 4
  tblock = tdtf.DTFBlock(dim, clip_len)
  randomize_torch(tblock, 7)
  jblock = DTFBlock(dim, clip_len, bn_group_size=2, kernel_impl="xla", rngs=rbg_rngs(7))
  copy_torch_to_flax(tblock, jblock)
  x = np.random.default_rng(7).normal(size=(4, clip_len, 4, 4, dim)).astype(np.float32)
  with torch.no_grad():
    halves = [from_torch_layout(tblock.train()(to_torch_layout(x[i:i + 2]))) for i in (0, 2)]
  assert_close(apply(jblock, jnp.asarray(x)), np.concatenate(halves), "grouped BN output")


def test_dtf_block_bfloat16_and_jit():
  dim, clip_len = 8, 4
  tblock, jblock = make_pair(dim, clip_len, seed=11)
  x = np.random.default_rng(11).normal(size=(2, clip_len, 4, 4, dim)).astype(np.float32)
  jblock.eval()
  ref = np.asarray(apply(jblock, jnp.asarray(x)))
  assert_close(jblock(jnp.asarray(x)), ref, "eager vs jit", atol=1e-5)
  bblock = DTFBlock(dim, clip_len, dtype=jnp.bfloat16, kernel_impl="xla", rngs=rbg_rngs(11))
  copy_torch_to_flax(tblock, bblock)
  bblock.eval()
  out = apply(bblock, jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(np.max(np.abs(ref)))


def test_dtf_block_validation_errors():
  with pytest.raises(ValueError, match="divisible"):
    DTFBlock(4, 4, rngs=rbg_rngs())  # C*F = 4*3 = 12 is not a multiple of 8
  with pytest.raises(ValueError, match="kernel_impl"):
    DTFBlock(8, 4, kernel_impl="cuda", rngs=rbg_rngs())
  block = DTFBlock(8, 4, rngs=rbg_rngs())
  with pytest.raises(ValueError, match="clip_len=4"):
    block(jnp.zeros((1, 5, 3, 3, 8)))
  with pytest.raises(ValueError, match="expects input"):
    block(jnp.zeros((1, 4, 3, 3, 16)))
