"""C2D, C2D-DTF and C2D-SIFA ResNets (SPEC.md 4.1-4.3, 4.5-4.7).

Input: a clip ``(N, L, H, W, 3)`` (float; cast to the compute dtype). Output: float32 logits
``(N, num_classes)``; the SIFA network returns ``(main, dual)`` (use ``sifa_combined_probs`` for the
original evaluation's class probabilities).

Layout of every network (channels-last):
  stem ``conv1`` (Conv3d 3->base_width, kernel (4,7,7), stride (4,2,2), pad (0,3,3)) -> ``bn1`` ->
  relu -> max-pool (1,3,3)/(1,2,2)/(0,1,1) with -inf padding (``T = L/4``) -> ``layer1..layer4``
  (planes ``base_width*(1,2,4,8)``, strides 1,2,2,2, expansion 4) -> mean over T,H,W -> dropout
  -> ``fc``. SIFA adds the dual branch on the ``layer3`` output: max-pool (2,1,1) over time ->
  ``layer4_dual`` (stride 1, ``clip_len = clip_length//8``) -> mean -> dropout -> ``fc_dual``.

Parameter paths mirror the PyTorch modules: ``conv1/kernel``, ``bn1/scale``,
``layer2/0/downsample/0/kernel``, ``layer1/0/dtf_blk/filter_g/kernel``, ``layer2/1/conv_offset/kernel``,
``layer2/1/def_cor/weight``, ``layer4_dual/0/fc1/kernel``, ``fc/kernel``, ``fc_dual/bias`` ... (block
lists are ``nnx.List``, so the block index is a path entry).

``image_size`` is validated (a positive int) but does not shape the network: it is fully
convolutional with a global average pool, so any H, W >= 1 runs.

Builder overrides (all keyword-only, validated):
  layers: blocks per stage (default (3,4,6,3) for *50, (3,4,23,3) for *101).
  base_width: stem width; stage planes are ``base_width*(1,2,4,8)`` (default 64).
  dtype: ``'float32'`` (default) or ``'bfloat16'`` compute; params stay float32; FFT, softmax and
    normalisation statistics are float32; logits float32.
  remat: recompute residual blocks in the backward pass (``nnx.remat``): ``False``, ``True`` (the
    whole block) or a policy of ``common.REMAT_POLICIES``: ``'spatial_convs'`` keeps the 3x3 conv
    outputs and recomputes 1x1 convs, BatchNorm and ReLU. Default ``'spatial_convs'`` for the C2D
    ResNets (measured on 2 CPU cores, batch 2 x 16 x 112²: peak step memory -30%, below PyTorch's,
    for +3-4% step time), ``False`` for DTF / SIFA (recomputing their temporal blocks costs ~10%,
    and they already need less memory than PyTorch).
  dropout_ratio: head dropout rate (default 0.5).
  kernel_impl: ``'auto' | 'xla' | 'pallas'`` for the DTF/SIFA ops.
  bn_group_size: per-device batch of the BatchNorm statistics (``None`` = whole batch).
  zero_init_residual: zero-init every ``bn3`` scale (default False for C2D/DTF, True for SIFA).
  sifa_prev_frame ('shift'|'first'), offset_zero_init (bool), sifa_kernel (SIFA only, SPEC 7.1/7.2/7.15).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax.layers import common
from dtf_jax.layers.resnet_blocks import (
    EXPANSION,
    SIFA_PREV_FRAME_MODES,
    Bottleneck,
    DEFLocalTransBottleneck,
    DTFBottleneck,
    GBottleneck,
)
from dtf_jax.models.registry import register

Array = jax.Array

STEM_TEMPORAL_STRIDE = 4
STAGE_STRIDES = (1, 2, 2, 2)
KERNEL_IMPLS = ("auto", "xla", "pallas")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# BlockFactory(index_in_stage, inplanes, planes, stride, *, stage, rngs) -> nnx.Module
BlockFactory = Callable[..., nnx.Module]


def sifa_combined_probs(logits) -> Array:
  """Class probabilities of the original evaluation (SPEC 6.6).

  Args:
    logits: ``(main, dual)`` from a SIFA-ResNet (each ``(N, classes)``) -> ``(softmax(main) +
      softmax(dual)) / 2``; a single ``(N, classes)`` array -> its softmax.
  Returns:
    ``(N, classes)`` float32 probabilities.
  """
  if isinstance(logits, (tuple, list)):
    probs = [jax.nn.softmax(z.astype(jnp.float32), axis=-1) for z in logits]
    return sum(probs) / len(probs)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _stem_pool(x: Array) -> Array:
  """MaxPool3d kernel (1,3,3), stride (1,2,2), padding (0,1,1), padded with -inf.

  ``common.max_pool_3x3_stride2``: PyTorch's first-maximum gradient, and a gather-form backward
  that XLA:CPU runs far faster than its generic select-and-scatter.
  """
  return common.max_pool_3x3_stride2(x)


def _temporal_pool(x: Array) -> Array:
  """MaxPool3d kernel (2,1,1), stride (2,1,1), no padding (SIFA ``maxpool_dual``)."""
  return nnx.max_pool(x, window_shape=(2, 1, 1), strides=(2, 1, 1), padding="VALID")


def _global_pool(x: Array) -> Array:
  """``PoolingAverage``: mean over T, H, W in float32 -> ``(N, C)``."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))


