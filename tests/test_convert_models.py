"""Converter parity: the originals' checkpoints (PyTorch reference networks) -> dtf_jax, and back.

For every family (C2D / DTF / SIFA ResNet, C2D / DTF / SIFA Swin) at reduced depth and width, the
PyTorch reference of ``tests/torch_reference`` (the originals' module names, so its ``state_dict``
is an original checkpoint) gets random values in *every* tensor: weights, the zero-initialised
ones (DTF ``alpha1``/``bias``, ``tda_norm``), the frozen correlation weights (so a wrong transpose
cannot hide behind a constant), BatchNorm running statistics and ``num_batches_tracked``. The
converted network must then give

* the same eval-mode logits on fresh random clips (max abs difference <= 1e-5, float32);
* the same train-mode logits (BatchNorm batch statistics; TRAIN_ATOL) and the same updated running
  statistics / counters;
* a PyTorch export equal to the reference's ``state_dict`` (loads with ``strict=True``), and a
  JAX -> PyTorch -> JAX round trip that reproduces every tensor bit for bit.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dtf_jax import convert
from dtf_jax.convert.mapping import checkpointed_state
from torch_reference import resnet as tresnet
from torch_reference import swin as tswin

EVAL_ATOL = 1e-5
# Train mode normalises with the statistics of a 2-clip batch (down to 8 values per channel in the
# last stage), which can amplify float32 rounding; measured max differences: 1e-7 .. 5e-6.
TRAIN_ATOL = 2e-5
STATS_RTOL = 1e-5  # relative to the largest entry of each statistics vector

RESNET_SMALL = dict(base_width=8, dropout_ratio=0.0)
# Two stages: 4x4 tokens (window 2, shifted odd blocks with a mask, patch merging), then 2x2
# tokens (resolution <= window: no shift); dims 8, 16.
SWIN_SMALL = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2, drop_path_rate=0.0,
                  dropout_ratio=0.0)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str                     # registered dtf_jax model
  clip_length: int
  overrides: dict
  torch_model: Callable[[], torch.nn.Module]
  image_size: int
  dual_head: bool = False
  has_batchnorm: bool = True


def _torch_swin(cls, **kw):
  return lambda: cls(img_size=16, num_classes=5, embed_dim=8, depths=(2, 2), num_heads=(1, 2),
                     window_size=2, drop_path_rate=0.0, dropout_ratio=0.0, **kw)


FAMILIES = [
    # ResNets: 32x32 input, T = 4 frames after the stem (SIFA dual branch: 2), widths 8..64.
    Family("c2d_resnet50", 16, dict(RESNET_SMALL, layers=(1, 1, 1, 1)),
           lambda: tresnet.c2d_resnet(layers=(1, 1, 1, 1), num_classes=5, base_width=8,
                                      dropout_ratio=0.0), image_size=32),
    Family("c2d_dtf_resnet50", 16, dict(RESNET_SMALL, layers=(1, 1, 1, 1)),
           lambda: tresnet.c2d_dtf_resnet(layers=(1, 1, 1, 1), clip_length=16, num_classes=5,
                                          base_width=8, dropout_ratio=0.0), image_size=32),
    # layers 2 and 4 (and layer4_dual) hold a GBottleneck and a DEFLocalTransBottleneck.
    Family("c2d_sifa_resnet50", 16, dict(RESNET_SMALL, layers=(1, 2, 1, 2)),
           lambda: tresnet.c2d_sifa_resnet(layers=(1, 2, 1, 2), clip_length=16, num_classes=5,
                                           base_width=8, dropout_ratio=0.0),
           image_size=32, dual_head=True),
    # Swins: 16x16 input, T' = 2 or 3 tubelets (odd T' exercises the odd-length inverse FFT).
    Family("c2d_swin_vit_s_p4_w7", 8, dict(SWIN_SMALL), _torch_swin(tswin.C2D_SWIN_ViT),
           image_size=16, has_batchnorm=False),
    Family("c2d_dtf_swin_vit_s_p4_w7", 12, dict(SWIN_SMALL),
           _torch_swin(tswin.C2D_DTF_SWIN_ViT, clip_len=3), image_size=16),
    Family("c2d_sifa_swin_vit_s_p4_w7", 12, dict(SWIN_SMALL, sifa_kernel=3),
           _torch_swin(tswin.C2D_SIFA_SWIN_ViT, clip_len=3, K=3), image_size=16,
           has_batchnorm=False),
]
FAMILY_IDS = [f.name for f in FAMILIES]


def randomise(module: torch.nn.Module, video: torch.Tensor, seed: int) -> None:
  """Random values in every parameter and BatchNorm buffer (constant buffers untouched).

  Parameters get multiplicative + additive noise (keeps the init's scale, makes constants such as
  the frozen 1/C correlation weights, BN weight 1 and the zero-initialised alpha1 / bias /
  tda_norm position-dependent). BatchNorm running statistics are first calibrated on a random
  batch (random statistics would let eval-mode activations explode through the DTF products),
  then perturbed; ``num_batches_tracked`` gets a random count.
  """
  gen = torch.Generator().manual_seed(seed)

  def noise(t, scale=1.0):
    return torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale

  batchnorms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  with torch.no_grad():
    for _, p in module.named_parameters():
      p.mul_(1 + 0.3 * noise(p)).add_(noise(p, 0.1))
    for bn in batchnorms:
      bn.reset_running_stats()
      bn.momentum = None  # cumulative average: one batch -> the batch statistics
    module.train()
    module(video)
    for bn in batchnorms:
      bn.momentum = 0.1
      bn.running_mean.add_(noise(bn.running_mean, 0.05))
      bn.running_var.mul_(torch.exp(noise(bn.running_var, 0.1)))
      bn.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=gen)))
  module.eval()


def normalise_heads(module: torch.nn.Module, video: torch.Tensor) -> None:
  """Rescales the classifiers so the eval logits have a spread of 0.25 (|logit| <~ 1).

  The absolute 1e-5 bound then sits well above float32 rounding: both implementations accumulate
  ~1e-6 relative rounding per stage, and with logits of size ~5 the float32 PyTorch reference
  itself strays from its own float64 evaluation by ~1.3e-5 (DTF-ResNet; measured).
  """
  module.eval()
  with torch.no_grad():
    outs = module(video)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    for head, out in zip(("fc", "fc_dual"), outs):
      scale = float(out.std()) / 0.25
      getattr(module, head).weight.div_(scale)
      getattr(module, head).bias.div_(scale)


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILY_IDS)
def converted(request):
  """(family, torch reference with random state, converted dtf_jax model)."""
  fam: Family = request.param
  torch.manual_seed(0)
  ref = fam.torch_model()
  calibration = _clips(fam, seed=0)[0]
  randomise(ref, calibration, seed=FAMILY_IDS.index(fam.name))
  normalise_heads(ref, calibration)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # SPEC 2.7 warning, tested separately
    model = convert.from_pytorch(fam.name, ref.state_dict(), num_classes=5,
                                 clip_length=fam.clip_length, image_size=fam.image_size, **fam.overrides)
  return fam, ref, model


def _clips(fam: Family, seed: int, n: int = 2) -> tuple[torch.Tensor, jax.Array]:
  video = np.random.default_rng(seed).normal(
      size=(n, 3, fam.clip_length, fam.image_size, fam.image_size))
  video = video.astype(np.float32)
  return torch.from_numpy(video), jnp.asarray(video.transpose(0, 2, 3, 4, 1))


def _as_list(out):
  return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


@nnx.jit
def _forward(model, video):
  return model(video)


def test_eval_logits_match(converted):
  fam, ref, model = converted
  model.eval()
  x_torch, x_jax = _clips(fam, seed=1)
  with torch.no_grad():
    expected = _as_list(ref(x_torch))
  got = _as_list(_forward(model, x_jax))
  assert len(got) == len(expected) == (2 if fam.dual_head else 1)
  for g, e in zip(got, expected):
    assert g.shape == e.shape
    np.testing.assert_array_less(np.max(np.abs(g - e)), EVAL_ATOL)
    assert np.std(e) > 1e-2  # a meaningful comparison, not two tiny numbers


def test_export_equals_reference_state_dict_and_round_trips(converted):
  fam, ref, model = converted
  exported = convert.to_pytorch(model, fam.name)
  expected = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(exported) == set(expected)
  for key, value in expected.items():
    assert exported[key].dtype == value.dtype, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # The export loads into the original layout strictly.
  fresh = fam.torch_model()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  # JAX -> PyTorch -> JAX is the identity (values and dtypes of every checkpointed leaf).
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    again = convert.from_pytorch(fam.name, exported, num_classes=5, clip_length=fam.clip_length,
                                 image_size=fam.image_size, **fam.overrides)
  before = nnx.to_flat_state(checkpointed_state(model))
  after = dict(nnx.to_flat_state(checkpointed_state(again)))
  assert len(before) == len(after)
  for path, var in before:
    a, b = np.asarray(var.get_value()), np.asarray(after[path].get_value())
    assert a.dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_train_forward_and_running_statistics_match(converted):
  fam, ref, model = converted
  if not fam.has_batchnorm:
    pytest.skip("no BatchNorm: train mode equals eval mode at zero dropout / drop-path")
  ref_train = fam.torch_model()
  ref_train.load_state_dict(ref.state_dict())
  ref_train.train()
  # A copy of the converted model, so the other tests keep the checkpoint's statistics.
  jax_train = nnx.merge(*nnx.split(model))
  jax_train.train()
  x_torch, x_jax = _clips(fam, seed=2)
  with torch.no_grad():
    expected = _as_list(ref_train(x_torch))
  got = _as_list(_forward(jax_train, x_jax))
  for g, e in zip(got, expected):
    np.testing.assert_array_less(np.max(np.abs(g - e)), TRAIN_ATOL)
  exported = convert.to_pytorch(jax_train, fam.name)
  stats = {k: v.numpy() for k, v in ref_train.state_dict().items()
           if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
  assert stats
  before = {k: v.numpy() for k, v in ref.state_dict().items()}
  moved = 0
  for key, value in stats.items():
    if key.endswith("num_batches_tracked"):
      assert exported[key] == value, key
      moved += int(value != before[key])
    else:
      # Unused DTF blocks (shifted DTF-Swin blocks) keep their statistics on both sides.
      scale = max(1.0, float(np.max(np.abs(value))))
      np.testing.assert_allclose(exported[key], value, rtol=0, atol=STATS_RTOL * scale, err_msg=key)
      moved += int(not np.array_equal(value, before[key]))
  assert moved > len(stats) // 3  # most statistics did move (and equally on both sides)
