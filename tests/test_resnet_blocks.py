"""Bottleneck blocks (SPEC.md 3.1, 3.3-3.5): parity with the PyTorch reference written from the spec.

Every parameter, the frozen correlation weights and the BatchNorm running statistics are randomised
in torch and copied across; the blocks run in train mode (outputs, input gradients, updated running
statistics) and in eval mode (outputs with non-trivial running statistics), float32, max abs diff
<= 1e-5. The SIFA block's offsets are O(1) pixels, so the deformable taps cross the frame border.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dtf_jax.layers import common
from dtf_jax.layers import resnet_blocks as jblocks
from torch_reference import resnet as tresnet
from torch_reference.flax_copy import (
    copy_torch_to_flax,
    flax_batch_stats_as_torch,
    randomize_torch,
    torch_key,
    torch_to_flax_layout,
)

ATOL = 1e-5
GRAD_RTOL = 1e-5


@nnx.jit
def apply(block, x):
  """Jitted call (one compile per block structure and mode: far cheaper than eager op-by-op)."""
  return block(x)


def loss_and_output(block, x, cotangent):
  y = block(x)
  return jnp.sum(y * cotangent), y


value_and_grads = nnx.jit(nnx.value_and_grad(loss_and_output, argnums=(nnx.DiffState(0, nnx.Param), 1),
                                             has_aux=True))


def rbg_rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def to_torch_layout(x: np.ndarray) -> torch.Tensor:
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def from_torch_layout(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 4, 1)


def assert_close(a, b, what, atol=ATOL, rtol=0.0):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  bound = atol + rtol * float(np.max(np.abs(b)))
  assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


def torch_downsample(inplanes, planes, stride):
  if stride == 1 and inplanes == planes * 4:
    return None
  return torch.nn.Sequential(tresnet.conv1x1x1(inplanes, planes * 4, stride),
                             torch.nn.BatchNorm3d(planes * 4))


CLIP_LEN = 4

# kind -> (torch class, flax class, extra torch kwargs, extra flax kwargs)
BLOCKS = {
    "plain": (tresnet.Bottleneck, jblocks.Bottleneck, {}, {}),
    "dtf": (tresnet.DTFBottleneck, jblocks.DTFBottleneck, {"clip_len": CLIP_LEN},
            {"clip_len": CLIP_LEN, "kernel_impl": "xla"}),
    "global": (tresnet.GBottleneck, jblocks.GBottleneck, {}, {}),
    "sifa_shift": (tresnet.DEFLocalTransBottleneck, jblocks.DEFLocalTransBottleneck,
                   {"clip_len": CLIP_LEN, "sifa_prev_frame": "shift"},
                   {"clip_len": CLIP_LEN, "sifa_prev_frame": "shift", "kernel_impl": "xla"}),
    "sifa_first": (tresnet.DEFLocalTransBottleneck, jblocks.DEFLocalTransBottleneck,
                   {"clip_len": CLIP_LEN, "sifa_prev_frame": "first"},
                   {"clip_len": CLIP_LEN, "sifa_prev_frame": "first", "kernel_impl": "xla"}),
}


def make_pair(kind, inplanes, planes, stride, seed):
  tcls, jcls, tkw, jkw = BLOCKS[kind]
  tblock = tcls(inplanes, planes, stride, torch_downsample(inplanes, planes, stride), **tkw)
  randomize_torch(tblock, seed)
  if hasattr(tblock, "conv_offset"):
    with torch.no_grad():  # offsets std ~0.7 px, max ~3.5 px: border crossings on 6x6 frames
      tblock.conv_offset.weight.mul_(0.5)
  jblock = jcls(inplanes, planes, stride=stride, rngs=rbg_rngs(seed), **jkw)
  copy_torch_to_flax(tblock, jblock)
  return tblock, jblock


CASES = [  # (kind, inplanes, planes, stride)
    ("plain", 16, 4, 1),
    ("plain", 8, 4, 2),
    ("dtf", 16, 8, 2),
    ("global", 8, 4, 2),
    ("global", 16, 4, 1),
    ("sifa_shift", 16, 4, 1),
    ("sifa_first", 16, 4, 1),
]


@pytest.mark.parametrize("kind,inplanes,planes,stride", CASES)
def test_block_matches_torch_train_then_eval(kind, inplanes, planes, stride):
  seed = sum(map(ord, kind)) + stride
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, CLIP_LEN, 6, 6, inplanes)).astype(np.float32)
  x2 = rng.normal(size=x.shape).astype(np.float32)

  # Train mode: one forward/backward on each side from identical starting weights and stats.
  tblock, jblock = make_pair(kind, inplanes, planes, stride, seed)
  tblock.train()
  xt = to_torch_layout(x).requires_grad_(True)
  yt = tblock(xt)
  cot = rng.normal(size=tuple(yt.shape)).astype(np.float32)
  (yt * torch.tensor(cot)).sum().backward()
  cot_j = jnp.asarray(cot.transpose(0, 2, 3, 4, 1))
  (_, yj), (gparams, gx) = value_and_grads(jblock, jnp.asarray(x), cot_j)
  assert_close(yj, from_torch_layout(yt), f"{kind} train output")
  assert_close(gx, from_torch_layout(xt.grad), f"{kind} input gradient", rtol=GRAD_RTOL)
  # Every trainable parameter's gradient; frozen correlation weights get none.
  tparams = dict(tblock.named_parameters())
  flat_grads = nnx.to_flat_state(gparams)
  assert {torch_key(path) for path, _ in flat_grads} == {k for k, v in tparams.items() if v.requires_grad}
  for path, grad in flat_grads:
    key = torch_key(path)
    if key == "dtf_blk.bias":  # a per-channel constant into train-mode bn2: exact gradient 0
      assert np.abs(np.asarray(grad[...])).max() < 1e-4 and tparams[key].grad.abs().max() < 1e-4
      continue
    assert_close(grad[...], torch_to_flax_layout(key, tparams[key].grad.numpy()), f"{kind} grad {key}",
                 rtol=GRAD_RTOL)
  stats = flax_batch_stats_as_torch(jblock)
  tstate = tblock.state_dict()
  assert set(stats) == {k for k in tstate if "running" in k or "num_batches" in k}
  for key, value in stats.items():
    assert_close(value, tstate[key].numpy(), f"{kind} {key}", rtol=1e-6)  # running_var can be O(100)

  # Eval mode with the updated running statistics.
  tblock.eval()
  jblock.eval()
  with torch.no_grad():
    yt2 = tblock(to_torch_layout(x2))
  assert_close(apply(jblock, jnp.asarray(x2)), from_torch_layout(yt2), f"{kind} eval output")


def test_temporal_shift_semantics_t4():
  x = jnp.arange(4.0)[None, :, None, None, None] + jnp.zeros((2, 4, 2, 3, 5))
  frames = lambda y: np.asarray(y[0, :, 0, 0, 0])
  np.testing.assert_array_equal(frames(jblocks.shift_to_previous(x, "shift")), [0, 0, 1, 2])
  np.testing.assert_array_equal(frames(jblocks.shift_to_previous(x, "first")), [0, 0, 0, 0])
  np.testing.assert_array_equal(frames(jblocks.shift_from_next(x)), [1, 2, 3, 0])
  two = x[:, :2]  # T <= 2: both modes agree (the original is exact there)
  np.testing.assert_array_equal(jblocks.shift_to_previous(two, "shift"),
                                jblocks.shift_to_previous(two, "first"))
  with pytest.raises(ValueError, match="sifa_prev_frame"):
    jblocks.shift_to_previous(x, "last")


def test_sifa_prev_frame_modes_differ_at_t4():
  blocks = []
  for mode in ("shift", "first"):
    blk = jblocks.DEFLocalTransBottleneck(16, 4, stride=1, clip_len=CLIP_LEN, sifa_prev_frame=mode,
                                          kernel_impl="xla", rngs=rbg_rngs(1))
    blk.eval()  # same structure, shapes and mode as the parity tests' eval calls: no new compile
    blocks.append(blk)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, CLIP_LEN, 6, 6, 16)).astype(np.float32))
  a, b = (np.asarray(apply(blk, x)) for blk in blocks)
  assert np.max(np.abs(a - b)) > 1e-3


def test_block_init():
  blk = jblocks.DEFLocalTransBottleneck(64, 16, clip_len=4, zero_init_residual=True, rngs=rbg_rngs(0))
  offset_kernel = np.asarray(blk.conv_offset.kernel[...])
  assert offset_kernel.shape == (1, 3, 3, 16, 18)
  np.testing.assert_allclose(offset_kernel.std(), np.sqrt(2.0 / (18 * 9)), rtol=0.1)  # Kaiming fan-out
  np.testing.assert_array_equal(np.asarray(blk.bn3.scale[...]), 0.0)
  np.testing.assert_array_equal(np.asarray(blk.def_cor.weight[...]),
                                np.full((4, 3, 3, 16), 1 / 16, np.float32))
  assert isinstance(blk.def_cor.weight, common.FrozenParam)
  zero = jblocks.DEFLocalTransBottleneck(64, 16, clip_len=4, offset_zero_init=True, rngs=rbg_rngs(0))
  np.testing.assert_array_equal(np.asarray(zero.conv_offset.kernel[...]), 0.0)
  np.testing.assert_array_equal(np.asarray(zero.bn3.scale[...]), 1.0)
  g = jblocks.GBottleneck(64, 16, stride=2, rngs=rbg_rngs(0))
  assert g.fc1.kernel.shape == (64, 4) and g.fc2.kernel.shape == (4, 64)
  bound = 1 / np.sqrt(64)
  assert np.all(np.abs(np.asarray(g.fc1.kernel[...])) <= bound)  # PyTorch default U(+-1/sqrt(fan_in))
  assert np.asarray(g.fc1.kernel[...]).std() > 0.4 * bound
  conv2 = np.asarray(g.conv2.kernel[...])
  np.testing.assert_allclose(conv2.std(), np.sqrt(2.0 / (16 * 9)), rtol=0.1)
  assert g.downsample is not None and len(g.downsample) == 2


def test_block_validation_errors():
  with pytest.raises(ValueError, match="sifa_prev_frame"):
    jblocks.DEFLocalTransBottleneck(16, 4, clip_len=4, sifa_prev_frame="previous", rngs=rbg_rngs())
  with pytest.raises(ValueError, match="GBottleneck"):
    jblocks.GBottleneck(8, 2, rngs=rbg_rngs())
  blk = jblocks.DEFLocalTransBottleneck(16, 4, clip_len=4, rngs=rbg_rngs())
  with pytest.raises(ValueError, match="clip_len=4"):
    blk(jnp.zeros((1, 3, 4, 4, 16)))
  with pytest.raises(ValueError, match="expects input"):
    blk(jnp.zeros((1, 4, 4, 4, 8)))
  with pytest.raises(ValueError, match="clip_len=4"):
    jblocks.DTFBottleneck(32, 8, clip_len=4, rngs=rbg_rngs())(jnp.zeros((1, 2, 4, 4, 32)))
