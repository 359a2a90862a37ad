"""Converter: safe reading, key rules, ImageNet inflation, strict error listing, CLI, key counts.

The networks' numerical parity after conversion is in ``test_convert_models.py``. Checkpoints here
are the PyTorch references' own ``state_dict`` s (``tests/torch_reference``, the originals' module
names) or hand-written torchvision / official-Swin layouts, filled with random values.
"""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from flax import nnx

from dtf_jax import convert
from dtf_jax.convert import cli
from dtf_jax.convert.mapping import checkpointed_state
from dtf_jax.models import create_model
from torch_reference import resnet as tresnet
from torch_reference import swin as tswin

REPO = pathlib.Path(__file__).resolve().parents[1]

RESNET_TINY = dict(base_width=8, image_size=32)
SWIN_TINY = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2, image_size=16)


def _numpy_sd(module: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
  """The module's state_dict with random values in every float tensor (buffers of constants kept)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, value in module.state_dict().items():
    v = value.numpy()
    if key.endswith(("relative_position_index", "attn_mask")):
      out[key] = v.copy()
    elif key.endswith("num_batches_tracked"):
      out[key] = np.asarray(rng.integers(1, 1000), np.int64)
    else:
      out[key] = rng.normal(size=v.shape).astype(np.float32)
  return out


def _torch_c2d(**kw):
  return tresnet.c2d_resnet(layers=(1, 1, 1, 1), num_classes=5, base_width=8, **kw)


def _torch_sifa(clip_length=16):
  return tresnet.c2d_sifa_resnet(layers=(1, 2, 1, 2), clip_length=clip_length, num_classes=5,
                                 base_width=8)


def _torch_swin(cls=tswin.C2D_SWIN_ViT, **kw):
  return cls(img_size=16, num_classes=5, embed_dim=8, depths=(2, 2), num_heads=(1, 2),
             window_size=2, **kw)


# ------------------------------------------------------------------------------------------------
# Safe reading.
# ------------------------------------------------------------------------------------------------

class _RunsCode:
  """A pickle payload that runs a shell command when unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, zip_format):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  payload = {"model": {"fc.weight": torch.zeros(2, 2)}, "opt": _RunsCode(marker)}
  torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(convert.UnsafeCheckpointError, match=r"refused to load .*evil\.pth.*system"):
    convert.read_state_dict(path)
  with pytest.raises(convert.UnsafeCheckpointError):
    convert.from_pytorch("c2d_resnet50", path, num_classes=5, layers=(1, 1, 1, 1), **RESNET_TINY)
  assert not marker.exists()
  # The file really is malicious: a full unpickle runs the command.
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_training_checkpoint_with_options_namespace_and_ddp_prefix(tmp_path):
  sd = {"fc.weight": torch.randn(3, 4), "bn1.num_batches_tracked": torch.tensor(7)}
  path = tmp_path / "current.pth"
  torch.save({"opt": argparse.Namespace(lr=0.04, sifa_kernel=[1, 3, 3, 3], pooling_name="avg"),
              "model": {f"module.{k}": v for k, v in sd.items()},
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
              "scheduler": {"last_epoch": 3, "after_scheduler": {"T_max": 10}}, "epoch": 3}, path)
  got = convert.read_state_dict(path)
  assert sorted(got) == sorted(sd)
  np.testing.assert_array_equal(got["fc.weight"], sd["fc.weight"].numpy())
  assert got["bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "module_prefix", "safetensors",
                                  "in_memory"])
