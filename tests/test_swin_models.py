"""Registered video Swin networks: sizes (SPEC.md 4.7), init (4.6), options, training steps.

Full-size models are only built abstractly (``nnx.eval_shape``, no compute); everything that runs
uses tiny overrides to keep XLA:CPU compile times small: two stages (embed_dim 8, depths (2, 2)),
image 16 with window 2 (stage resolutions 4 and 2: stage 0 has shifted, masked windows, stage 1
clamps the window to the whole map and never shifts, like stage 4 of the full models) and clips of
12 frames (T' = 3 tubelets).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dtf_jax.layers.common import FrozenParam
from dtf_jax.models import create_model, list_models
from dtf_jax.models import swin as swin_models

FAMILIES = {"c2d": "c2d_swin_vit", "dtf": "c2d_dtf_swin_vit", "sifa": "c2d_sifa_swin_vit"}
SWIN_NAMES = [f"{prefix}_{v}_p4_w7" for prefix in FAMILIES.values() for v in "sbl"]

# SPEC.md 4.7 (400 classes, 16 frames): state_dict keys, params incl. frozen, trainable.
SPEC_COUNTS = {
    "c2d_swin_vit_s_p4_w7": (362, 49_158_490, 49_158_490),
    "c2d_swin_vit_b_p4_w7": (362, 87_171_400, 87_171_400),
    "c2d_swin_vit_l_p4_w7": (362, 195_637_540, 195_637_540),
    "c2d_dtf_swin_vit_s_p4_w7": (578, 75_142_330, 74_817_466),
    "c2d_dtf_swin_vit_b_p4_w7": (578, 133_158_344, 132_725_192),
    "c2d_dtf_swin_vit_l_p4_w7": (578, 298_643_428, 297_993_700),
    "c2d_sifa_swin_vit_s_p4_w7": (458, 61_279_450, 60_954_586),
    "c2d_sifa_swin_vit_b_p4_w7": (458, 108_567_368, 108_134_216),
    "c2d_sifa_swin_vit_l_p4_w7": (458, 243_435_556, 242_785_828),
}

TINY = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2)
TINY_CLIP, TINY_IMAGE, TINY_CLASSES = 12, 16, 5
SGD = optax.sgd(0.1)  # one instance: the optimizer's graph (and the jit cache) is shared


def _size(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _blocks(model):
  return [blk for stage in model.layers for blk in stage.blocks]


def _tiny(name, *, seed=0, **overrides):
  return create_model(name, num_classes=TINY_CLASSES, clip_length=TINY_CLIP,
                      image_size=TINY_IMAGE, rngs=nnx.Rngs(params=seed, dropout=seed + 1),
                      **{**TINY, **overrides})


def _video(seed, n=2, length=TINY_CLIP, size=TINY_IMAGE):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, length, size, size, 3)),
                     jnp.float32)


def test_every_swin_name_is_registered():
  assert set(SWIN_NAMES) <= set(list_models())


# ----------------------------------------------------------------------------------------------
# Full size, abstract: SPEC.md 4.7 counts, drop-path schedule, shapes.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SWIN_NAMES)
def test_full_size_parameter_counts(name):
  model = nnx.eval_shape(lambda: create_model(name, num_classes=400, clip_length=16,
                                              image_size=224, rngs=nnx.Rngs(0)))
  keys, total, trainable = SPEC_COUNTS[name]
  params, frozen = nnx.state(model, nnx.Param), nnx.state(model, FrozenParam)
  assert _size(params) == trainable
  assert _size(params) + _size(frozen) == total
  # state_dict keys = checkpointed variables + the recomputed buffers (one relative_position_index
  # per block, one attn_mask per block with an effective shift).
  variables = nnx.state(model, nnx.Any(nnx.Param, FrozenParam, nnx.BatchStat))
  blocks = _blocks(model)
  buffers = len(blocks) + sum(1 for b in blocks if b.shift_size > 0)
  assert len(jax.tree.leaves(variables)) + buffers == keys
  # Layout facts of SPEC.md 4.4 / 3.6.
  assert [b.shift_size for b in blocks[:4]] == [0, 3, 0, 3]
  assert [(b.window_size, b.shift_size) for b in model.layers[3].blocks] == [(7, 0), (7, 0)]
  rates = [b.drop_path.rate for b in blocks]
  peak = swin_models.SWIN_VARIANTS[name.split("_")[-3]]["drop_path_rate"]
  np.testing.assert_allclose(rates, np.linspace(0, peak, 24), rtol=1e-6, atol=1e-7)
  if "_dtf_" in name:
    assert model.layers[0].blocks[0].dtf_block.weights_cor.shape[0] == 4  # T' = 16 / 4
  if "_sifa_" in name:
    # def_cor (T', K, K, C) in every block, stage 3 has C = 4D = num_features / 2.
    assert model.layers[2].blocks[5].def_cor.weight.shape == (4, 3, 3, model.num_features // 2)


# ----------------------------------------------------------------------------------------------
# Tiny models: forward and one SGD step, float32 and bfloat16, train and eval.
# ----------------------------------------------------------------------------------------------

# Test-only: LLVM optimisation level 0 cuts XLA:CPU compile time ~35% (numerics are unchanged;
# run time of these tiny graphs is negligible).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_COMPILED: list = []  # (kind, graphdef, fn); graphdefs are compared, not hashed


def _compiled(kind, graphdef):
  """One jitted function per graph structure; s/b/l with equal overrides share their graphs."""
  for k, gd, fn in _COMPILED:
    if k == kind and gd == graphdef:
      return fn
  if kind == "eval":
    def fn(state, video):
      return nnx.merge(graphdef, state, copy=True)(video)
  else:
    def fn(params, rest, opt_state, video, labels):
      def loss_fn(p):
        model = nnx.merge(graphdef, p, rest, copy=True)
        logits = model(video)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.state(model, nnx.Not(nnx.Param))
      (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = SGD.update(grads, opt_state, params)
      return loss, grads, optax.apply_updates(params, updates), new_rest, opt_state
  jitted = jax.jit(fn, compiler_options=_FAST_COMPILE)
  _COMPILED.append((kind, graphdef, jitted))
  return jitted


def _eval_logits(model, video):
  model.eval()
  graphdef, state = nnx.split(model)
  return np.asarray(_compiled("eval", graphdef)(state, video))


def _train_step(model, video, labels):
  """One SGD step in training mode; updates ``model`` in place, returns (loss, {path: grad})."""
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss, grads, params, rest, _ = _compiled("train", graphdef)(
      params, rest, SGD.init(params), video, labels)
  nnx.update(model, params, rest)
  flat = {path: np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
          for path, v in nnx.to_flat_state(grads)}
  return float(loss), flat


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_models_train_step_and_eval(family):
  video, labels = _video(0), jnp.asarray([1, 3])
  eval_logits = {}
  for dtype in ("float32", "bfloat16"):
    for variant in "sbl":
      name = f"{FAMILIES[family]}_{variant}_p4_w7"
      # One drop-path rate for all variants so that the compiled graphs are shared (with TINY
      # overrides, s/b/l differ only by that rate, checked at full size above).
      model = _tiny(name, dtype=dtype, drop_path_rate=0.2)
      logits = _eval_logits(model, video)
      assert logits.shape == (2, TINY_CLASSES) and logits.dtype == np.float32, name
      assert np.all(np.isfinite(logits)), name
      np.testing.assert_array_equal(_eval_logits(model, video), logits)  # deterministic
      eval_logits[dtype, variant] = logits
      for leaf in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, FrozenParam))):
        assert leaf.dtype == jnp.float32  # parameters stay float32 whatever the compute dtype

      before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
      loss, grads = _train_step(model, video, labels)
      assert np.isfinite(loss), name
      assert all(np.all(np.isfinite(g)) for g in grads.values()), name
      after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
      assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)))
      assert not any("def_cor" in p or "weights_cor" in p for p in grads)  # frozen: not trained

      def grad(*path):
        return grads[path]

      # Which temporal parameters the forward reads (SPEC.md 3.7, 3.8, 7.7).
      assert np.any(grad("layers", 0, "blocks", 1, "attn", "qkv", "kernel"))
      if family == "dtf":  # (alpha1 = 0 at init, so among DTF's weights only alpha1/bias learn)
        assert np.any(grad("layers", 0, "blocks", 0, "dtf_block", "alpha1"))
        assert not np.any(grad("layers", 0, "blocks", 1, "dtf_block", "alpha1"))
        assert np.any(grad("layers", 1, "blocks", 1, "dtf_block", "alpha1"))  # clamped: no shift
        assert not np.any(grad("layers", 0, "blocks", 0, "conv", "kernel"))
        blocks = model.layers[0].blocks
        assert int(blocks[0].dtf_block.norm1.norm.num_batches_tracked[...]) == 1
        assert int(blocks[1].dtf_block.norm1.norm.num_batches_tracked[...]) == 0
      if family == "sifa":
        assert np.any(grad("layers", 0, "blocks", 0, "tda_norm", "scale"))
        assert not np.any(grad("layers", 0, "blocks", 0, "conv", "kernel"))
        assert np.any(grad("layers", 0, "blocks", 1, "conv", "kernel"))
        assert not np.any(grad("layers", 0, "blocks", 1, "tda_norm", "bias"))
        assert not np.any(grad("layers", 1, "blocks", 1, "conv", "kernel"))  # clamped: rtc
  # Same seed -> same float32 parameters: bfloat16 compute tracks float32 compute.
  for variant in "sbl":
    ref, low = eval_logits["float32", variant], eval_logits["bfloat16", variant]
    assert np.max(np.abs(ref - low)) <= 0.05 * max(1.0, float(np.max(np.abs(ref))))


def test_remat_gives_identical_loss_and_gradients():
  # One stage with a DTF block (BatchNorm state updated inside the rematerialised block).
  name, overrides = "c2d_dtf_swin_vit_s_p4_w7", dict(depths=(2,), num_heads=(1,),
                                                     drop_path_rate=0.0)
  video, labels = _video(2), jnp.asarray([0, 4])
  plain, remat = _tiny(name, **overrides), _tiny(name, remat=True, **overrides)
  (la, ga), (lb, gb) = _train_step(plain, video, labels), _train_step(remat, video, labels)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  assert ga.keys() == gb.keys()
  for path in ga:
    np.testing.assert_allclose(ga[path], gb[path], rtol=1e-5, atol=1e-7, err_msg=str(path))
  assert int(remat.layers[0].blocks[0].dtf_block.norm1.norm.num_batches_tracked[...]) == 1


# ----------------------------------------------------------------------------------------------
# Initialisation (SPEC.md 4.6, 7.9).
# ----------------------------------------------------------------------------------------------

def _init_model(family, **overrides):
  config = dict(embed_dim=32, depths=(1, 1), num_heads=(1, 1), **overrides)
  return _tiny(f"{FAMILIES[family]}_s_p4_w7", seed=3, **config)


def _assert_uniform(x, bound, what):
  x = np.asarray(x).ravel()
  assert np.max(np.abs(x)) <= bound * (1 + 1e-6), what
  assert abs(np.std(x) / (bound / np.sqrt(3)) - 1) < 0.1, what


def _assert_normal(x, std, what):
  x = np.asarray(x).ravel()
  assert abs(np.std(x) / std - 1) < 0.1 and abs(np.mean(x)) < 3 * std / np.sqrt(x.size), what


@pytest.mark.parametrize("family,swin_init", [("c2d", False), ("dtf", False), ("sifa", False),
                                              ("sifa", True)])
def test_initialisation(family, swin_init):
  model = _init_model(family, swin_init=swin_init)
  dim = 32
  block = model.layers[0].blocks[0]
  # Stem: PyTorch default Conv3d init, fan_in = 3 * 4 * 4 * 4.
  _assert_uniform(model.patch_embed.proj.kernel[...], 1 / np.sqrt(192), "stem kernel")
  assert np.max(np.abs(model.patch_embed.proj.bias[...])) <= 1 / np.sqrt(192)
  # Head: always the Swin init.
  assert not np.any(model.fc.bias[...]) and 0.01 < np.std(model.fc.kernel[...]) < 0.03
  np.testing.assert_array_equal(model.norm.scale[...], 1.0)
  np.testing.assert_array_equal(model.norm.bias[...], 0.0)
  np.testing.assert_array_equal(block.norm1.scale[...], 1.0)
  table = np.asarray(block.attn.relative_position_bias_table[...])
  assert np.any(table) and np.max(np.abs(table)) < 0.15  # N(0, 0.02^2) in every family
  # Stage Linear layers: Swin init for C2D-Swin (or swin_init=True), PyTorch default otherwise.
  qkv, fc1 = block.attn.qkv, block.mlp.fc1
  reduction = model.layers[0].downsample.reduction.kernel[...]
  if family == "c2d" or swin_init:
    _assert_normal(qkv.kernel[...], 0.02, "qkv kernel")
    _assert_normal(fc1.kernel[...], 0.02, "fc1 kernel")
    _assert_normal(reduction, 0.02, "reduction kernel")
    assert not np.any(qkv.bias[...]) and not np.any(fc1.bias[...])
  else:
    _assert_uniform(qkv.kernel[...], 1 / np.sqrt(dim), "qkv kernel")
    _assert_uniform(fc1.kernel[...], 1 / np.sqrt(dim), "fc1 kernel")
    _assert_uniform(reduction, 1 / np.sqrt(4 * dim), "reduction kernel")
    assert np.any(qkv.bias[...]) and np.max(np.abs(qkv.bias[...])) <= 1 / np.sqrt(dim)
  if family in ("dtf", "sifa"):  # temporal conv (D, D, 1, 3): PyTorch default, fan_in 3D
    assert block.conv.kernel.shape == (1, 3, dim, dim)
    _assert_uniform(block.conv.kernel[...], 1 / np.sqrt(3 * dim), "conv kernel")
  if family == "dtf":
    assert not np.any(block.dtf_block.alpha1[...]) and not np.any(block.dtf_block.bias[...])
  if family == "sifa":
    assert not np.any(block.tda_norm.scale[...]) and not np.any(block.tda_norm.bias[...])
    np.testing.assert_array_equal(block.def_cor.weight[...], np.float32(1 / dim))
    assert block.def_cor.weight.shape == (TINY_CLIP // 4, 3, 3, dim)


# ----------------------------------------------------------------------------------------------
# Options and validation.
# ----------------------------------------------------------------------------------------------

def _abstract(name, **kwargs):
  config = dict(num_classes=TINY_CLASSES, clip_length=TINY_CLIP, image_size=TINY_IMAGE, **TINY)
  config.update(kwargs)
  return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **config))


@pytest.mark.parametrize("sifa_kernel,expected", [(None, 3), (5, 5), ([1, 3, 3, 3], 1),
                                                  ((3, 1, 1, 1), 3), ([], 3)])
def test_sifa_kernel_takes_first_entry_of_a_list(sifa_kernel, expected):
  model = _abstract("c2d_sifa_swin_vit_s_p4_w7", sifa_kernel=sifa_kernel)
  for block in _blocks(model):
    assert block.sifa_kernel == expected
    assert block.def_cor.weight.shape == (TINY_CLIP // 4, expected, expected, block.dim)


def test_region_kernel_is_accepted_and_ignored_by_dtf_swin():
  model = _abstract("c2d_dtf_swin_vit_s_p4_w7", region_kernel=[5, 5, 5, 5])
  assert all(b.dtf_block.kernel_size == 3 for b in _blocks(model))


@pytest.mark.parametrize("name,kwargs,match", [
    ("c2d_swin_vit_s_p4_w7", dict(clip_length=10), "multiple of early_stride"),
    ("c2d_swin_vit_s_p4_w7", dict(image_size=18), "multiple of the patch size"),
    ("c2d_swin_vit_s_p4_w7", dict(image_size=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1)),
     "odd"),
    ("c2d_swin_vit_s_p4_w7", dict(image_size=48, window_size=5), "window"),
    ("c2d_swin_vit_s_p4_w7", dict(dtype="float16"), "dtype"),
    ("c2d_swin_vit_s_p4_w7", dict(sifa_kernel=3), "unknown override"),
    ("c2d_swin_vit_s_p4_w7", dict(depths=(2, 2, 2)), "same length"),
    ("c2d_swin_vit_s_p4_w7", dict(num_heads=(3, 2)), "divisible by num_heads"),
    ("c2d_swin_vit_s_p4_w7", dict(drop_path_rate=1.0), "drop_path_rate"),
    ("c2d_swin_vit_s_p4_w7", dict(dropout_ratio=-0.1), "dropout_ratio"),
    ("c2d_swin_vit_s_p4_w7", dict(remat="yes"), "remat"),
    ("c2d_swin_vit_s_p4_w7", dict(swin_init=1), "swin_init"),
    ("c2d_dtf_swin_vit_s_p4_w7", dict(kernel_impl="cuda"), "kernel_impl"),
    ("c2d_dtf_swin_vit_s_p4_w7", dict(bn_group_size=0), "bn_group_size"),
    ("c2d_dtf_swin_vit_s_p4_w7", dict(embed_dim=2, num_heads=(1, 1)), "factor_g"),
    ("c2d_sifa_swin_vit_s_p4_w7", dict(sifa_kernel=[2, 3, 3, 3]), "odd"),
    ("c2d_sifa_swin_vit_s_p4_w7", dict(sifa_kernel="3"), "sifa_kernel"),
])
def test_bad_options_raise_clear_errors(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _abstract(name, **kwargs)


def test_bad_input_shapes_raise_clear_errors():
  model = _tiny("c2d_swin_vit_s_p4_w7")
  with pytest.raises(ValueError, match="clip_length=12"):
    model(_video(0, length=8))
  with pytest.raises(ValueError, match="TubeletEmbed"):
    model(_video(0, size=20))
  from dtf_jax.layers.swin_temporal import SIFASwinTransformerBlock
  block = SIFASwinTransformerBlock(8, (4, 4), 1, clip_len=3, window_size=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="clip_len=3"):
    block(jnp.zeros((4, 16, 8)))  # 4 rows are not whole clips of 3 tubelets


def test_sifa_prev_frame_is_validated_and_has_no_effect_on_sifa_swin():
  # The forward shift of SPEC.md 2.6 only feeds SIFA-Swin's discarded gating term.
  a = _abstract("c2d_sifa_swin_vit_s_p4_w7", sifa_prev_frame="first")
  b = _abstract("c2d_sifa_swin_vit_s_p4_w7")
  assert nnx.graphdef(a) == nnx.graphdef(b)
  with pytest.raises(ValueError, match="sifa_prev_frame"):
    _abstract("c2d_sifa_swin_vit_s_p4_w7", sifa_prev_frame="last")
