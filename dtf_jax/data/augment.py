"""Clip augmentations of SPEC.md 6.3, with one set of random parameters per clip.

Every transform is split into a *parameter sampler* (draws from a
``np.random.Generator``; pure and cheap, so it can be tested on its own) and an
*applier* that uses PIL on every frame of the clip with the same parameters.
The image operations are PIL's (what torchvision's PIL path calls):

* RandomResizedCrop: torchvision's parameter sampling (10 tries of
  ``area*U(scale)`` and ``exp(U(log ratio))``, ``w = round(sqrt(area*r))``,
  ``h = round(sqrt(area/r))``, top/left uniform integers; fallback: the largest
  centred crop with aspect ratio clamped to ``ratio``), then crop and PIL
  bilinear resize to ``crop_size``.
* With p = 0.8 ColorJitter(0.4, 0.4, 0.4, 0.1): brightness / contrast /
  saturation factors ``U[0.6, 1.4]`` (PIL ``ImageEnhance`` Brightness /
  Contrast / Color) and hue ``U[-0.1, 0.1]`` (shift of PIL's 8-bit HSV hue by
  ``int(hue * 255)`` modulo 256), applied in a random order.
* RandomGrayscale p = 0.2 (PIL ``convert('L')`` replicated to 3 channels).
* With p = 0.5 PIL ``GaussianBlur`` with radius ``U[0.1, 2.0]``.
* Horizontal flip p = 0.5 (0 with ``no_horizontal_flip``).
* Optional RandAugment instead of jitter/grayscale/blur (the originals' clip
  RandAugment: ``n`` ops drawn with replacement from 16 PIL ops, magnitude
  ``m / 30`` of each op's range, per-op random sign and cutout position drawn
  once per clip).

Test time: resize the shorter side to ``resize`` (long side
``int(resize * long / short)``, PIL bilinear), then a centre crop (top/left
``round((H - c) / 2)``, Python rounding) or three crops along the longer side
(start, centre, end; the other axis centred).

Normalisation: ``(x / 255 - mean) / std`` in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')


@dataclasses.dataclass(frozen=True)
class TrainAugmentParams:
  """Random parameters of one training clip (shared by all its frames).

  Attributes:
    crop: (top, left, height, width) of the crop in the source frame.
    jitter: ((op, factor), ...) in application order; empty if not applied.
    grayscale: convert to 3-channel grey.
    blur_radius: PIL GaussianBlur radius, or None.
    flip: horizontal flip.
    rand_augment: ((op_name, value, negate, extra), ...) RandAugment ops.
  """
  crop: tuple[int, int, int, int]
  jitter: tuple[tuple[str, float], ...] = ()
  grayscale: bool = False
  blur_radius: float | None = None
  flip: bool = False
  rand_augment: tuple[tuple[str, float, bool, tuple[float, float]], ...] = ()


def random_resized_crop_params(rng: np.random.Generator, height: int,
                               width: int,
                               scale: Sequence[float] = (0.2, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)
                               ) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params`` with a numpy generator.

  Returns:
    (top, left, h, w) with ``0 < h <= height`` and ``0 < w <= width``.
  """
  if height < 1 or width < 1:
    raise ValueError(f'frame size must be positive, got {height}x{width}.')
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f'scale must satisfy 0 < min <= max, got {scale}.')
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f'ratio must satisfy 0 < min <= max, got {ratio}.')
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


# --- RandAugment (the originals' 16 clip ops and their ranges) --------------

_RA_OPS = (
    ('AutoContrast', 0.0, 1.0), ('Equalize', 0.0, 1.0), ('Invert', 0.0, 1.0),
    ('Rotate', 0.0, 30.0), ('Posterize', 0.0, 4.0), ('Solarize', 0.0, 256.0),
    ('SolarizeAdd', 0.0, 110.0), ('Color', 0.0, 0.9), ('Contrast', 0.0, 0.9),
    ('Brightness', 0.0, 0.9), ('Sharpness', 0.0, 0.9), ('ShearX', 0.0, 0.3),
    ('ShearY', 0.0, 0.3), ('Cutout', 0.0, 0.3571),
    ('TranslateX', 0.0, 0.4464), ('TranslateY', 0.0, 0.4464),
)
RAND_AUGMENT_OPS = tuple(name for name, _, _ in _RA_OPS)


