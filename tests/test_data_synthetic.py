"""The synthetic motion dataset: files, determinism, order-only labels."""

import os
import threading

import numpy as np
import pytest

import dtf_jax.data as data
from dtf_jax.data import decode
from dtf_jax.data import lists
from dtf_jax.data import synthetic


def small_cfg(cache_dir, **synthetic_overrides):
  cfg = data.default_data_config()
  cfg.synthetic.cache_dir = str(cache_dir)
  cfg.synthetic.num_train = 8
  cfg.synthetic.num_val = 4
  cfg.synthetic.height = 32
  cfg.synthetic.width = 48
  for k, v in synthetic_overrides.items():
    setattr(cfg.synthetic, k, v)
  cfg.crop_size = 32
  cfg.color_jitter = False
  return cfg


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  cfg = small_cfg(tmp_path_factory.mktemp('cache'))
  return cfg, data.ensure_synthetic_dataset(cfg)


def test_files_and_lists(generated):
  cfg, (train_list, val_list, root) = generated
  assert root.startswith(cfg.synthetic.cache_dir)
  train = lists.parse_list(train_list)
  val = lists.parse_list(val_list)
  assert len(train) == 8 and len(val) == 4
  assert sorted(e.label for e in train) == [0, 0, 1, 1, 2, 2, 3, 3]
  for e in train[:4] + val[:2]:
    assert e.num_frames == 16
    frames = decode.read_video_frames(os.path.join(root, e.path),
                                      lambda d: np.arange(d))
    assert frames.shape == (16, 32, 48, 3)
    groups = frames.reshape(4, 4, 32, 48, 3).astype(int)
    # Static within each aligned group of 4 frames, changing between groups.
    assert np.all(groups == groups[:, :1])
    assert all(np.abs(groups[g, 0] - groups[g + 1, 0]).mean() > 3
               for g in range(3))
  assert os.listdir(os.path.dirname(root)) == [os.path.basename(root)]


def test_reuse_and_parameter_hash(generated, tmp_path):
  cfg, paths = generated
  mtime = os.path.getmtime(paths[0])
  assert data.ensure_synthetic_dataset(cfg) == paths
  assert os.path.getmtime(paths[0]) == mtime  # not regenerated
  other = small_cfg(cfg.synthetic.cache_dir, seed=1)
  assert synthetic.dataset_dir(other) != synthetic.dataset_dir(cfg)


def test_generation_is_deterministic(generated, tmp_path):
  cfg, (train_list, _, root) = generated
  cfg2 = small_cfg(tmp_path)
  _, _, root2 = data.ensure_synthetic_dataset(cfg2)
  for name in ('train/000003.mp4', 'val/000001.mp4'):
    a = decode.read_video_frames(os.path.join(root, name),
                                 lambda d: np.arange(d))
    b = decode.read_video_frames(os.path.join(root2, name),
                                 lambda d: np.arange(d))
    np.testing.assert_array_equal(a, b)


def test_concurrent_generation_is_safe(tmp_path):
  cfg = small_cfg(tmp_path, num_train=4, num_val=4)
  results, errors = [], []

  def run():
    try:
      results.append(data.ensure_synthetic_dataset(cfg))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(set(results)) == 1
  assert os.listdir(tmp_path) == [os.path.basename(results[0][2])]
  assert len(lists.parse_list(results[0][0])) == 4


def test_group_multiset_does_not_depend_on_the_label():
  """With the same random draws every label shows the same groups, reordered.

  So any function of the unordered set of groups (what an order-blind model
  sees) has the same distribution for all four labels.
  """
  params = synthetic.synthetic_params(small_cfg('/unused', noise=0.0))
  for seed in range(5):
    videos = [synthetic.render_video(label, params,
                                     np.random.default_rng(seed))
              for label in range(4)]
    groups = [sorted(g.tobytes() for g in v[::4]) for v in videos]
    assert all(g == groups[0] for g in groups[1:])
    orders = {tuple(g.tobytes() for g in v[::4]) for v in videos}
    assert len(orders) == 4  # the order differs between labels


def test_label_is_the_direction_of_each_shape():
  params = synthetic.synthetic_params(small_cfg('/unused'))
  for label in range(4):
    ys_a, ys_b, step = synthetic.motion_groups(
        label, 4, params['height'], 4, np.random.default_rng(label))
    down_a, down_b = divmod(label, 2)
    assert ys_a[1] - ys_a[0] == (step if down_a else -step)
    assert ys_b[1] - ys_b[0] == (step if down_b else -step)
    assert step > 0


def test_bad_parameters():
  with pytest.raises(ValueError, match='clip_length'):
    cfg = small_cfg('/unused')
    cfg.clip_length = 12  # 3 groups: not an even number
    synthetic.synthetic_params(cfg)
  with pytest.raises(ValueError, match='even'):
    synthetic.synthetic_params(small_cfg('/unused', height=33))


def test_synthetic_source_loaders(generated):
  cfg, _ = generated
  loader = data.build_train_loader(cfg, global_batch_size=4, seed=0)
  batch = next(iter(loader))
  assert batch['video'].shape == (4, 16, 32, 32, 3)
  assert data.steps_per_epoch(cfg, 4) == 2
  assert data.dataset_size(cfg, 'val') == 4
  eval_batches = list(data.build_eval_loader(cfg, batch_size=3))
  assert len(eval_batches) == 2
  np.testing.assert_array_equal(eval_batches[0]['label'], [0, 1, 2])
