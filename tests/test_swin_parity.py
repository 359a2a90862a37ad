"""Numerical parity of the Swin pieces with a PyTorch reference written from SPEC.md.

The reference (``tests/torch_reference/swin.py``) uses the originals' module names, so its
``state_dict`` keys are SPEC.md 5.1's; ``copy_torch_weights`` maps them onto the Flax tree (a small
stand-in for the converter). Every parameter is randomised first (including zero-initialised ones
such as ``tda_norm`` and the frozen correlation weights), inputs are random, and outputs plus input
gradients must agree to 1e-5 in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax.layers import common
from dtf_jax.layers import swin as jswin
from torch_reference import swin as tswin

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Weight copy (torch state_dict -> Flax tree) and helpers.
# ----------------------------------------------------------------------------------------------

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                  "var": "running_var"}
_TORCH_BUFFERS = ("relative_position_index", "attn_mask")


def _torch_to_flax_value(leaf: str, value: np.ndarray) -> np.ndarray:
  """Layout change of one tensor (SPEC.md 1.2)."""
  if leaf == "kernel":
    if value.ndim == 2:                       # Linear (O, I) -> (I, O)
      return value.T
    if value.ndim == 5:                       # Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)
      return value.transpose(2, 3, 4, 1, 0)
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # filter_g 1x1 Conv2d -> Dense (I, O)
      return value[:, :, 0, 0].T
    if value.ndim == 4:                       # Conv2d [1, 3] (O, I, 1, 3) -> (1, 3, I, O)
      return value.transpose(2, 3, 1, 0)
  if leaf in ("weights_cor", "weight") and value.ndim == 4:  # (C, T, K, K) -> (T, K, K, C)
    return value.transpose(1, 2, 3, 0)
  if leaf in ("alpha1", "bias") and value.ndim == 5:          # (1, C, 1, 1, 1) -> (C,)
    return value.reshape(-1)
  return value


def copy_torch_weights(flax_module: nnx.Module, torch_module: torch.nn.Module) -> None:
  """Copies every parameter / BatchNorm buffer of ``torch_module`` into ``flax_module`` in place.

  Raises if a Flax variable has no torch counterpart, shapes disagree, or a torch tensor (other
  than the recomputed ``relative_position_index`` / ``attn_mask`` buffers) is left over.
  """
  # np.array copies: jnp.asarray of a torch-backed NumPy view may alias the torch buffer, and a
  # later in-place torch update (BatchNorm running stats) would then silently change the Flax copy.
  sd = {k: np.array(v.detach().cpu().numpy(), copy=True)
        for k, v in torch_module.state_dict().items()}
  flat = nnx.to_flat_state(nnx.state(flax_module, nnx.Any(nnx.Param, common.FrozenParam, nnx.BatchStat)))
  used = set()
  for path, variable in flat:
    parts = [str(p) for p in path]
    leaf = parts[-1]
    key = ".".join(parts[:-1] + [_LEAF_TO_TORCH.get(leaf, leaf)])
    if key not in sd:
      raise KeyError(f"no torch tensor {key!r} for Flax variable {'/'.join(parts)}")
    value = _torch_to_flax_value(leaf, sd[key])
    target = flax_module
    for p in path[:-1]:
      target = target[p] if isinstance(p, int) else getattr(target, p)
    var = getattr(target, leaf)
    if tuple(var[...].shape) != value.shape:
      raise ValueError(f"{key}: torch {sd[key].shape} -> {value.shape}, Flax {var[...].shape}")
    var[...] = jnp.asarray(value, var[...].dtype)
    used.add(key)
  left = [k for k in sd if k not in used and not k.endswith(_TORCH_BUFFERS)]
  if left:
    raise KeyError(f"torch tensors without a Flax counterpart: {left}")


def randomize_torch(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
  """Random values for every parameter (frozen ones too) and BatchNorm running statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
      if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "tda_norm.weight",
                        "def_cor.weight", "weights_cor")):
        p.add_(1.0)  # around the natural scale (frozen correlation weights: ~1, not 1/C)
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def _run_both(flax_fn, torch_fn, x_np: np.ndarray, cot_np: np.ndarray):
  """Outputs and input gradients of ``sum(f(x) * cot)`` in both frameworks."""
  xt = torch.tensor(x_np, requires_grad=True)
  yt = torch_fn(xt)
  (yt * torch.tensor(cot_np)).sum().backward()
  if isinstance(flax_fn, nnx.Module):  # functional copy, so training-mode state updates are local
    graphdef, state = nnx.split(flax_fn)
    flax_fn = lambda x: nnx.merge(graphdef, state, copy=True)(x)  # noqa: E731
  yj, vjp = jax.vjp(flax_fn, jnp.asarray(x_np))
  (gj,) = vjp(jnp.asarray(cot_np, yj.dtype))
  return (np.asarray(yj), yt.detach().numpy()), (np.asarray(gj), xt.grad.numpy())