def sample_rand_augment(rng: np.random.Generator, num_ops: int,
                        magnitude: float):
  """Draws ``num_ops`` RandAugment ops (with replacement) for one clip."""
  ops = []
  for k in rng.integers(0, len(_RA_OPS), size=num_ops):
    name, lo, hi = _RA_OPS[int(k)]
    value = float(magnitude) / 30.0 * (hi - lo) + lo
    negate = bool(rng.uniform() > 0.5)
    extra = (float(rng.uniform()), float(rng.uniform()))  # cutout centre
    ops.append((name, value, negate, extra))
  return tuple(ops)


def _rand_augment_frame(img: Image.Image, name: str, v: float, negate: bool,
                        extra: tuple[float, float]) -> Image.Image:
  s = -v if negate else v
  w, h = img.size
  if name == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if name == 'Equalize':
    return ImageOps.equalize(img)
  if name == 'Invert':
    return ImageOps.invert(img)
  if name == 'Rotate':
    return img.rotate(s)
  if name == 'Posterize':
    return ImageOps.posterize(img, 4 - int(v))
  if name == 'Solarize':
    return ImageOps.solarize(img, 256 - v)
  if name == 'SolarizeAdd':
    raw = np.asarray(img)
    added = np.clip(raw.astype(np.int32) + int(v), 0, 255).astype(np.uint8)
    return Image.fromarray(np.where(raw < 128, added, raw))
  if name == 'Color':
    return ImageEnhance.Color(img).enhance(1 - s)
  if name == 'Contrast':
    return ImageEnhance.Contrast(img).enhance(1 - s)
  if name == 'Brightness':
    return ImageEnhance.Brightness(img).enhance(1 - s)
  if name == 'Sharpness':
    return ImageEnhance.Sharpness(img).enhance(1 - s)
  if name == 'ShearX':
    return img.transform(img.size, Image.AFFINE, (1, s, 0, 0, 1, 0))
  if name == 'ShearY':
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, s, 1, 0))
  if name == 'TranslateX':
    return img.transform(img.size, Image.AFFINE, (1, 0, s * w, 0, 1, 0))
  if name == 'TranslateY':
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, s * h))
  if name == 'Cutout':
    size = v * w
    x0 = int(max(0, extra[0] * w - size / 2))
    y0 = int(max(0, extra[1] * h - size / 2))
    x1, y1 = min(w, x0 + size), min(h, y0 + size)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
    return img
  raise ValueError(f'unknown RandAugment op {name!r}')


# --- training parameters and application -----------------------------------

def sample_train_params(rng: np.random.Generator, height: int, width: int, *,
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        color_jitter: bool = True,
                        color_jitter_prob: float = 0.8,
                        grayscale_prob: float = 0.2,
                        blur_prob: float = 0.5,
                        flip_prob: float = 0.5,
                        rand_augment: tuple[int, float] | None = None
                        ) -> TrainAugmentParams:
  """Draws the random parameters of one training clip (SPEC.md 6.3).

  Args:
    rng: numpy generator (one per sample, e.g. seeded by (seed, sample index)).
    height, width: source frame size.
    scale, ratio: RandomResizedCrop ranges.
    color_jitter: False switches off jitter, grayscale and blur (the
      "colour" part of the recipe), e.g. for the synthetic quickstart.
    color_jitter_prob, grayscale_prob, blur_prob, flip_prob: probabilities.
    rand_augment: ``(num_ops, magnitude)`` to use RandAugment instead of the
      jitter/grayscale/blur chain, or None.

  Returns:
    TrainAugmentParams.
  """
  crop = random_resized_crop_params(rng, height, width, scale, ratio)
  jitter, gray, blur, ra = (), False, None, ()
  if rand_augment is not None:
    ra = sample_rand_augment(rng, int(rand_augment[0]), rand_augment[1])
  elif color_jitter:
    if rng.uniform() < color_jitter_prob:
      order = rng.permutation(4)
      jit = []
      for k in order:
        op = JITTER_OPS[int(k)]
        if op == 'hue':
          jit.append((op, float(rng.uniform(-0.1, 0.1))))
        else:
          jit.append((op, float(rng.uniform(0.6, 1.4))))
      jitter = tuple(jit)
    gray = bool(rng.uniform() < grayscale_prob)
    if rng.uniform() < blur_prob:
      blur = float(rng.uniform(0.1, 2.0))
  flip = bool(rng.uniform() < flip_prob)
  return TrainAugmentParams(crop=crop, jitter=jitter, grayscale=gray,
                            blur_radius=blur, flip=flip, rand_augment=ra)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
  """Shifts PIL's 8-bit HSV hue by ``int(hue_factor * 255)`` (mod 256)."""
  if not -0.5 <= hue_factor <= 0.5:
    raise ValueError(f'hue_factor must be in [-0.5, 0.5], got {hue_factor}.')
  h, s, v = img.convert('HSV').split()
  shift = int(hue_factor * 255) % 256
  np_h = ((np.asarray(h, np.int32) + shift) % 256).astype(np.uint8)
  return Image.merge('HSV', (Image.fromarray(np_h, 'L'), s, v)).convert(
      img.mode)


