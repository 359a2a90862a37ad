"""PyTorch reference of the C2D / C2D-DTF / C2D-SIFA ResNets (SPEC.md 3.1, 3.3-3.5, 4.1-4.3, 4.6).

Written from SPEC.md with the originals' module names, so ``state_dict()`` keys are those of
SPEC.md 5.1: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``,
``layer1.0.dtf_blk.filter_g.weight``, ``layer2.1.conv_offset.weight``, ``layer2.1.def_cor.weight``,
``layer2.0.fc1.weight``, ``layer4_dual.*``, ``fc.*``, ``fc_dual.*``.

Layout ``(N, C, T, H, W)``; video input ``(N, 3, L, H, W)``. Custom ops are the torch formulas of
``torch_reference.temporal_ops`` (logical semantics, SPEC.md 2.7); the previous-frame shift of the
SIFA block is selectable (``sifa_prev_frame='shift' | 'first'``, SPEC.md 2.6). Everything is
constructible at reduced width (``base_width``) and depth (``layers``).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_reference import temporal_ops as tops
from torch_reference.dtf_block import DTFBlock


def conv1x1x1(inp: int, out: int, stride: int = 1) -> nn.Conv3d:
  return nn.Conv3d(inp, out, (1, 1, 1), stride=(1, stride, stride), bias=False)


def conv1x3x3(inp: int, out: int, stride: int = 1) -> nn.Conv3d:
  return nn.Conv3d(inp, out, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
               **unused):
    super().__init__()
    del unused
    self.conv1 = conv1x1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm3d(planes)
    self.conv2 = conv1x3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm3d(planes)
    self.conv3 = conv1x1x1(planes, planes * 4)
    self.bn3 = nn.BatchNorm3d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def shortcut(self, x):
    return x if self.downsample is None else self.downsample(x)

  def branch(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)))

  def forward(self, x):
    out = self.bn3(self.conv3(self.branch(x)))
    return self.relu(out + self.shortcut(x))


class DTFBottleneck(Bottleneck):
  """DTF on the raw conv2 output, before bn2 (SPEC.md 3.3)."""

  def __init__(self, inplanes, planes, stride=1, downsample=None, clip_len=4, **unused):
    super().__init__(inplanes, planes, stride, downsample)
    self.dtf_blk = DTFBlock(planes, clip_len)

  def branch(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.dtf_blk(self.conv2(out))))


class GBottleneck(Bottleneck):
  """Global-context bottleneck (SPEC.md 3.5)."""

  def __init__(self, inplanes, planes, stride=1, downsample=None, **unused):
    super().__init__(inplanes, planes, stride, downsample)
    self.fc1 = nn.Linear(planes * 4, planes * 4 // 16)
    self.fc2 = nn.Linear(planes * 4 // 16, planes * 4)

  def forward(self, x):
    b = self.bn3(self.conv3(self.branch(x)))
    context = self.fc2(self.relu(self.fc1(b.mean(dim=(2, 3, 4)))))
    return self.relu(b + self.shortcut(x) + context[:, :, None, None, None])


class DefCorFixW(nn.Module):
  """Frozen correlation weight ``(C, T, K, K)`` = 1/C at ``def_cor.weight``."""

  def __init__(self, channels: int, clip_len: int, kernel_size: int = 3):
    super().__init__()
    self.weight = nn.Parameter(torch.full((channels, clip_len, kernel_size, kernel_size), 1.0 / channels),
                               requires_grad=False)


class DEFLocalTransBottleneck(Bottleneck):
  """SIFA bottleneck (SPEC.md 3.4), K=3, d=1, one group."""

  def __init__(self, inplanes, planes, stride=1, downsample=None, clip_len=4, kernel_size=3,
               sifa_prev_frame="shift", **unused):
    super().__init__(inplanes, planes, stride, downsample)
    self.kernel_size = kernel_size
    self.sifa_prev_frame = sifa_prev_frame
    p = kernel_size // 2
    self.conv_offset = nn.Conv3d(planes, 2 * kernel_size * kernel_size, (1, kernel_size, kernel_size),
                                 padding=(0, p, p), bias=False)
    nn.init.zeros_(self.conv_offset.weight)
    self.def_cor = DefCorFixW(planes, clip_len, kernel_size)

  def forward(self, x):
    o = self.branch(x)
    prev = tops.previous_frame(o, self.sifa_prev_frame)
    gated = torch.sigmoid(o - prev) * o + o
    offsets = self.conv_offset(gated)
    corr = tops.deformable_correlation(o, offsets, self.def_cor.weight)
    agg = tops.deformable_aggregation(o, offsets, corr, self.kernel_size)
    o = o + tops.next_frame_or_zero(agg)
    out = self.bn3(self.conv3(o))
    return self.relu(out + self.shortcut(x))


class PoolingAverage(nn.Module):
  def forward(self, x):
    return x.mean(dim=(2, 3, 4))


class C2D_ResNet(nn.Module):  # noqa: N801
  """Stem + 4 stages + average pool + dropout + fc. ``block_for(stage, index)`` picks the block class."""

  def __init__(self, block_for, layers, num_classes=400, dropout_ratio=0.5, zero_init_residual=False,
               base_width=64, block_kwargs_for=None):
    super().__init__()
    self.block_for = block_for
    self.block_kwargs_for = block_kwargs_for or (lambda stage: {})
    self.inplanes = base_width
    self.conv1 = nn.Conv3d(3, base_width, (4, 7, 7), stride=(4, 2, 2), padding=(0, 3, 3), bias=False)
    self.bn1 = nn.BatchNorm3d(base_width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    self.layer1 = self._make_layer("layer1", base_width, layers[0], 1)
    self.layer2 = self._make_layer("layer2", base_width * 2, layers[1], 2)
    self.layer3 = self._make_layer("layer3", base_width * 4, layers[2], 2)
    self.layer4 = self._make_layer("layer4", base_width * 8, layers[3], 2)
    self.pool = PoolingAverage()
    self.dropout = nn.Dropout(dropout_ratio)
    self.fc = nn.Linear(base_width * 32, num_classes)
    self._init(zero_init_residual)

  def _make_layer(self, stage, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = nn.Sequential(conv1x1x1(self.inplanes, planes * 4, stride), nn.BatchNorm3d(planes * 4))
    modules = []
    for i in range(blocks):
      cls = self.block_for(stage, i)
      modules.append(cls(self.inplanes, planes, stride if i == 0 else 1, downsample if i == 0 else None,
                         **self.block_kwargs_for(stage)))
      self.inplanes = planes * 4
    return nn.Sequential(*modules)

  def _init(self, zero_init_residual):
    for m in self.modules():
      if isinstance(m, (nn.Conv3d, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm3d) and m.affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    if zero_init_residual:
      for m in self.modules():
        if isinstance(m, Bottleneck):
          nn.init.zeros_(m.bn3.weight)

  def features_to_layer3(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer3(self.layer2(self.layer1(x)))

  def forward(self, x):
    x = self.layer4(self.features_to_layer3(x))
    return self.fc(self.dropout(self.pool(x)))


def c2d_resnet(layers=(3, 4, 6, 3), **kw):
  return C2D_ResNet(lambda stage, i: Bottleneck, layers, **kw)


def c2d_dtf_resnet(layers=(3, 4, 6, 3), clip_length=16, **kw):
  return C2D_ResNet(lambda stage, i: DTFBottleneck, layers,
                    block_kwargs_for=lambda stage: {"clip_len": clip_length // 4}, **kw)


class C2D_SIFA_ResNet(C2D_ResNet):  # noqa: N801
  """SIFA-ResNet with the dual branch; ``forward`` returns ``[logits, logits_dual]``."""

  def __init__(self, layers=(3, 4, 6, 3), num_classes=400, dropout_ratio=0.5, zero_init_residual=True,
               clip_length=16, base_width=64, sifa_prev_frame="shift"):
    def block_for(stage, i):
      if stage == "layer1":
        return Bottleneck
      return GBottleneck if i % 2 == 0 else DEFLocalTransBottleneck

    def kwargs_for(stage):
      t = clip_length // 8 if stage == "layer4_dual" else clip_length // 4
      return {"clip_len": t, "sifa_prev_frame": sifa_prev_frame}

    nn.Module.__init__(self)
    self.block_for, self.block_kwargs_for = block_for, kwargs_for
    self.inplanes = base_width
    self.conv1 = nn.Conv3d(3, base_width, (4, 7, 7), stride=(4, 2, 2), padding=(0, 3, 3), bias=False)
    self.bn1 = nn.BatchNorm3d(base_width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    self.layer1 = self._make_layer("layer1", base_width, layers[0], 1)
    self.layer2 = self._make_layer("layer2", base_width * 2, layers[1], 2)
    self.layer3 = self._make_layer("layer3", base_width * 4, layers[2], 2)
    inplanes3 = self.inplanes
    self.layer4 = self._make_layer("layer4", base_width * 8, layers[3], 2)
    self.inplanes = inplanes3
    self.maxpool_dual = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))
    self.layer4_dual = self._make_layer("layer4_dual", base_width * 8, layers[3], 1)
    self.pool = PoolingAverage()
    self.dropout = nn.Dropout(dropout_ratio)
    self.fc = nn.Linear(base_width * 32, num_classes)
    self.pool_dual = PoolingAverage()
    self.drop_dual = nn.Dropout(dropout_ratio)
    self.fc_dual = nn.Linear(base_width * 32, num_classes)
    self._init(zero_init_residual)

  def forward(self, x):
    x3 = self.features_to_layer3(x)
    main = self.fc(self.dropout(self.pool(self.layer4(x3))))
    dual = self.fc_dual(self.drop_dual(self.pool_dual(self.layer4_dual(self.maxpool_dual(x3)))))
    return [main, dual]


def c2d_sifa_resnet(layers=(3, 4, 6, 3), **kw):
  return C2D_SIFA_ResNet(layers, **kw)


def count_state(model: nn.Module) -> tuple[int, int, int]:
  """``(state_dict keys, parameters incl. frozen, trainable parameters)``."""
  keys = len(model.state_dict())
  total = sum(p.numel() for p in model.parameters())
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return keys, total, trainable