def _assert_close(pair, atol=ATOL, what="", relative=False):
  """Max abs diff <= atol (``relative``: atol * max(1, max |reference|), for gradients)."""
  a, b = pair
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = np.max(np.abs(a - b))
  bound = atol * max(1.0, float(np.max(np.abs(b)))) if relative else atol
  assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


def _rand(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Constants.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ws", [2, 3, 7])
def test_relative_position_index_matches_reference(ws):
  np.testing.assert_array_equal(jswin.relative_position_index(ws),
                                tswin.relative_position_index(ws).numpy())


@pytest.mark.parametrize("size,ws,sh", [(8, 4, 2), (8, 2, 1), (56, 7, 3), (28, 7, 3)])
def test_shifted_window_mask_matches_reference(size, ws, sh):
  mask = jswin.shifted_window_mask(size, size, ws, sh)
  np.testing.assert_array_equal(mask, tswin.shifted_window_mask(size, size, ws, sh).numpy())
  assert mask.shape == ((size // ws) ** 2, ws * ws, ws * ws)
  assert set(np.unique(mask)) <= {0.0, -100.0}


def test_window_partition_roundtrip():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3))
  w = jswin.window_partition(x, 4)
  assert w.shape == (2 * 6, 16, 3)
  np.testing.assert_array_equal(w[1].reshape(4, 4, 3), x[0, 0:4, 4:8])  # row-major windows
  np.testing.assert_array_equal(jswin.window_reverse(w, 4, 8, 12), x)


# ----------------------------------------------------------------------------------------------
# Block-level parity.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res,ws,shift", [(8, 4, 2), (8, 4, 0), (4, 7, 3)],
                         ids=["shifted-masked", "unshifted", "window-clamped"])
def test_swin_block_parity(res, ws, shift):
  dim, heads, rows = 16, 2, 3
  tblock = tswin.SwinTransformerBlock(dim, (res, res), heads, window_size=ws, shift_size=shift,
                                      drop_path=0.1).eval()
  randomize_torch(tblock, seed=1)
  jblock = jswin.SwinTransformerBlock(dim, (res, res), heads, window_size=ws, shift_size=shift,
                                      drop_path=0.1, rngs=nnx.Rngs(0))
  copy_torch_weights(jblock, tblock)
  jblock.eval()
  assert (jblock.window_size, jblock.shift_size) == (tblock.window_size, tblock.shift_size)
  rng = np.random.default_rng(2)
  x, cot = _rand(rng, rows, res * res, dim), _rand(rng, rows, res * res, dim)
  outs, grads = _run_both(jblock, tblock, x, cot)
  _assert_close(outs, what="output")
  _assert_close(grads, what="input gradient", relative=True)


