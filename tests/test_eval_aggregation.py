"""Video-level aggregation of per-view scores, accuracy metrics and the predictions CSV."""

import csv

import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax import evaluate


def test_views_are_averaged_per_video_in_any_order_and_padding_is_ignored():
  rng = np.random.default_rng(0)
  num_videos, views, k = 5, 6, 4
  probs = rng.dirichlet(np.ones(k), size=(num_videos, views))
  labels = rng.integers(0, k, size=num_videos)
  # Shuffle the (video, view) rows over batches of 7 and pad the last batch.
  rows = rng.permutation(num_videos * views)
  vid, view = rows // views, rows % views
  agg = evaluate.VideoScoreAggregator(k)
  for start in range(0, len(rows), 7):
    sl = slice(start, start + 7)
    n = len(vid[sl])
    pad = 7 - n
    p = np.concatenate([probs[vid[sl], view[sl]], rng.random((pad, k))])
    agg.add(p, np.concatenate([labels[vid[sl]], np.zeros(pad, int)]),
            np.concatenate([vid[sl], np.zeros(pad, int)]), np.concatenate([view[sl], np.zeros(pad, int)]),
            np.concatenate([np.ones(n, bool), np.zeros(pad, bool)]))
  result = agg.result()
  np.testing.assert_array_equal(result.video_index, np.arange(num_videos))
  np.testing.assert_allclose(result.scores, probs.mean(axis=1), rtol=1e-12)
  np.testing.assert_array_equal(result.labels, labels)
  np.testing.assert_array_equal(result.num_views, views)


def test_metrics_from_known_scores():
  scores = np.array([
      [0.1, 0.6, 0.2, 0.1],   # label 1: top-1 hit
      [0.5, 0.1, 0.3, 0.1],   # label 2: 2nd
      [0.2, 0.3, 0.1, 0.4],   # label 2: 4th (last)
      [0.7, 0.1, 0.1, 0.1],   # label 0: hit
  ])
  labels = np.array([1, 2, 2, 0])
  assert evaluate.topk_accuracy(scores, labels, 1) == 0.5
  assert evaluate.topk_accuracy(scores, labels, 2) == 0.75
  # k is capped at num_classes - 1 = 3, as the original: video 2 (rank 4) stays a miss.
  assert evaluate.topk_accuracy(scores, labels, 5) == 0.75
  # classes present: 0 (1/1), 1 (1/1), 2 (0/2) -> mean 2/3.
  assert evaluate.mean_class_accuracy(scores, labels) == pytest.approx(2 / 3)
  result = evaluate.VideoScores(np.arange(4), scores, labels, np.full(4, 3))
  m = evaluate.summarize(result)
  assert (m["top1"], m["top5"], m["views_per_video"], m["num_videos"]) == (0.5, 0.75, 3.0, 4.0)


def test_two_head_probabilities_average_the_softmaxes():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  soft = lambda z: np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  got = evaluate.class_probabilities((jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(np.asarray(got), (soft(a) + soft(b)) / 2, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(evaluate.class_probabilities(jnp.asarray(a))), soft(a), rtol=1e-5)


def test_duplicate_views_and_label_conflicts_raise():
  agg = evaluate.VideoScoreAggregator(3)
  agg.add(np.full((1, 3), 1 / 3), [0], [7], [0])
  with pytest.raises(ValueError, match="scored twice"):
    agg.add(np.full((1, 3), 1 / 3), [0], [7], [0])
  with pytest.raises(ValueError, match="labels"):
    agg.add(np.full((1, 3), 1 / 3), [1], [7], [1])
  with pytest.raises(ValueError, match="probs"):
    agg.add(np.full((1, 4), 1 / 4), [1], [8], [0])


def test_predictions_csv(tmp_path):
  scores = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
  result = evaluate.VideoScores(np.array([3, 9]), scores, np.array([1, 2]), np.array([2, 2]))
  path = tmp_path / "pred.csv"
  evaluate.write_predictions_csv(str(path), result, topk=2, video_names={3: "a b.mp4"})
  rows = list(csv.DictReader(open(path)))
  assert [r["video_index"] for r in rows] == ["3", "9"]
  assert rows[0]["video"] == "a b.mp4" and rows[0]["prediction"] == "1" and rows[0]["correct"] == "1"
  assert rows[1]["top1_class"] == "0" and rows[1]["top2_class"] == "1" and rows[1]["correct"] == "0"
  assert float(rows[1]["top1_score"]) == pytest.approx(0.6)