def _jitter_frame(img: Image.Image, op: str, factor: float) -> Image.Image:
  if op == 'brightness':
    return ImageEnhance.Brightness(img).enhance(factor)
  if op == 'contrast':
    return ImageEnhance.Contrast(img).enhance(factor)
  if op == 'saturation':
    return ImageEnhance.Color(img).enhance(factor)
  if op == 'hue':
    return adjust_hue(img, factor)
  raise ValueError(f'unknown jitter op {op!r}')


def _to_pil(frame) -> Image.Image:
  if isinstance(frame, Image.Image):
    return frame if frame.mode == 'RGB' else frame.convert('RGB')
  return Image.fromarray(np.ascontiguousarray(frame), 'RGB')


def apply_train_params(frames, params: TrainAugmentParams, crop_size: int
                       ) -> np.ndarray:
  """Applies one clip's parameters to every frame.

  Args:
    frames: uint8 (T, H, W, 3) array or a sequence of RGB PIL images / arrays.
    params: from :func:`sample_train_params`.
    crop_size: output side length.

  Returns:
    uint8 (T, crop_size, crop_size, 3).
  """
  top, left, h, w = params.crop
  out = np.empty((len(frames), crop_size, crop_size, 3), np.uint8)
  for t, frame in enumerate(frames):
    img = _to_pil(frame)
    img = img.crop((left, top, left + w, top + h)).resize(
        (crop_size, crop_size), Image.BILINEAR)
    for name, value, negate, extra in params.rand_augment:
      img = _rand_augment_frame(img, name, value, negate, extra)
    for op, factor in params.jitter:
      img = _jitter_frame(img, op, factor)
    if params.grayscale:
      img = img.convert('L').convert('RGB')
    if params.blur_radius is not None:
      img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_radius))
    out[t] = np.asarray(img)
  if params.flip:
    out = out[:, :, ::-1]
  return out


# --- test-time views --------------------------------------------------------

def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(H', W') after resizing the shorter side to ``short_side``."""
  if height <= width:
    return short_side, int(short_side * width / height)
  return int(short_side * height / width), short_side


def crop_positions(height: int, width: int, crop_size: int, num_crops: int
                   ) -> list[tuple[int, int]]:
  """(top, left) of 1 centre crop or 3 crops along the longer side."""
  if crop_size > height or crop_size > width:
    raise ValueError(
        f'eval crop {crop_size} is larger than the resized frame '
        f'{height}x{width}; use eval_resize >= eval_crop_size.')
  centre = (int(round((height - crop_size) / 2.0)),
            int(round((width - crop_size) / 2.0)))
  if num_crops == 1:
    return [centre]
  if num_crops == 3:
    if width >= height:
      return [(centre[0], 0), centre, (centre[0], width - crop_size)]
    return [(0, centre[1]), centre, (height - crop_size, centre[1])]
  raise ValueError(f'num_crops must be 1 or 3, got {num_crops}.')


def eval_views(frames, resize: int, crop_size: int, num_crops: int = 1
               ) -> np.ndarray:
  """Short-side resize then 1 centre crop or 3 crops.

  Args:
    frames: uint8 (T, H, W, 3) or a sequence of RGB images.
    resize: shorter side after resizing.
    crop_size: side of the square crops.
    num_crops: 1 or 3.

  Returns:
    uint8 (num_crops, T, crop_size, crop_size, 3).
  """
  resized = []
  for frame in frames:
    img = _to_pil(frame)
    w, h = img.size
    new_h, new_w = resized_shape(h, w, resize)
    if (new_h, new_w) != (h, w):
      img = img.resize((new_w, new_h), Image.BILINEAR)
    resized.append(np.asarray(img))
  clip = np.stack(resized)
  positions = crop_positions(clip.shape[1], clip.shape[2], crop_size,
                             num_crops)
  return np.stack([clip[:, t:t + crop_size, l:l + crop_size]
                   for t, l in positions])


def normalize(frames: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  bias = (-mean / std).astype(np.float32)
  out = frames.astype(np.float32)
  out *= scale
  out += bias
  return out