class C2DResNet(nnx.Module):
  """The shared ResNet skeleton: stem, four stages, average pool, dropout, ``fc``.

  Args:
    block_factory: ``f(index, inplanes, planes, stride, *, stage, rngs) -> block``; ``stage`` is
      the stage name (``'layer1'`` ... ``'layer4'``, ``'layer4_dual'``).
    layers: blocks per stage (4 ints).
    num_classes: outputs of ``fc``.
    clip_length: frames L of the input clip (a multiple of 4).
    base_width: stem width; stage planes ``base_width*(1,2,4,8)``.
    dropout_ratio: head dropout.
    zero_init_residual: zero-init every block's ``bn3`` scale.
    remat: ``False``, ``True`` or a ``common.REMAT_POLICIES`` name (see the module docstring).
    bn_group_size: see ``common.BatchNorm``.
    dtype: compute dtype.
    rngs: ``params`` (and ``dropout``) streams.
  """

  def __init__(
      self,
      block_factory: BlockFactory,
      layers: Sequence[int],
      *,
      num_classes: int,
      clip_length: int,
      base_width: int = 64,
      dropout_ratio: float = 0.5,
      remat: bool | str = False,
      bn_group_size: int | None = None,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.clip_length = clip_length
    self.num_classes = num_classes
    self.remat = remat
    self.dtype = dtype
    self.conv1 = common.conv3d(3, base_width, (STEM_TEMPORAL_STRIDE, 7, 7),
                               strides=(STEM_TEMPORAL_STRIDE, 2, 2), padding=(0, 3, 3),
                               kernel_init=common.kaiming_normal_fan_out(), dtype=dtype, rngs=rngs)
    self.bn1 = common.BatchNorm(base_width, group_size=bn_group_size)
    inplanes = base_width
    for s, (blocks, stride) in enumerate(zip(layers, STAGE_STRIDES)):
      planes = base_width * 2**s
      name = f"layer{s + 1}"
      setattr(self, name, _make_stage(block_factory, name, inplanes, planes, blocks, stride, rngs))
      inplanes = planes * EXPANSION
    self.num_features = inplanes
    self.dropout = nnx.Dropout(dropout_ratio, rngs=rngs)
    self.fc = common.linear(inplanes, num_classes, rngs=rngs)

  def _check_input(self, x: Array) -> None:
    if x.ndim != 5 or x.shape[-1] != 3 or x.shape[1] != self.clip_length:
      raise ValueError(
          f"{type(self).__name__} expects a clip (N, {self.clip_length}, H, W, 3), got shape {x.shape}")

  def _run_stage(self, stage: nnx.List, x: Array) -> Array:
    enabled, policy = common.remat_policy(self.remat)
    for block in stage:
      if enabled:
        x = nnx.remat(lambda blk, y: blk(y), policy=policy)(block, x)
      else:
        x = block(x)
    return x

  def features_to_layer3(self, x: Array) -> Array:
    """Stem and stages 1-3: ``(N, L, H, W, 3) -> (N, L/4, H/16, W/16, 16*base_width)``."""
    self._check_input(x)
    x = x.astype(self.dtype)
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = _stem_pool(x)
    for name in ("layer1", "layer2", "layer3"):
      x = self._run_stage(getattr(self, name), x)
    return x

  def __call__(self, x: Array) -> Array:
    """``(N, L, H, W, 3)`` -> float32 logits ``(N, num_classes)``."""
    x = self._run_stage(self.layer4, self.features_to_layer3(x))
    return self.fc(self.dropout(_global_pool(x)))


class C2DSIFAResNet(C2DResNet):
  """SIFA-ResNet: ``C2DResNet`` plus the dual branch on ``layer3`` (SPEC 4.3).

  Returns ``(logits_main, logits_dual)``, both float32 ``(N, num_classes)``. The dual branch is
  ``maxpool (2,1,1)`` over time -> ``layer4_dual`` (the layer4 block pattern, planes
  ``8*base_width``, stride 1) -> mean -> ``drop_dual`` -> ``fc_dual``.

  Args (beyond ``C2DResNet``):
    dual_block_factory: block factory for ``layer4_dual`` (built with ``clip_length//8`` frames).
  """

  def __init__(
      self,
      block_factory: BlockFactory,
      dual_block_factory: BlockFactory,
      layers: Sequence[int],
      *,
      num_classes: int,
      clip_length: int,
      base_width: int = 64,
      dropout_ratio: float = 0.5,
      remat: bool | str = False,
      bn_group_size: int | None = None,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    super().__init__(block_factory, layers, num_classes=num_classes, clip_length=clip_length,
                     base_width=base_width, dropout_ratio=dropout_ratio, remat=remat,
                     bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)
    planes = base_width * 8
    self.layer4_dual = _make_stage(dual_block_factory, "layer4_dual", planes * 2, planes, layers[3], 1,
                                   rngs)
    self.drop_dual = nnx.Dropout(dropout_ratio, rngs=rngs)
    self.fc_dual = common.linear(planes * EXPANSION, num_classes, rngs=rngs)

  def __call__(self, x: Array) -> tuple[Array, Array]:
    """``(N, L, H, W, 3)`` -> ``(main, dual)`` float32 logits, each ``(N, num_classes)``."""
    x3 = self.features_to_layer3(x)
    main = self._run_stage(self.layer4, x3)
    dual = self._run_stage(self.layer4_dual, _temporal_pool(x3))
    logits = self.fc(self.dropout(_global_pool(main)))
    logits_dual = self.fc_dual(self.drop_dual(_global_pool(dual)))
    return logits, logits_dual


def _make_stage(factory: BlockFactory, stage: str, inplanes: int, planes: int, blocks: int,
                stride: int, rngs: nnx.Rngs) -> nnx.List:
  modules = []
  for i in range(blocks):
    modules.append(factory(i, inplanes, planes, stride if i == 0 else 1, stage=stage, rngs=rngs))
    inplanes = planes * EXPANSION
  return nnx.List(modules)


# ------------------------------------------------------------------------------------------------
# Option validation shared by the builders.
# ------------------------------------------------------------------------------------------------

def _validate_common(name, *, num_classes, clip_length, image_size, layers, base_width, dtype, remat,
                     dropout_ratio, kernel_impl, bn_group_size):
  def positive_int(arg, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")

  positive_int("num_classes", num_classes)
  positive_int("clip_length", clip_length)
  positive_int("image_size", image_size)
  positive_int("base_width", base_width)
  if clip_length % STEM_TEMPORAL_STRIDE:
    raise ValueError(
        f"{name}: clip_length={clip_length} must be divisible by the stem's temporal stride "
        f"{STEM_TEMPORAL_STRIDE} (e.g. 8, 16 or 32)")
  layers = tuple(layers)
  if len(layers) != 4 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in layers):
    raise ValueError(f"{name}: layers must be 4 positive integers (blocks per stage), got {layers!r}")
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"{name}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dtype = DTYPES[dtype]
  else:
    try:
      dt = jnp.dtype(dtype)
    except TypeError as e:
      raise ValueError(f"{name}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from e
    if dt.name not in DTYPES:
      raise ValueError(f"{name}: dtype must be one of {sorted(DTYPES)}, got {dt.name}")
    dtype = DTYPES[dt.name]
  try:
    common.remat_policy(remat)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  if not isinstance(dropout_ratio, (int, float)) or not 0.0 <= dropout_ratio < 1.0:
    raise ValueError(f"{name}: dropout_ratio must be in [0, 1), got {dropout_ratio!r}")
  if kernel_impl not in KERNEL_IMPLS:
    raise ValueError(f"{name}: kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
  if bn_group_size is not None:
    positive_int("bn_group_size", bn_group_size)
  return layers, dtype


def _common_kwargs(*, num_classes, clip_length, base_width, dropout_ratio, remat, bn_group_size,
                   dtype, rngs):
  return dict(num_classes=num_classes, clip_length=clip_length, base_width=base_width,
              dropout_ratio=float(dropout_ratio), remat=remat, bn_group_size=bn_group_size,
              dtype=dtype, rngs=rngs)


# ------------------------------------------------------------------------------------------------
# C2D ResNet (SPEC 4.1).
# ------------------------------------------------------------------------------------------------

def build_c2d_resnet(
    name: str,
    default_layers: Sequence[int],
    *,
    num_classes: int,
    clip_length: int,
    image_size: int,
    rngs: nnx.Rngs,
    layers: Sequence[int] | None = None,
    base_width: int = 64,
    dtype="float32",
    remat: bool | str = "spatial_convs",
    dropout_ratio: float = 0.5,
    kernel_impl: str = "auto",
    bn_group_size: int | None = None,
    zero_init_residual: bool = False,
) -> C2DResNet:
  """Plain C2D ResNet of Bottlenecks (``kernel_impl`` is accepted and unused: no custom ops)."""
  layers, dtype = _validate_common(
      name, num_classes=num_classes, clip_length=clip_length, image_size=image_size,
      layers=default_layers if layers is None else layers, base_width=base_width, dtype=dtype,
      remat=remat, dropout_ratio=dropout_ratio, kernel_impl=kernel_impl, bn_group_size=bn_group_size)

  def factory(i, inplanes, planes, stride, *, stage, rngs):
    del i, stage
    return Bottleneck(inplanes, planes, stride=stride, zero_init_residual=bool(zero_init_residual),
                      bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)

  return C2DResNet(factory, layers, **_common_kwargs(
      num_classes=num_classes, clip_length=clip_length, base_width=base_width,
      dropout_ratio=dropout_ratio, remat=remat, bn_group_size=bn_group_size, dtype=dtype, rngs=rngs))


# ------------------------------------------------------------------------------------------------
# C2D-DTF ResNet (SPEC 4.2).
# ------------------------------------------------------------------------------------------------

def build_c2d_dtf_resnet(
    name: str,
    default_layers: Sequence[int],
    *,
    num_classes: int,
    clip_length: int,
    image_size: int,
    rngs: nnx.Rngs,
    layers: Sequence[int] | None = None,
    base_width: int = 64,
    dtype="float32",
    remat: bool | str = False,
    dropout_ratio: float = 0.5,
    kernel_impl: str = "auto",
    bn_group_size: int | None = None,
    zero_init_residual: bool = False,
) -> C2DResNet:
  """C2D ResNet whose every Bottleneck carries a DTF block (``clip_len = clip_length//4``)."""
  layers, dtype = _validate_common(
      name, num_classes=num_classes, clip_length=clip_length, image_size=image_size,
      layers=default_layers if layers is None else layers, base_width=base_width, dtype=dtype,
      remat=remat, dropout_ratio=dropout_ratio, kernel_impl=kernel_impl, bn_group_size=bn_group_size)
  clip_len = clip_length // STEM_TEMPORAL_STRIDE
  for s in range(4):
    width = base_width * 2**s
    if (width * (clip_len // 2 + 1)) % 8:
      raise ValueError(
          f"{name}: the DTF blocks of layer{s + 1} (width C={width}, clip_len T={clip_len}) need "
          f"C*(T//2+1) divisible by 8, got {width}*{clip_len // 2 + 1}={width * (clip_len // 2 + 1)}; "
          "use a base_width that is a multiple of 8 or a clip_length whose clip_length//4//2+1 is "
          "a multiple of 8/gcd(8, base_width)")

  def factory(i, inplanes, planes, stride, *, stage, rngs):
    del i, stage
    return DTFBottleneck(inplanes, planes, clip_len=clip_len, stride=stride,
                         zero_init_residual=bool(zero_init_residual), kernel_impl=kernel_impl,
                         bn_group_size=bn_group_size, dtype=dtype, rngs=rngs)

  return C2DResNet(factory, layers, **_common_kwargs(
      num_classes=num_classes, clip_length=clip_length, base_width=base_width,
      dropout_ratio=dropout_ratio, remat=remat, bn_group_size=bn_group_size, dtype=dtype, rngs=rngs))


# ------------------------------------------------------------------------------------------------
# C2D-SIFA ResNet (SPEC 4.3).
# ------------------------------------------------------------------------------------------------

def build_c2d_sifa_resnet(
    name: str,
    default_layers: Sequence[int],
    *,
    num_classes: int,
    clip_length: int,
    image_size: int,
    rngs: nnx.Rngs,
    layers: Sequence[int] | None = None,
    base_width: int = 64,
    dtype="float32",
    remat: bool | str = False,
    dropout_ratio: float = 0.5,
    kernel_impl: str = "auto",
    bn_group_size: int | None = None,
    zero_init_residual: bool = True,
    sifa_prev_frame: str = "shift",
    offset_zero_init: bool = False,
    sifa_kernel: Sequence[int] = (1, 3, 3, 3),
) -> C2DSIFAResNet:
  """SIFA-ResNet: layer1 Bottlenecks; layers 2-4 (and ``layer4_dual``) alternate GBottleneck (even
  index) / DEFLocalTransBottleneck (odd index). ``sifa_kernel[s]`` is K of stage s (entry 0 unused).
  """
  layers, dtype = _validate_common(
      name, num_classes=num_classes, clip_length=clip_length, image_size=image_size,
      layers=default_layers if layers is None else layers, base_width=base_width, dtype=dtype,
      remat=remat, dropout_ratio=dropout_ratio, kernel_impl=kernel_impl, bn_group_size=bn_group_size)
  if clip_length // 8 < 1:
    raise ValueError(
        f"{name}: clip_length={clip_length} leaves no frame for the dual branch (clip_length//8 = 0); "
        "use clip_length >= 8")
  if sifa_prev_frame not in SIFA_PREV_FRAME_MODES:
    raise ValueError(
        f"{name}: sifa_prev_frame must be one of {SIFA_PREV_FRAME_MODES}, got {sifa_prev_frame!r}")
  sifa_kernel = tuple(sifa_kernel)
  if len(sifa_kernel) != 4 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in sifa_kernel[1:]):
    raise ValueError(f"{name}: sifa_kernel must be 4 ints with odd positive entries 1-3, got {sifa_kernel!r}")
  if base_width < 4:
    raise ValueError(f"{name}: base_width must be >= 4 (GBottleneck fc1 has 4*planes//16 outputs), "
                     f"got {base_width}")
  clip_len = clip_length // STEM_TEMPORAL_STRIDE
  stage_index = {"layer1": 0, "layer2": 1, "layer3": 2, "layer4": 3, "layer4_dual": 3}
  block_kwargs = dict(zero_init_residual=bool(zero_init_residual), bn_group_size=bn_group_size,
                      dtype=dtype)

  def make_factory(t):
    def factory(i, inplanes, planes, stride, *, stage, rngs):
      if stage == "layer1":
        return Bottleneck(inplanes, planes, stride=stride, rngs=rngs, **block_kwargs)
      if i % 2 == 0:
        return GBottleneck(inplanes, planes, stride=stride, rngs=rngs, **block_kwargs)
      return DEFLocalTransBottleneck(
          inplanes, planes, clip_len=t, stride=stride, kernel_size=sifa_kernel[stage_index[stage]],
          sifa_prev_frame=sifa_prev_frame, offset_zero_init=bool(offset_zero_init),
          kernel_impl=kernel_impl, rngs=rngs, **block_kwargs)
    return factory

  return C2DSIFAResNet(make_factory(clip_len), make_factory(clip_length // 8), layers,
                       **_common_kwargs(num_classes=num_classes, clip_length=clip_length,
                                        base_width=base_width, dropout_ratio=dropout_ratio,
                                        remat=remat, bn_group_size=bn_group_size, dtype=dtype,
                                        rngs=rngs))


# ------------------------------------------------------------------------------------------------
# Registered names (the originals' names).
# ------------------------------------------------------------------------------------------------

R50_LAYERS = (3, 4, 6, 3)
R101_LAYERS = (3, 4, 23, 3)


@register("c2d_resnet50")
def c2d_resnet50(*, num_classes, clip_length, image_size, rngs, **overrides) -> C2DResNet:
  """C2D ResNet-50 (layers (3,4,6,3)); overrides as ``build_c2d_resnet``."""
  return build_c2d_resnet("c2d_resnet50", R50_LAYERS, num_classes=num_classes,
                          clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)


@register("c2d_resnet101")
def c2d_resnet101(*, num_classes, clip_length, image_size, rngs, **overrides) -> C2DResNet:
  """C2D ResNet-101 (layers (3,4,23,3)); overrides as ``build_c2d_resnet``."""
  return build_c2d_resnet("c2d_resnet101", R101_LAYERS, num_classes=num_classes,
                          clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)


@register("c2d_dtf_resnet50")
def c2d_dtf_resnet50(*, num_classes, clip_length, image_size, rngs, **overrides) -> C2DResNet:
  """C2D-DTF ResNet-50 (layers (3,4,6,3)); overrides as ``build_c2d_dtf_resnet``."""
  return build_c2d_dtf_resnet("c2d_dtf_resnet50", R50_LAYERS, num_classes=num_classes,
                              clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)


@register("c2d_dtf_resnet101")
def c2d_dtf_resnet101(*, num_classes, clip_length, image_size, rngs, **overrides) -> C2DResNet:
  """C2D-DTF ResNet-101 (layers (3,4,23,3)); overrides as ``build_c2d_dtf_resnet``."""
  return build_c2d_dtf_resnet("c2d_dtf_resnet101", R101_LAYERS, num_classes=num_classes,
                              clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)


@register("c2d_sifa_resnet50")
def c2d_sifa_resnet50(*, num_classes, clip_length, image_size, rngs, **overrides) -> C2DSIFAResNet:
  """C2D-SIFA ResNet-50 (layers (3,4,6,3)); overrides as ``build_c2d_sifa_resnet``."""
  return build_c2d_sifa_resnet("c2d_sifa_resnet50", R50_LAYERS, num_classes=num_classes,
                               clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)


@register("c2d_sifa_resnet101")
def c2d_sifa_resnet101(*, num_classes, clip_length, image_size, rngs, **overrides) -> C2DSIFAResNet:
  """C2D-SIFA ResNet-101 (layers (3,4,23,3)); overrides as ``build_c2d_sifa_resnet``."""
  return build_c2d_sifa_resnet("c2d_sifa_resnet101", R101_LAYERS, num_classes=num_classes,
                               clip_length=clip_length, image_size=image_size, rngs=rngs, **overrides)
