"""Video-level evaluation: average class probabilities over views, then accuracy (SPEC.md 6.6).

Protocols:
  * **1x1** -- the originals' in-training evaluation: one clip from the start of the video, one
    centre crop (``num_clips=1, num_crops=1``);
  * **multi-view** (an extension, SPEC.md 7.12): ``num_clips x num_crops`` views per video
    (e.g. 20 x 3 at 256 px for Kinetics-400), probabilities averaged per video.

Per view the class probabilities are ``softmax(logits)``; for two-head models (SIFA-ResNet) the
average of the two heads' softmaxes, as the original. Accuracy: top-1 / top-5 (k capped at
``num_classes - 1``, as the original) and mean-class accuracy (mean over classes present of the
per-class top-1 recall).

The loop (``run_evaluation``) consumes an eval loader yielding per-process numpy batches
``{'video', 'label', 'video_index', 'view_index', 'valid'}`` (padding rows have ``valid=False``),
assembles global arrays on the mesh, gathers the probabilities to every host, and aggregates.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax.train import mesh as mesh_lib


def class_probabilities(outputs) -> jax.Array:
  """``softmax(logits)`` in float32; for a tuple of heads the mean of their softmaxes."""
  if isinstance(outputs, (tuple, list)):
    return sum(jax.nn.softmax(o.astype(jnp.float32), axis=-1) for o in outputs) / len(outputs)
  return jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)


@dataclasses.dataclass
class VideoScores:
  """Per-video results, sorted by ``video_index``.

  Attributes:
    video_index: ``(V,)`` int.
    scores: ``(V, K)`` mean class probabilities over the video's views.
    labels: ``(V,)`` int.
    num_views: ``(V,)`` views averaged per video.
    names: optional ``{video_index: name}`` (e.g. file paths) for the predictions CSV.
  """

  video_index: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  num_views: np.ndarray
  names: dict | None = None


class VideoScoreAggregator:
  """Accumulates per-view probabilities into per-video means."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self._sums: dict[int, np.ndarray] = {}
    self._counts: dict[int, int] = {}
    self._labels: dict[int, int] = {}
    self._views: dict[int, set] = {}

  def add(self, probs, labels, video_index, view_index=None, valid=None) -> None:
    """Adds a batch of views.

    Args:
      probs: ``(B, K)`` class probabilities per view.
      labels: ``(B,)`` labels.
      video_index: ``(B,)`` index of each view's video.
      view_index: ``(B,)`` index of the view within its video (duplicates are an error).
      valid: ``(B,)`` bool; padding rows (False) are ignored.
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != self.num_classes:
      raise ValueError(f"probs must be (B, {self.num_classes}), got {probs.shape}")
    b = probs.shape[0]
    labels = np.asarray(labels).reshape(b)
    video_index = np.asarray(video_index).reshape(b)
    valid = np.ones(b, bool) if valid is None else np.asarray(valid).astype(bool).reshape(b)
    view_index = None if view_index is None else np.asarray(view_index).reshape(b)
    for r in np.nonzero(valid)[0]:
      v = int(video_index[r])
      if v in self._sums:
        if self._labels[v] != int(labels[r]):
          raise ValueError(f"video {v} has views with labels {self._labels[v]} and {int(labels[r])}")
        self._sums[v] += probs[r]
        self._counts[v] += 1
      else:
        self._sums[v] = probs[r].copy()
        self._counts[v] = 1
        self._labels[v] = int(labels[r])
        self._views[v] = set()
      if view_index is not None:
        w = int(view_index[r])
        if w in self._views[v]:
          raise ValueError(f"video {v} view {w} was scored twice (eval loader sharding bug)")
        self._views[v].add(w)

  def result(self) -> VideoScores:
    order = sorted(self._sums)
    if not order:
      return VideoScores(np.zeros(0, np.int64), np.zeros((0, self.num_classes)),
                         np.zeros(0, np.int64), np.zeros(0, np.int64))
    counts = np.array([self._counts[v] for v in order])
    scores = np.stack([self._sums[v] for v in order]) / counts[:, None]
    return VideoScores(np.array(order), scores, np.array([self._labels[v] for v in order]), counts)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the ``k`` highest scores (k capped at K - 1)."""
  num_classes = scores.shape[1]
  k = max(1, min(k, num_classes - 1))
  if len(labels) == 0:
    return float("nan")
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def mean_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present in ``labels`` of their top-1 recall."""
  if len(labels) == 0:
    return float("nan")
  pred = np.argmax(scores, axis=1)
  classes = np.unique(labels)
  return float(np.mean([np.mean(pred[labels == c] == c) for c in classes]))


def summarize(result: VideoScores) -> dict:
  """Scalar metrics of a ``VideoScores``."""
  return {
      "top1": topk_accuracy(result.scores, result.labels, 1),
      "top5": topk_accuracy(result.scores, result.labels, 5),
      "mean_class_accuracy": mean_class_accuracy(result.scores, result.labels),
      "num_videos": float(len(result.labels)),
      "views_per_video": float(np.mean(result.num_views)) if len(result.labels) else 0.0,
  }


def write_predictions_csv(path: str, result: VideoScores, *, topk: int = 5,
                          video_names: dict[int, str] | None = None) -> None:
  """One row per video: index, name, label, predicted top-k classes and their scores, views."""
  k = min(topk, result.scores.shape[1])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["video_index", "video", "label", "prediction", "correct", "num_views"]
                    + [f"top{i + 1}_class" for i in range(k)] + [f"top{i + 1}_score" for i in range(k)])
    for v, s, y, n in zip(result.video_index, result.scores, result.labels, result.num_views):
      top = np.argsort(-s, kind="stable")[:k]
      name = (video_names or result.names or {}).get(int(v), "")
      writer.writerow([int(v), name, int(y), int(top[0]), int(top[0] == y), int(n)]
                      + [int(c) for c in top] + [f"{s[c]:.6f}" for c in top])


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _gather_local(x) -> np.ndarray:
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_evaluation(predict: Callable[[jax.Array], jax.Array], loader: Iterable, *, mesh,
                   num_classes: int, name: str = "eval", log_every: int = 20,
                   expected_views: int | None = None) -> tuple[dict, VideoScores]:
  """Scores every view of ``loader`` and aggregates per video.

  Args:
    predict: jitted ``video (B_global, L, H, W, 3) -> probabilities (B_global, K)``.
    loader: finite iterable of per-process batches (see module docstring). Every process must
      yield the same number of batches.
    mesh: the device mesh.
    num_classes: K.
    name: label for logs.
    log_every: progress line every this many batches (process 0).
    expected_views: views per video of the protocol; a mismatch is logged as a warning.

  Returns:
    ``(metrics, VideoScores)``; metrics hold top1, top5, mean_class_accuracy, num_videos,
    views_per_video, seconds.
  """
  aggregator = VideoScoreAggregator(num_classes)
  try:
    total = len(loader)  # type: ignore[arg-type]
  except TypeError:
    total = None
  start = time.perf_counter()
  views = 0
  for i, batch in enumerate(loader):
    video = mesh_lib.global_batch(mesh, {"video": batch["video"]})["video"]
    probs = _to_host(predict(video))
    meta = {k: _gather_local(batch[k]) for k in ("label", "video_index", "view_index", "valid")}
    aggregator.add(probs, meta["label"], meta["video_index"], meta["view_index"], meta["valid"])
    views += int(np.sum(meta["valid"]))
    if jax.process_index() == 0 and log_every and (i + 1) % log_every == 0:
      rate = views / max(time.perf_counter() - start, 1e-9)
      logging.info("%s: batch %d/%s, %d views, %.1f views/s", name, i + 1,
                   total if total is not None else "?", views, rate)
  result = aggregator.result()
  metrics = summarize(result)
  metrics["seconds"] = time.perf_counter() - start
  if expected_views is not None and len(result.num_views) and np.any(result.num_views != expected_views):
    logging.warning("%s: %d videos have a view count other than %d (min %d, max %d)", name,
                    int(np.sum(result.num_views != expected_views)), expected_views,
                    int(result.num_views.min()), int(result.num_views.max()))
  return metrics, result