def test_state_dict_wrappers(tmp_path, wrap):
  sd = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2), "b.num_batches_tracked": torch.tensor(5)}
  expected = {k: v.numpy() for k, v in sd.items()}
  if wrap == "in_memory":
    source = {"state_dict": sd}
  elif wrap == "safetensors":
    source = tmp_path / "w.safetensors"
    convert.write_state_dict(source, expected)
  else:
    obj = {"bare": sd, "model": {"model": sd, "epoch": 1}, "state_dict": {"state_dict": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    source = tmp_path / "w.pth"
    torch.save(obj, source)
  got = convert.read_state_dict(source)
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)


def test_not_a_state_dict_is_a_clear_error(tmp_path):
  path = tmp_path / "x.pth"
  torch.save({"weights": [torch.zeros(2)], "fc.weight": torch.zeros(2)}, path)
  with pytest.raises(ValueError, match="not tensors.*weights"):
    convert.read_state_dict(path)
  with pytest.raises(FileNotFoundError):
    convert.read_state_dict(tmp_path / "missing.pth")


def test_missing_torch_says_how_to_install(tmp_path, monkeypatch):
  pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
  torch.save({"w": torch.ones(2)}, pth)
  convert.write_state_dict(st, {"w": np.ones(2, np.float32)})
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'dtf_jax\[torch\]'"):
    convert.read_state_dict(pth)
  with pytest.raises(ImportError, match=r"pip install 'dtf_jax\[torch\]'"):
    convert.write_state_dict(tmp_path / "out.pth", {"w": np.ones(2, np.float32)})
  # safetensors files need no torch.
  np.testing.assert_array_equal(convert.read_state_dict(st)["w"], np.ones(2, np.float32))


def test_torch_is_imported_only_inside_convert():
  # Static: no module outside dtf_jax/convert imports torch.
  offenders = []
  for root in (REPO / "dtf_jax", REPO / "kernels"):
    for path in root.rglob("*.py"):
      if "convert" in path.relative_to(REPO).parts:
        continue
      for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "torch" or n.startswith("torch.") for n in names):
          offenders.append(str(path.relative_to(REPO)))
  assert not offenders
  # Dynamic: importing the converter (and the models) does not import torch.
  code = ("import sys, dtf_jax.convert, dtf_jax.convert.cli, dtf_jax.models; "
          "sys.exit('torch' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


# ------------------------------------------------------------------------------------------------
# The originals' key rules on raw state_dicts.
# ------------------------------------------------------------------------------------------------

def test_remove_fc_follows_the_original_per_family():
  sd = {k: np.zeros(1) for k in ("fc.weight", "fc.bias", "fc_dual.weight", "fc_dual.bias", "x")}
  kept, dropped = convert.remove_fc("c2d_sifa_resnet50", sd)
  assert sorted(dropped) == ["fc.bias", "fc.weight"] and "fc_dual.weight" in kept
  kept, dropped = convert.remove_fc("dg_p3d_resnet50", sd)
  assert sorted(kept) == ["x"]
  assert len(sd) == 5  # input untouched


def test_remove_defcor_weight_and_convert_fft_weight():
  sd = {"layer2.1.def_cor.weight": np.zeros(1), "layer1.0.dtf_blk.weights_cor": np.zeros(1),
        "layer1.0.dtf_blk.freq_w": np.zeros(1), "layer1.0.conv1.weight": np.zeros(1)}
  kept, dropped = convert.remove_defcor_weight("c2d_sifa_resnet50", sd)
  assert dropped == ["layer2.1.def_cor.weight"] and len(kept) == 3
  kept, dropped = convert.convert_fft_weight(sd)
  assert sorted(dropped) == ["layer1.0.dtf_blk.freq_w", "layer1.0.dtf_blk.weights_cor"]
  assert sorted(kept) == ["layer1.0.conv1.weight", "layer2.1.def_cor.weight"]


def test_convert_fft_weight_resizes_filter2_linearly():
  rng = np.random.default_rng(0)
  c, t = 3, 4
  w = rng.normal(size=(1, c, t, 1, 1, 2)).astype(np.float32)
  out, _ = convert.convert_fft_weight({"a.filter2.complex_weight": w, "dual.filter2.complex_weight": w})

  def resize(plane, new):  # half-pixel linear interpolation, mirrored at the borders
    x = (np.arange(new) + 0.5) * t / new - 0.5
    x = np.abs(x)
    x = np.where(x > t - 1, 2 * (t - 1) - x, x)
    lo = np.minimum(np.floor(x).astype(int), t - 2)
    frac = x - lo
    return plane[:, lo] * (1 - frac) + plane[:, lo + 1] * frac

  for key, new in (("a.filter2.complex_weight", 2 * t - 1), ("dual.filter2.complex_weight", t + 1)):
    assert out[key].shape == (1, c, new, 1, 1, 2)
    for part in range(2):
      np.testing.assert_allclose(out[key][0, :, :, 0, 0, part], resize(w[0, :, :, 0, 0, part], new),
                                 atol=1e-6)


# ------------------------------------------------------------------------------------------------
# ImageNet inflation (SPEC.md 5.3-5.4).
# ------------------------------------------------------------------------------------------------

def torchvision_resnet(layers, width, rng, num_classes=1000, with_counters=False):
  """A torchvision-layout ResNet (Bottleneck) state_dict of random values (old files: no counters)."""
  sd = {}

  def bn(prefix, c):
    sd[f"{prefix}.weight"] = rng.normal(1, 0.1, c).astype(np.float32)
    sd[f"{prefix}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{prefix}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    if with_counters:
      sd[f"{prefix}.num_batches_tracked"] = np.asarray(100, np.int64)

  def conv(key, o, i, k):
    sd[key] = rng.normal(0, 0.1, (o, i, k, k)).astype(np.float32)

  conv("conv1.weight", width, 3, 7)
  bn("bn1", width)
  inplanes = width
  for s, blocks in enumerate(layers):
    planes = width * 2 ** s
    for b in range(blocks):
      p = f"layer{s + 1}.{b}"
      conv(f"{p}.conv1.weight", planes, inplanes, 1)
      bn(f"{p}.bn1", planes)
      conv(f"{p}.conv2.weight", planes, planes, 3)
      bn(f"{p}.bn2", planes)
      conv(f"{p}.conv3.weight", planes * 4, planes, 1)
      bn(f"{p}.bn3", planes * 4)
      if b == 0:
        conv(f"{p}.downsample.0.weight", planes * 4, inplanes, 1)
        bn(f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  sd["fc.weight"] = rng.normal(size=(num_classes, inplanes)).astype(np.float32)
  sd["fc.bias"] = rng.normal(size=(num_classes,)).astype(np.float32)
  return sd


def official_swin(embed_dim, depths, num_heads, image_size, window, rng, num_classes=21841):
  """An official Swin ``{'model': state_dict}`` (patch4) with random values; buffers from the
  torch reference's own functions."""
  sd = {"patch_embed.proj.weight": rng.normal(size=(embed_dim, 3, 4, 4)).astype(np.float32),
        "patch_embed.proj.bias": rng.normal(size=embed_dim).astype(np.float32),
        "patch_embed.norm.weight": rng.normal(size=embed_dim).astype(np.float32),
        "patch_embed.norm.bias": rng.normal(size=embed_dim).astype(np.float32)}

  def vec(key, n):
    sd[key] = rng.normal(size=n).astype(np.float32)

  def mat(key, o, i):
    sd[key] = rng.normal(0, 0.1, (o, i)).astype(np.float32)

  res = image_size // 4
  for s, depth in enumerate(depths):
    d, r = embed_dim * 2 ** s, res // 2 ** s
    ws = min(window, r)
    for j in range(depth):
      p = f"layers.{s}.blocks.{j}."
      vec(p + "norm1.weight", d), vec(p + "norm1.bias", d)
      sd[p + "attn.relative_position_bias_table"] = rng.normal(
          size=((2 * ws - 1) ** 2, num_heads[s])).astype(np.float32)
      sd[p + "attn.relative_position_index"] = tswin.relative_position_index(ws).numpy()
      mat(p + "attn.qkv.weight", 3 * d, d), vec(p + "attn.qkv.bias", 3 * d)
      mat(p + "attn.proj.weight", d, d), vec(p + "attn.proj.bias", d)
      vec(p + "norm2.weight", d), vec(p + "norm2.bias", d)
      mat(p + "mlp.fc1.weight", 4 * d, d), vec(p + "mlp.fc1.bias", 4 * d)
      mat(p + "mlp.fc2.weight", d, 4 * d), vec(p + "mlp.fc2.bias", d)
      if j % 2 == 1 and r > window:
        sd[p + "attn_mask"] = tswin.shifted_window_mask(r, r, window, window // 2).numpy()
    if s < len(depths) - 1:
      mat(f"layers.{s}.downsample.reduction.weight", 2 * d, 4 * d)
      vec(f"layers.{s}.downsample.norm.weight", 4 * d), vec(f"layers.{s}.downsample.norm.bias", 4 * d)
  d = embed_dim * 2 ** (len(depths) - 1)
  vec("norm.weight", d), vec("norm.bias", d)
  mat("head.weight", num_classes, d), vec("head.bias", num_classes)
  return {"model": sd}


def test_inflate_resnet_raw_state_dict():
  rng = np.random.default_rng(0)
  sd = torchvision_resnet((1, 1, 1, 1), 8, rng)
  out = convert.inflate_resnet(sd, dual_branch=True)
  stem = out["conv1.weight"]
  assert stem.shape == (8, 3, 4, 7, 7)
  np.testing.assert_array_equal(stem[:, :, 2], sd["conv1.weight"])
  assert not np.any(stem[:, :, [0, 1, 3]])
  for key in ("layer1.0.conv2.weight", "layer3.0.downsample.0.weight", "layer4.0.conv1.weight"):
    np.testing.assert_array_equal(out[key], sd[key][:, :, None])
  np.testing.assert_array_equal(out["layer2.0.bn1.running_var"], sd["layer2.0.bn1.running_var"])
  dual = {k: v for k, v in out.items() if k.startswith("layer4_dual.")}
  assert len(dual) == sum(k.startswith("layer4.") for k in sd)
  for key, value in dual.items():
    np.testing.assert_array_equal(value, out[key.replace("layer4_dual", "layer4")])
  assert not any(k.startswith("layer4_dual") for k in convert.inflate_resnet(sd))
  with pytest.raises(ValueError, match="2-D conv kernel.*source='original'"):
    convert.inflate_resnet(out)


def test_inflate_swin_raw_state_dict():
  sd = official_swin(8, (2, 2), (1, 2), 16, 2, np.random.default_rng(1))["model"]
  plain = convert.inflate_swin(sd)
  temporal = convert.inflate_swin(sd, add_temporal_conv=True)
  stem = plain["patch_embed.proj.weight"]
  assert stem.shape == (8, 3, 4, 4, 4)
  np.testing.assert_array_equal(stem[:, :, 2], sd["patch_embed.proj.weight"])
  assert not np.any(stem[:, :, [0, 1, 3]])
  convs = sorted(k for k in temporal if k.endswith(".conv.weight"))
  assert convs == sorted(k.replace("mlp.fc1.weight", "conv.weight") for k in sd if "mlp.fc1.weight" in k)
  assert temporal["layers.1.blocks.0.conv.weight"].shape == (16, 16, 1, 3)
  assert not any(np.any(temporal[k]) for k in convs)
  assert set(temporal) - set(plain) == set(convs)


def test_imagenet_sifa_resnet_inflates_copies_dual_and_keeps_init_elsewhere():
  name, kw = "c2d_sifa_resnet50", dict(RESNET_TINY, layers=(1, 2, 1, 2))
  sd = torchvision_resnet((1, 2, 1, 2), 8, np.random.default_rng(2))
  model, report = convert.from_pytorch(name, sd, source="imagenet", num_classes=7,
                                       rngs=nnx.Rngs(3), return_report=True, **kw)
  stem = np.asarray(model.conv1.kernel[...])  # (kt, kh, kw, I, O)
  np.testing.assert_array_equal(stem[2], sd["conv1.weight"].transpose(2, 3, 1, 0))
  assert not np.any(stem[[0, 1, 3]])
  exported = convert.to_pytorch(model, name)
  for key, value in sd.items():
    if key.startswith("fc."):
      continue
    want = value[:, :, None] if (value.ndim == 4 and key != "conv1.weight") else value
    if key == "conv1.weight":
      want = convert.inflate_stem_kernel(value)
    np.testing.assert_array_equal(exported[key], want, err_msg=key)
    if key.startswith("layer4."):
      np.testing.assert_array_equal(exported[key.replace("layer4", "layer4_dual")], want)
  assert report.dropped_by_rule == {"fc.weight": "remove_fc", "fc.bias": "remove_fc"}
  # Everything else keeps the network's own initialisation.
  fresh = create_model(name, num_classes=7, rngs=nnx.Rngs(3), **kw)
  fresh_sd = convert.to_pytorch(fresh, name)
  expected_missing = sorted(k for k in fresh_sd if k not in convert.prepare_state_dict(
      name, sd, source="imagenet")[0])
  assert sorted(report.missing) == expected_missing
  kinds = {k.rsplit(".", 2)[-2] if "num_batches" not in k else "num_batches_tracked"
           for k in expected_missing}
  assert kinds == {"fc", "fc_dual", "fc1", "fc2", "conv_offset", "def_cor", "num_batches_tracked"}
  for key in expected_missing:
    np.testing.assert_array_equal(exported[key], fresh_sd[key], err_msg=key)
  assert "fc.weight" in report.summary() and "remove_fc" in report.summary()
  # load_into an existing model gives the same network.
  convert.load_into(fresh, name, sd, source="imagenet")
  for key, value in convert.to_pytorch(fresh, name).items():
    np.testing.assert_array_equal(value, exported[key], err_msg=key)


def test_imagenet_dtf_resnet_reports_the_dtf_extras_as_missing():
  name, kw = "c2d_dtf_resnet50", dict(RESNET_TINY, layers=(1, 1, 1, 1))
  sd = torchvision_resnet((1, 1, 1, 1), 8, np.random.default_rng(4), with_counters=True)
  state, report = convert.convert_state_dict(name, sd, source="imagenet", num_classes=7, **kw)
  assert report.missing and all(".dtf_blk." in k or k.startswith("fc.") for k in report.missing)
  assert len(report.converted) == len(sd) - 2  # all but fc.*
  assert np.asarray(state["layer3"][0]["conv2"]["kernel"][...]).shape == (1, 3, 3, 32, 32)


def test_imagenet_swin_drops_the_21k_head_and_patch_norm():
  sd = official_swin(8, (2, 2), (1, 2), 16, 2, np.random.default_rng(5))
  assert sd["model"]["head.weight"].shape == (21841, 16)
  state, report = convert.convert_state_dict("c2d_swin_vit_s_p4_w7", sd, source="imagenet",
                                             num_classes=7, **SWIN_TINY)
  assert sorted(report.ignored) == ["head.bias", "head.weight", "patch_embed.norm.bias",
                                    "patch_embed.norm.weight"]
  assert sorted(report.missing) == ["fc.bias", "fc.weight"]
  assert sorted(report.constants_checked) == sorted(
      k for k in sd["model"] if k.endswith(("relative_position_index", "attn_mask")))
  assert len(report.constants_checked) == 5  # 4 index tables + the one shifted 4x4 block's mask
  kernel = np.asarray(state["patch_embed"]["proj"]["kernel"][...])
  np.testing.assert_array_equal(kernel[2], sd["model"]["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  # A wrong constant (e.g. another window size) is an error, listed with the rest.
  bad = {"model": dict(sd["model"])}
  bad["model"]["layers.0.blocks.1.attn_mask"] = np.zeros_like(bad["model"]["layers.0.blocks.1.attn_mask"])
  with pytest.raises(convert.ConversionError, match=r"(?s)constant buffers.*layers\.0\.blocks\.1\.attn_mask"):
    convert.convert_state_dict("c2d_swin_vit_s_p4_w7", bad, source="imagenet", num_classes=7,
                               **SWIN_TINY)


def test_imagenet_sifa_swin_zero_temporal_conv_and_init_elsewhere():
  name = "c2d_sifa_swin_vit_s_p4_w7"
  kw = dict(SWIN_TINY, sifa_kernel=3)
  sd = official_swin(8, (2, 2), (1, 2), 16, 2, np.random.default_rng(6))
  model, report = convert.from_pytorch(name, sd, source="imagenet", num_classes=7, clip_length=8,
                                       rngs=nnx.Rngs(9), return_report=True, **kw)
  exported = convert.to_pytorch(model, name)
  assert "layers.0.blocks.1.conv.weight" in report.converted
  assert not np.any(exported["layers.0.blocks.1.conv.weight"])
  np.testing.assert_array_equal(exported["layers.1.blocks.0.mlp.fc1.weight"],
                                sd["model"]["layers.1.blocks.0.mlp.fc1.weight"])
  fresh = convert.to_pytorch(create_model(name, num_classes=7, clip_length=8, rngs=nnx.Rngs(9), **kw),
                             name)
  assert {k.split(".")[-2] for k in report.missing} == {"fc", "def_cor", "tda_norm"}
  for key in report.missing:
    np.testing.assert_array_equal(exported[key], fresh[key], err_msg=key)


def test_imagenet_dtf_swin_gets_zero_conv_and_reports_dtf_extras():
  sd = official_swin(8, (2, 2), (1, 2), 16, 2, np.random.default_rng(7))
  _, report = convert.convert_state_dict("c2d_dtf_swin_vit_s_p4_w7", sd, source="imagenet",
                                         num_classes=7, clip_length=8, **SWIN_TINY)
  assert sum(k.endswith(".conv.weight") for k in report.converted) == 4
  assert all(".dtf_block." in k or k.startswith("fc.") for k in report.missing)


# ------------------------------------------------------------------------------------------------
# Strictness: one error listing everything, with hints.
# ------------------------------------------------------------------------------------------------

def test_other_architecture_lists_every_offending_key():
  c2d = _numpy_sd(_torch_c2d())
  dtf_keys = set(tresnet.c2d_dtf_resnet(layers=(1, 1, 1, 1), num_classes=5, base_width=8).state_dict())
  with pytest.raises(convert.ConversionError) as info:
    convert.convert_state_dict("c2d_dtf_resnet50", c2d, num_classes=5, layers=(1, 1, 1, 1),
                               **RESNET_TINY)
  err = info.value
  assert set(err.missing) == dtf_keys - set(c2d) and len(err.missing) == 4 * 8  # 8 per DTF block
  assert not err.unexpected and not err.mismatched
  message = str(err)
  assert all(k in message for k in err.missing)
  assert "looks like a checkpoint of a plain (C2D) ResNet" in message


def test_mismatches_and_unknown_keys_are_listed_together_with_hints():
  sd = _numpy_sd(_torch_sifa())
  sd["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as info:
    convert.convert_state_dict("c2d_sifa_resnet50", sd, num_classes=9, clip_length=32,
                               layers=(1, 2, 1, 2), **RESNET_TINY)
  err = info.value
  assert err.unexpected == ["extra.weight"]
  mismatched = {m.split(":")[0] for m in err.mismatched}
  assert mismatched == {"fc.weight", "fc.bias", "fc_dual.weight", "fc_dual.bias"} | {
      k for k in sd if k.endswith("def_cor.weight")}
  assert "num_classes=5" in str(err) and "clip_length" in str(err)
  # The rules drop what cannot fit; dropped tensors keep the model's init.
  del sd["extra.weight"]
  _, report = convert.convert_state_dict(
      "c2d_sifa_resnet50", sd, num_classes=5, clip_length=32, remove_defcor_weight=True,
      layers=(1, 2, 1, 2), **RESNET_TINY)
  assert set(report.missing) == {k for k in sd if k.endswith("def_cor.weight")}
  assert set(report.dropped_by_rule.values()) == {"remove_defcor_weight"}


def test_head_rules_and_imagenet_hint():
  sd = _numpy_sd(_torch_c2d())
  kw = dict(num_classes=11, layers=(1, 1, 1, 1), **RESNET_TINY)
  _, report = convert.convert_state_dict("c2d_resnet50", sd, remove_fc=True, **kw)
  assert sorted(report.missing) == ["fc.bias", "fc.weight"]
  headless = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  with pytest.raises(convert.ConversionError, match="missing keys"):
    convert.convert_state_dict("c2d_resnet50", headless, **kw)
  _, report = convert.convert_state_dict("c2d_resnet50", headless, allow_missing_head=True, **kw)
  assert sorted(report.missing) == ["fc.bias", "fc.weight"]
  imagenet = torchvision_resnet((1, 1, 1, 1), 8, np.random.default_rng(0))
  with pytest.raises(convert.ConversionError, match="source='imagenet'"):
    convert.convert_state_dict("c2d_resnet50", imagenet, **kw)


def test_swin_gpu_layout_warning_only_for_original_dtf_and_sifa_swin():
  kw = dict(num_classes=5, clip_length=8, **SWIN_TINY)
  dtf_sd = _numpy_sd(_torch_swin(tswin.C2D_DTF_SWIN_ViT, clip_len=2))
  with pytest.warns(UserWarning, match=r"SPEC\.md 2\.7"):
    _, report = convert.convert_state_dict("c2d_dtf_swin_vit_s_p4_w7", dtf_sd, **kw)
  assert report.warnings and "WARNING" in report.summary()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    convert.convert_state_dict("c2d_swin_vit_s_p4_w7", _numpy_sd(_torch_swin()), **kw)
    convert.convert_state_dict("c2d_resnet50", _numpy_sd(_torch_c2d()), num_classes=5,
                               layers=(1, 1, 1, 1), **RESNET_TINY)


# ------------------------------------------------------------------------------------------------
# Command line and output directory.
# ------------------------------------------------------------------------------------------------

def test_cli_import_export_round_trip(tmp_path, capsys):
  original = _numpy_sd(_torch_sifa(), seed=3)
  path = tmp_path / "ckpt_epoch_64.pth"
  torch.save({"opt": argparse.Namespace(net_name="c2d_sifa_resnet50"), "epoch": 64,
              "model": {f"module.{k}": torch.from_numpy(v) for k, v in original.items()}}, path)
  out = tmp_path / "sifa"

  def import_args(model, output):
    return ["--model", model, "--source", "original", "--input", str(path), "--output", str(output),
            "--image-size", "32", "--override", "layers=[1, 2, 1, 2]", "--override", "base_width=8"]

  args = import_args("c2d_sifa_resnet50", out)
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  assert "num_classes = 5 (from fc.weight)" in printed
  assert f"tensors converted: {len(original)}" in printed and "missing (kept" in printed
  meta = convert.read_meta(out)
  assert meta["model"] == "c2d_sifa_resnet50" and meta["num_classes"] == 5
  assert meta["model_overrides"] == {"layers": [1, 2, 1, 2], "base_width": 8}
  # The trainer's reader accepts the directory as a model state.
  from dtf_jax.train.checkpointing import load_model_state  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: create_model("c2d_sifa_resnet50", num_classes=5, rngs=nnx.Rngs(0),
                                                 layers=(1, 2, 1, 2), **RESNET_TINY))
  restored = load_model_state(out, checkpointed_state(abstract))
  np.testing.assert_array_equal(np.asarray(restored["fc"]["kernel"]), original["fc.weight"].T)
  # Export back: identical to the input checkpoint, as safetensors and as .pth.
  for suffix in ("safetensors", "pth"):
    target = tmp_path / f"back.{suffix}"
    assert cli.main(["export", "--checkpoint", str(out), "--output", str(target)]) == 0
    back = convert.read_state_dict(target)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
      assert back[key].dtype == value.dtype, key
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  # Errors are one clear line on stderr, exit status 1.
  assert cli.main(import_args("c2d_dtf_resnet50", tmp_path / "x")) == 1
  assert "does not match the model 'c2d_dtf_resnet50'" in capsys.readouterr().err
  assert cli.main(args) == 1  # the output exists already
  assert "already exists" in capsys.readouterr().err


def test_cli_imagenet_needs_num_classes(tmp_path, capsys):
  path = tmp_path / "swin.pth"
  sd = official_swin(8, (2, 2), (1, 2), 16, 2, np.random.default_rng(0))
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd["model"].items()}}, path)
  base = ["--model", "c2d_dtf_swin_vit_s_p4_w7", "--source", "imagenet", "--input", str(path),
          "--clip-length", "8", "--image-size", "16", "--override", "embed_dim=8",
          "--override", "depths=(2, 2)", "--override", "num_heads=(1, 2)", "--override",
          "window_size=2"]
  assert cli.main(base + ["--output", str(tmp_path / "a")]) == 1
  assert "--num-classes is required" in capsys.readouterr().err
  assert cli.main(base + ["--output", str(tmp_path / "b"), "--num-classes", "3"]) == 0
  printed = capsys.readouterr().out
  assert "head.weight" in printed and "ignored" in printed
  model, meta = convert.load_model(tmp_path / "b")
  assert meta["converted_from"]["source"] == "imagenet"
  assert np.asarray(model.fc.kernel[...]).shape == (16, 3)


# ------------------------------------------------------------------------------------------------
# Full-size key and parameter counts (SPEC.md 4.7), from the abstract tree only.
# ------------------------------------------------------------------------------------------------

SPEC_4_7 = {  # name: (state_dict keys, parameters incl. frozen)
    "c2d_resnet50": (320, 24_355_856), "c2d_resnet101": (626, 43_347_984),
    "c2d_dtf_resnet50": (448, 28_951_472), "c2d_dtf_resnet101": (890, 52_067_120),
    "c2d_sifa_resnet50": (432, 43_105_440), "c2d_sifa_resnet101": (790, 63_692_512),
    "c2d_swin_vit_s_p4_w7": (362, 49_158_490),
    "c2d_dtf_swin_vit_s_p4_w7": (578, 75_142_330),
    "c2d_sifa_swin_vit_s_p4_w7": (458, 61_279_450),
}


@pytest.mark.parametrize("name", sorted(SPEC_4_7))
def test_full_size_state_dict_key_counts(name):
  abstract = nnx.eval_shape(lambda: create_model(name, num_classes=400, clip_length=16,
                                                 rngs=nnx.Rngs(0)))
  shapes = convert.torch_shapes(abstract, name)
  keys, params = SPEC_4_7[name]
  assert len(shapes) == keys
  buffers = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index",
             "attn_mask")
  assert sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(buffers)) == params
  if "swin" not in name:
    assert shapes["conv1.weight"] == (64, 3, 4, 7, 7)
  if "dtf_resnet" in name:  # SPEC.md 5.1 examples
    assert shapes["layer1.0.dtf_blk.filter_g.weight"] == (24, 292, 1, 1)
    assert shapes["layer4.2.dtf_blk.filter_g.weight"] == (192, 2084, 1, 1)
    assert shapes["layer1.0.dtf_blk.alpha1"] == (1, 64, 1, 1, 1)
  if "sifa_resnet" in name:
    assert shapes["layer4_dual.1.def_cor.weight"] == (512, 2, 3, 3)
    assert shapes["layer4_dual.0.downsample.0.weight"] == (2048, 1024, 1, 1, 1)
  if "swin" in name:
    assert shapes["patch_embed.proj.weight"] == (96, 3, 4, 4, 4)
    assert shapes["layers.2.blocks.1.attn_mask"] == (4, 49, 49)
    assert "layers.3.blocks.1.attn_mask" not in shapes  # 7x7 stage: no shift
