"""C2D / C2D-DTF / C2D-SIFA ResNets (SPEC.md 4.1-4.3, 4.5-4.7).

* full-size networks only through ``nnx.eval_shape``: parameter counts and state-dict key counts of
  SPEC.md 4.7, the parameter tree against the PyTorch reference's ``state_dict`` (keys and shapes),
  output shapes;
* every registered network at tiny width/depth: a jitted SGD step on ``nnx.Param`` only (frozen
  correlation weights untouched, BatchNorm statistics updated once) and eval-mode forwards, in
  float32 and bfloat16;
* option validation.

The tiny networks are compiled with XLA:CPU's backend optimisations off (compile time dominates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dtf_jax.layers import common
from dtf_jax.layers.dtf_block import DTFBlock
from dtf_jax.models import create_model, list_models, sifa_combined_probs
from torch_reference import resnet as tresnet
from torch_reference.flax_copy import flax_shapes_as_torch, torch_to_flax_layout

RESNETS = ["c2d_resnet50", "c2d_resnet101", "c2d_dtf_resnet50", "c2d_dtf_resnet101",
           "c2d_sifa_resnet50", "c2d_sifa_resnet101"]

# SPEC.md 4.7: (state_dict keys, params incl. frozen, trainable) at 400 classes.
EXPECTED_COUNTS = {
    ("c2d_resnet50", 16): (320, 24_355_856, 24_355_856),
    ("c2d_resnet101", 16): (626, 43_347_984, 43_347_984),
    ("c2d_dtf_resnet50", 16): (448, 28_951_472, 28_815_536),
    ("c2d_dtf_resnet101", 16): (890, 52_067_120, 51_774_512),
    ("c2d_sifa_resnet50", 16): (432, 43_105_440, 43_040_928),
    ("c2d_sifa_resnet101", 16): (790, 63_692_512, 63_554_272),
    ("c2d_sifa_resnet50", 32): (432, 43_169_952, 43_040_928),
    ("c2d_dtf_resnet50", 32): (448, 33_607_504, 33_335_632),
}

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def rbg_rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"), dropout=jax.random.key(seed + 1, impl="rbg"))


def abstract_model(name, clip_length=16, num_classes=400, **overrides):
  return nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, clip_length=clip_length,
                                             image_size=224, rngs=nnx.Rngs(0), **overrides))


def count(model):
  size = lambda tree: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))
  keys = len(jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, common.FrozenParam, nnx.BatchStat))))
  total = size(nnx.state(model, nnx.Any(nnx.Param, common.FrozenParam)))
  return keys, total, size(nnx.state(model, nnx.Param))


def test_registered_names():
  assert set(RESNETS) <= set(list_models())


@pytest.mark.parametrize("name,clip_length", sorted(EXPECTED_COUNTS))
def test_parameter_and_key_counts_match_spec(name, clip_length):
  assert count(abstract_model(name, clip_length)) == EXPECTED_COUNTS[(name, clip_length)]


@pytest.mark.parametrize("family", ["c2d", "dtf", "sifa"])
def test_parameter_tree_mirrors_torch_state_dict(family):
  """Every Flax variable maps to a torch key of the reference (SPEC.md 5.1 names), same shapes."""
  name = {"c2d": "c2d_resnet50", "dtf": "c2d_dtf_resnet50", "sifa": "c2d_sifa_resnet50"}[family]
  build = {"c2d": tresnet.c2d_resnet, "dtf": tresnet.c2d_dtf_resnet, "sifa": tresnet.c2d_sifa_resnet}[family]
  with torch.device("meta"):
    reference = build(layers=(3, 4, 6, 3), num_classes=400)
  torch_shapes = {}
  for key, tensor in reference.state_dict().items():
    dummy = np.broadcast_to(np.zeros((), np.float32), tuple(tensor.shape))
    torch_shapes[key] = tuple(torch_to_flax_layout(key, dummy).shape)
  flax_shapes = flax_shapes_as_torch(abstract_model(name))
  assert set(flax_shapes) == set(torch_shapes)
  assert flax_shapes == torch_shapes
  for key in ("layer1.0.dtf_blk.filter_g.weight", "layer4.2.dtf_blk.filter_g.weight"):
    if family == "dtf":  # SPEC.md 5.1 examples: (24, 292, 1, 1) and (192, 2084, 1, 1) in torch layout
      assert flax_shapes[key] == {"layer1": (292, 24), "layer4": (2084, 192)}[key[:6]]
  if family == "sifa":
    assert flax_shapes["layer4_dual.1.def_cor.weight"] == (2, 3, 3, 512)
    assert flax_shapes["layer4_dual.0.downsample.0.weight"] == (1, 1, 1, 1024, 2048)


@pytest.mark.parametrize("name", ["c2d_dtf_resnet50", "c2d_sifa_resnet50"])
def test_full_size_output_shapes(name):
  model = abstract_model(name, num_classes=400)
  x = jax.ShapeDtypeStruct((2, 16, 224, 224, 3), jnp.float32)
  layer3 = nnx.eval_shape(lambda m, v: m.features_to_layer3(v), model, x)
  assert layer3.shape == (2, 4, 14, 14, 1024)
  out = nnx.eval_shape(lambda m, v: m(v), model, x)
  outs = out if isinstance(out, tuple) else (out,)
  assert [o.shape for o in outs] == [(2, 400)] * len(outs)
  assert all(o.dtype == jnp.float32 for o in outs)
  assert len(outs) == (2 if "sifa" in name else 1)


# ------------------------------------------------------------------------------------------------
# Tiny networks: a training step and eval forwards.
# ------------------------------------------------------------------------------------------------

TINY_LAYERS = {"c2d": (1, 1, 1, 1), "dtf": (1, 1, 1, 1), "sifa": (1, 1, 1, 2)}  # sifa: DEF blocks in
NUM_CLASSES, CLIP, SIZE, BATCH = 5, 16, 32, 2                                   # layer4 + layer4_dual
_COMPILED: dict = {}


def family_of(name):
  return "sifa" if "sifa" in name else "dtf" if "dtf" in name else "c2d"


def tiny_model(name, dtype="float32", **overrides):
  kwargs = dict(layers=TINY_LAYERS[family_of(name)], base_width=8, dtype=dtype, kernel_impl="xla")
  if family_of(name) == "sifa":
    kwargs["zero_init_residual"] = False  # let gradients reach every block at init
  kwargs.update(overrides)
  return create_model(name, num_classes=NUM_CLASSES, clip_length=CLIP, image_size=SIZE,
                      rngs=rbg_rngs(0), **kwargs)


def sgd_step(model, x, labels):
  """One SGD step (lr 0.1) on ``nnx.Param`` only; returns the loss, logits and the gradients."""

  def loss_fn(m):
    out = m(x)
    outs = out if isinstance(out, tuple) else (out,)
    losses = [-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(o), labels[:, None], 1)) for o in outs]
    return sum(losses), out

  (loss, out), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param),
                                          has_aux=True)(model)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
  return loss, out, grads


def forward(model, x):
  return model(x)


def compiled(fn, key, *args):
  """``nnx.jit(fn)`` compiled once per (family, dtype, ...) key; r50/r101 tiny twins share it."""
  if key not in _COMPILED:
    _COMPILED[key] = nnx.jit(fn).lower(*args).compile(FAST_COMPILE)
  return _COMPILED[key]


def clip_batch(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(BATCH, CLIP, SIZE, SIZE, 3)).astype(np.float32))
  return x, jnp.asarray(rng.integers(0, NUM_CLASSES, size=BATCH))


def flat(state):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", RESNETS)
def test_tiny_network_train_step_and_eval(name, dtype):
  family = family_of(name)
  model = tiny_model(name, dtype)
  x, labels = clip_batch()
  frozen_before = flat(nnx.state(model, common.FrozenParam))
  params_before = flat(nnx.state(model, nnx.Param))
  stats_before = flat(nnx.state(model, nnx.BatchStat))
  assert (len(frozen_before) > 0) == (family != "c2d")

  loss, out, grads = compiled(sgd_step, (family, dtype, "train"), model, x, labels)(model, x, labels)
  outs = out if isinstance(out, tuple) else (out,)
  assert len(outs) == (2 if family == "sifa" else 1)
  for o in outs:
    assert o.shape == (BATCH, NUM_CLASSES) and o.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(o)))
  assert np.isfinite(float(loss))

  # Gradients exist for exactly the trainable parameters, are finite, and reach the temporal ops.
  g = flat(grads)
  assert set(g) == set(params_before)
  assert all(np.all(np.isfinite(v)) for v in g.values())
  if family == "dtf":
    assert np.abs(g[("layer1", 0, "dtf_blk", "alpha1")]).max() > 0  # alpha1 = 0 at init: only it
  if family == "sifa":
    for stage in ("layer4", "layer4_dual"):
      assert np.abs(g[(stage, 1, "conv_offset", "kernel")]).max() > 0
    assert np.abs(g[("layer4_dual", 0, "fc1", "kernel")]).max() > 0

  # The step moved the parameters, not the frozen weights; BN statistics were updated once.
  params_after = flat(nnx.state(model, nnx.Param))
  assert not np.array_equal(params_after[("fc", "kernel")], params_before[("fc", "kernel")])
  for path, value in flat(nnx.state(model, common.FrozenParam)).items():
    np.testing.assert_array_equal(value, frozen_before[path])
  stats_after = flat(nnx.state(model, nnx.BatchStat))
  for path, value in stats_after.items():
    if path[-1] == "num_batches_tracked":
      assert int(value) == int(stats_before[path]) + 1, path
  assert not np.array_equal(stats_after[("bn1", "mean")], stats_before[("bn1", "mean")])

  # Eval mode: deterministic (no dropout), running statistics untouched.
  model.eval()
  run = compiled(forward, (family, dtype, "eval"), model, x)
  first, second = run(model, x), run(model, x)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for path, value in flat(nnx.state(model, nnx.BatchStat)).items():
    np.testing.assert_array_equal(value, stats_after[path])


@pytest.mark.parametrize("family", ["c2d", "dtf", "sifa"])
def test_bfloat16_computes_the_float32_function(family):
  name = {"c2d": "c2d_resnet50", "dtf": "c2d_dtf_resnet50", "sifa": "c2d_sifa_resnet50"}[family]
  x, _ = clip_batch(1)
  outs = []
  for dtype in ("float32", "bfloat16"):
    model = tiny_model(name, dtype)  # same seed: identical float32 parameters
    model.eval()
    outs.append(jax.tree.leaves(compiled(forward, (family, dtype, "eval"), model, x)(model, x)))
  for ref, low in zip(*outs):
    ref, low = np.asarray(ref), np.asarray(low)
    assert low.dtype == np.float32
    assert np.max(np.abs(ref - low)) <= 0.05 * np.max(np.abs(ref)) + 0.05


@pytest.mark.parametrize("name", ["c2d_resnet50", "c2d_dtf_resnet50"])
def test_remat_policies_give_the_same_step(name):
  x, labels = clip_batch(2)
  results, temp_bytes, flops = {}, {}, {}
  for remat in (False, True, "spatial_convs"):  # same seeds: same parameters and dropout masks
    model = tiny_model(name, remat=remat)
    step = nnx.jit(sgd_step).lower(model, x, labels).compile(FAST_COMPILE)
    temp_bytes[remat] = step.memory_analysis().temp_size_in_bytes
    cost = step.cost_analysis()
    flops[remat] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    results[remat] = step(model, x, labels)
  loss_a, _, grads_a = results[False]
  for remat in (True, "spatial_convs"):
    loss_b, _, grads_b = results[remat]
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  # The policies do what they say: 'spatial_convs' recomputes some work (the 1x1 convs, BN, ReLU)
  # but not all of it (the 3x3 convs are kept), and keeps fewer bytes than no remat.
  assert flops[False] < flops["spatial_convs"] < flops[True]
  assert temp_bytes["spatial_convs"] < temp_bytes[False]


def test_remat_defaults():
  """C2D ResNets default to the 'spatial_convs' policy, DTF / SIFA ResNets to no remat."""
  assert abstract_model("c2d_resnet50").remat == "spatial_convs"
  assert abstract_model("c2d_resnet101").remat == "spatial_convs"
  assert abstract_model("c2d_dtf_resnet50").remat is False
  assert abstract_model("c2d_sifa_resnet50").remat is False


def test_default_init_and_option_plumbing():
  sifa = abstract_model("c2d_sifa_resnet50", bn_group_size=4, kernel_impl="xla", sifa_prev_frame="first")
  dtf = abstract_model("c2d_dtf_resnet50", kernel_impl="pallas", bn_group_size=4)
  for model in (sifa, dtf):
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, common.BatchNorm)]
    assert bns and all(bn.group_size == 4 for bn in bns)
  assert sifa.layer2[1].sifa_prev_frame == "first" and sifa.layer2[1].kernel_impl == "xla"
  assert sifa.layer4_dual[1].clip_len == 2 and sifa.layer4[1].clip_len == 4
  dtf_blocks = [m for _, m in nnx.iter_modules(dtf) if isinstance(m, DTFBlock)]
  assert len(dtf_blocks) == 16 and all(b.kernel_impl == "pallas" and b.clip_len == 4 for b in dtf_blocks)
  assert sifa.dropout.rate == 0.5 and sifa.drop_dual.rate == 0.5

  # zero_init_residual: SIFA default True, C2D / DTF default False (values need a real init).
  tiny_sifa = create_model("c2d_sifa_resnet50", num_classes=NUM_CLASSES, clip_length=CLIP,
                           image_size=SIZE, rngs=rbg_rngs(), layers=(1, 1, 1, 2), base_width=8)
  tiny_c2d = tiny_model("c2d_resnet50")
  for stage in ("layer1", "layer2", "layer4", "layer4_dual"):
    for block in getattr(tiny_sifa, stage):
      np.testing.assert_array_equal(np.asarray(block.bn3.scale[...]), 0.0)
  np.testing.assert_array_equal(np.asarray(tiny_c2d.layer1[0].bn3.scale[...]), 1.0)
  stem = np.asarray(tiny_c2d.conv1.kernel[...])  # Kaiming fan-out: std sqrt(2 / (8 * 4*7*7))
  np.testing.assert_allclose(stem.std(), np.sqrt(2.0 / (8 * 4 * 7 * 7)), rtol=0.1)
  fc = np.asarray(tiny_c2d.fc.kernel[...])
  assert fc.shape == (256, NUM_CLASSES) and np.abs(fc).max() <= 1 / np.sqrt(256)  # PyTorch default
  assert fc.std() > 0.4 / np.sqrt(256)
  offsets = np.asarray(tiny_sifa.layer4[1].conv_offset.kernel[...])
  assert offsets.std() > 0  # Kaiming, not zero (SPEC 7.2) unless offset_zero_init=True


def test_sifa_combined_probs():
  rng = np.random.default_rng(3)
  main, dual = (jnp.asarray(rng.normal(size=(4, 7)).astype(np.float32)) for _ in range(2))
  soft = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  expected = (soft(np.asarray(main, np.float64)) + soft(np.asarray(dual, np.float64))) / 2
  np.testing.assert_allclose(np.asarray(sifa_combined_probs((main, dual))), expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sifa_combined_probs(main)), soft(np.asarray(main, np.float64)),
                             rtol=1e-6)


@pytest.mark.parametrize("name,overrides,match", [
    ("c2d_resnet50", {"clip_length": 18}, "divisible by the stem's temporal stride"),
    ("c2d_sifa_resnet50", {"clip_length": 4}, "dual branch"),
    ("c2d_resnet50", {"dtype": "float16"}, "dtype"),
    ("c2d_resnet50", {"dtype": jnp.int32}, "dtype"),
    ("c2d_dtf_resnet50", {"kernel_impl": "cuda"}, "kernel_impl"),
    ("c2d_resnet50", {"dropout_ratio": 1.0}, "dropout_ratio"),
    ("c2d_resnet50", {"bn_group_size": 0}, "bn_group_size"),
    ("c2d_resnet50", {"num_classes": 0}, "num_classes"),
    ("c2d_resnet50", {"image_size": -1}, "image_size"),
    ("c2d_resnet50", {"remat": "yes"}, "remat must be False, True or one of"),
    ("c2d_dtf_resnet50", {"remat": 1}, "remat"),
    ("c2d_resnet50", {"remat": None}, "remat"),  # None means "model default" only in configs
    ("c2d_resnet50", {"layers": (3, 4, 6)}, "layers"),
    ("c2d_dtf_resnet50", {"base_width": 4}, "layer1"),  # C*F = 4*3 not a multiple of 8
    ("c2d_sifa_resnet50", {"sifa_prev_frame": "next"}, "sifa_prev_frame"),
    ("c2d_sifa_resnet50", {"base_width": 2}, "base_width"),
    ("c2d_sifa_resnet50", {"sifa_kernel": (1, 3, 2, 3)}, "sifa_kernel"),
])
def test_option_validation(name, overrides, match):
  kwargs = dict(num_classes=10, clip_length=16, image_size=224)
  kwargs.update(overrides)
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


def test_input_validation():
  model = abstract_model("c2d_resnet50", clip_length=8)
  with pytest.raises(ValueError, match=r"\(N, 8, H, W, 3\)"):
    nnx.eval_shape(lambda m, v: m(v), model, jax.ShapeDtypeStruct((1, 16, 64, 64, 3), jnp.float32))
  with pytest.raises(TypeError, match="unexpected keyword"):
    create_model("c2d_resnet50", num_classes=3, rngs=nnx.Rngs(0), sifa_kernel=(1, 3, 3, 3))