def test_patch_merging_parity():
  res, dim = 6, 8
  tmod = tswin.PatchMerging((res, res), dim)
  randomize_torch(tmod, seed=3)
  jmod = jswin.PatchMerging((res, res), dim, rngs=nnx.Rngs(0))
  copy_torch_weights(jmod, tmod)
  rng = np.random.default_rng(4)
  x, cot = _rand(rng, 2, res * res, dim), _rand(rng, 2, (res // 2) ** 2, 2 * dim)
  outs, grads = _run_both(jmod, tmod, x, cot)
  _assert_close(outs, what="output")
  _assert_close(grads, what="input gradient", relative=True)


def test_tubelet_embed_parity():
  n, length, size, dim = 2, 8, 16, 8
  tmod = tswin.TubeletEmbed(img_size=size, early_stride=4, patch_size=4, embed_dim=dim)
  randomize_torch(tmod, seed=5)
  jmod = jswin.TubeletEmbed(image_size=size, early_stride=4, patch_size=4, embed_dim=dim,
                            rngs=nnx.Rngs(0))
  copy_torch_weights(jmod, tmod)
  rng = np.random.default_rng(6)
  video = _rand(rng, n, length, size, size, 3)  # (N, L, H, W, 3)

  def torch_fn(v):  # the originals' fold: (N, 3, L, H, W) -> rows n*T' + t of 4 frames
    v = v.permute(0, 4, 1, 2, 3)
    t = length // 4
    v = v.reshape(n, 3, t, 4, size, size).transpose(1, 2).reshape(n * t, 3, 4, size, size)
    return tmod(v)

  cot = _rand(rng, n * length // 4, (size // 4) ** 2, dim)
  outs, grads = _run_both(jmod, torch_fn, video, cot)
  _assert_close(outs, what="tokens")
  _assert_close(grads, what="input gradient", relative=True)


# ----------------------------------------------------------------------------------------------
# Temporal Swin blocks.
# ----------------------------------------------------------------------------------------------

def _token_batch(rng, clips, clip_len, res, dim):
  return _rand(rng, clips * clip_len, res * res, dim)


@pytest.mark.parametrize("shift,kernel", [(0, 3), (2, 3), (0, 1)], ids=["rtc", "vtc", "rtc-K1"])
def test_sifa_swin_block_parity(shift, kernel):
  from dtf_jax.layers.swin_temporal import SIFASwinTransformerBlock
  dim, heads, res, ws, clips, clip_len = 8, 2, 8, 4, 2, 3
  tblock = tswin.SIFASwinTransformerBlock(dim, (res, res), heads, K=kernel, clip_len=clip_len,
                                          window_size=ws, shift_size=shift).eval()
  randomize_torch(tblock, seed=7)
  jblock = SIFASwinTransformerBlock(dim, (res, res), heads, clip_len=clip_len, sifa_kernel=kernel,
                                    window_size=ws, shift_size=shift, rngs=nnx.Rngs(0))
  copy_torch_weights(jblock, tblock)
  jblock.eval()
  rng = np.random.default_rng(8)
  x = _token_batch(rng, clips, clip_len, res, dim)
  cot = _rand(rng, *x.shape)
  outs, grads = _run_both(jblock, tblock, x, cot)
  _assert_close(outs, what="output")
  _assert_close(grads, what="input gradient", relative=True)
  # The temporal path is live: the output differs from the plain Swin block's.
  plain = np.asarray(jblock.mlp_branch(jblock.attention_branch(jnp.asarray(x))))
  assert np.max(np.abs(plain - outs[0])) > 1e-2


@pytest.mark.parametrize("shift,train", [(0, False), (0, True), (2, False)],
                         ids=["dtf-eval", "dtf-train", "shifted-no-dtf"])
def test_dtf_swin_block_parity(shift, train):
  from dtf_jax.layers.swin_temporal import DTFSwinTransformerBlock
  dim, heads, res, ws, clips, clip_len = 16, 2, 8, 4, 2, 4
  tblock = tswin.DTFSwinTransformerBlock(dim, (res, res), heads, clip_len=clip_len, window_size=ws,
                                         shift_size=shift)
  randomize_torch(tblock, seed=9)
  tblock.train(train)
  jblock = DTFSwinTransformerBlock(dim, (res, res), heads, clip_len=clip_len, window_size=ws,
                                   shift_size=shift, rngs=nnx.Rngs(0))
  copy_torch_weights(jblock, tblock)
  jblock.train() if train else jblock.eval()
  rng = np.random.default_rng(10)
  x = _token_batch(rng, clips, clip_len, res, dim)
  cot = _rand(rng, *x.shape)
  outs, grads = _run_both(jblock, tblock, x, cot)
  _assert_close(outs, what="output")
  _assert_close(grads, what="input gradient", relative=True)
  plain = np.asarray(jblock.mlp_branch(jblock.attention_branch(jnp.asarray(x))))
  assert (np.max(np.abs(plain - outs[0])) > 1e-2) == (shift == 0)
  if train:  # one training forward updates the BatchNorm running statistics identically
    jblock(jnp.asarray(x))
    _assert_close((np.asarray(jblock.dtf_block.norm1.norm.var[...]),
                   tblock.dtf_block.norm1.norm.running_var.numpy()), what="running_var")


# ----------------------------------------------------------------------------------------------
# Whole networks (tiny): the torch reference's state_dict maps one-to-one onto the Flax tree and
# the logits agree; the reference itself reproduces SPEC.md 4.7 at full size.
# ----------------------------------------------------------------------------------------------

_TORCH_NETS = {"c2d_swin_vit": tswin.C2D_SWIN_ViT, "c2d_dtf_swin_vit": tswin.C2D_DTF_SWIN_ViT,
               "c2d_sifa_swin_vit": tswin.C2D_SIFA_SWIN_ViT}


@pytest.mark.parametrize("prefix,keys,total,trainable", [
    ("c2d_swin_vit", 362, 49_158_490, 49_158_490),
    ("c2d_dtf_swin_vit", 578, 75_142_330, 74_817_466),
    ("c2d_sifa_swin_vit", 458, 61_279_450, 60_954_586),
])
def test_torch_reference_matches_spec_counts(prefix, keys, total, trainable):
  extra = {} if prefix == "c2d_swin_vit" else dict(clip_len=4)
  with torch.device("meta"):  # shapes only
    net = _TORCH_NETS[prefix](img_size=224, num_classes=400, **extra)
  assert len(net.state_dict()) == keys
  assert tswin.count_parameters(net) == (total, trainable)


@pytest.mark.parametrize("prefix", list(_TORCH_NETS))
def test_tiny_network_parity(prefix):
  from dtf_jax.models import create_model
  clip, size, classes = 12, 16, 5
  tiny = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2)
  extra = {} if prefix == "c2d_swin_vit" else dict(clip_len=clip // 4)
  tnet = _TORCH_NETS[prefix](img_size=size, num_classes=classes, **tiny, **extra).eval()
  randomize_torch(tnet, seed=11)
  jnet = create_model(f"{prefix}_s_p4_w7", num_classes=classes, clip_length=clip,
                      image_size=size, rngs=nnx.Rngs(0), **tiny)
  copy_torch_weights(jnet, tnet)
  jnet.eval()
  video = _rand(np.random.default_rng(12), 2, clip, size, size, 3)
  graphdef, state = nnx.split(jnet)
  logits = jax.jit(lambda s, v: nnx.merge(graphdef, s, copy=True)(v))(state, jnp.asarray(video))
  with torch.no_grad():
    ref = tnet(torch.tensor(video).permute(0, 4, 1, 2, 3)).numpy()  # (N, 3, L, H, W)
  _assert_close((np.asarray(logits), ref), what="logits")


@pytest.mark.parametrize("clip_len", [1, 2, 4])
def test_sifa_tubelet_conv_matches_torch_conv2d_with_kernel_gradient(clip_len):
  """``SIFASwinTransformerBlock.tubelet_conv`` (edge taps on T'-1 frames only) vs PyTorch's
  ``Conv2d(D, D, [1, 3], padding [0, 1])`` on ``(N, D, L, T')`` in float64: value and the gradients
  of the tokens and of the kernel, T' = 1 (edge taps absent), 2 and 4."""
  from dtf_jax.layers.swin_temporal import SIFASwinTransformerBlock
  dim, res, clips = 6, 4, 2
  rng = np.random.default_rng(30 + clip_len)
  weight = rng.normal(size=(dim, dim, 1, 3))  # torch (O, I, 1, 3)
  tokens = rng.normal(size=(clips * clip_len, res * res, dim))
  cot = rng.normal(size=tokens.shape)
  x_t = torch.tensor(tokens.reshape(clips, clip_len, res * res, dim).transpose(0, 3, 2, 1),
                     requires_grad=True)  # (N, D, L, T')
  w_t = torch.tensor(weight, requires_grad=True)
  y_t = torch.nn.functional.conv2d(x_t, w_t, padding=(0, 1))
  y_t.backward(torch.tensor(cot.reshape(clips, clip_len, res * res, dim).transpose(0, 3, 2, 1)))
  to_tokens = lambda a: a.transpose(0, 3, 2, 1).reshape(tokens.shape)  # (N, D, L, T') -> tokens
  with jax.enable_x64(True):
    block = SIFASwinTransformerBlock(dim, (res, res), 2, clip_len=clip_len, window_size=2,
                                     shift_size=1, rngs=nnx.Rngs(0))
    block.conv.kernel = nnx.Param(jnp.asarray(weight.transpose(2, 3, 1, 0)))  # float64
    graphdef, state = nnx.split(block)
    conv = lambda s, x: nnx.merge(graphdef, s).tubelet_conv(x)
    y, vjp = jax.vjp(conv, nnx.as_pure(state), jnp.asarray(tokens))
    dstate, dx = vjp(jnp.asarray(cot))
    dkernel = dstate["conv"]["kernel"]
  np.testing.assert_allclose(np.asarray(y), to_tokens(y_t.detach().numpy()), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dx), to_tokens(x_t.grad.numpy()), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dkernel), w_t.grad.numpy().transpose(2, 3, 1, 0),
                             rtol=1e-12, atol=1e-12)
