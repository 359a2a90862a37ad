"""Train/eval loaders: batches, sharding, checkpointing, bad data, workers."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

import dtf_jax.data as data
from dtf_jax.data import pipeline
from dtf_jax.data.encode import write_video

NUM_VIDEOS = 12


def video_frames(k, n=20, h=32, w=40):
  """Video k: smooth texture whose brightness encodes k; frame t shifts it."""
  rng = np.random.default_rng(k)
  coarse = rng.uniform(0, 60, (h // 8, w // 8, 3)).astype(np.float32)
  base = np.stack([np.asarray(Image.fromarray(coarse[..., c], 'F').resize(
      (w, h), Image.BILINEAR)) for c in range(3)], -1)
  return np.stack([(base + 10 * k + t).clip(0, 255)
                   for t in range(n)]).astype(np.uint8)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('ds')
  rows = []
  for k in range(NUM_VIDEOS):
    name = f'v {k:02d}.mp4'
    write_video(str(root / name), video_frames(k, n=20 + k), gop_size=6)
    rows.append(f'"{name}",{k % 5}')
  (root / 'train.csv').write_text('\n'.join(rows) + '\n')
  (root / 'val.csv').write_text('\n'.join(rows[:7]) + '\n')
  # The same videos as JPEG frame folders in the originals' list format.
  lines = []
  for k in range(NUM_VIDEOS):
    folder = root / 'frames' / f'clip {k}'
    folder.mkdir(parents=True)
    frames = video_frames(k, n=18)
    for t, f in enumerate(frames):
      Image.fromarray(f).save(folder / f'{t + 1:05d}.jpg', quality=95)
    lines.append(f'frames/clip {k} 18 {k % 5}')
  (root / 'frames.txt').write_text('\n'.join(lines))
  return root


def make_cfg(dataset_root, **overrides):
  root = dataset_root
  cfg = data.default_data_config()
  cfg.source = 'video_list'
  cfg.root = str(root)
  cfg.train_list = str(root / 'train.csv')
  cfg.val_list = str(root / 'val.csv')
  cfg.clip_length = 8
  cfg.crop_size = 24
  cfg.eval_resize = 28
  cfg.eval_crop_size = 24
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batches(dataset):
  cfg = make_cfg(dataset)
  loader = data.build_train_loader(cfg, global_batch_size=4, seed=0)
  assert loader.steps_per_epoch == 3 == data.steps_per_epoch(cfg, 4)
  assert data.dataset_size(cfg, 'train') == NUM_VIDEOS
  batch = next(iter(loader))
  assert set(batch) == {'video', 'label', 'num_replaced'}
  assert batch['video'].shape == (4, 8, 24, 24, 3)
  assert batch['video'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (4,)
  np.testing.assert_array_equal(batch['num_replaced'], np.zeros(4, np.int32))
  lo = -np.array(data.IMAGENET_MEAN) / np.array(data.IMAGENET_STD)
  hi = (1 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
  assert np.all(batch['video'] >= lo - 1e-5) and np.all(
      batch['video'] <= hi + 1e-5)


def test_epochs_are_permutations_reshuffled_per_epoch(dataset):
  cfg = make_cfg(dataset)
  loader = data.build_train_loader(cfg, global_batch_size=4, seed=3)
  epochs = [np.concatenate([loader.batches.sample_videos(e * 3 + s)
                            for s in range(3)]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(NUM_VIDEOS))
  assert not np.array_equal(epochs[0], epochs[1])
  other = data.build_train_loader(cfg, global_batch_size=4, seed=4)
  assert not np.array_equal(other.batches.sample_videos(0),
                            loader.batches.sample_videos(0))
  # Labels of an epoch's batches are the labels of those videos.
  it = iter(loader)
  labels = np.concatenate([b['label'] for b in take(it, 3)])
  np.testing.assert_array_equal(labels, epochs[0] % 5)


def test_drop_last_and_distributed_padding(dataset):
  cfg = make_cfg(dataset)
  loader = data.build_train_loader(cfg, global_batch_size=5, seed=0)
  assert loader.steps_per_epoch == 2  # 12 // 5; the last 2 are dropped
  assert len(set(np.concatenate([loader.batches.sample_videos(s)
                                 for s in range(2)]))) == 10
  cfg.sampler_num_replicas = 5  # pad 12 -> 15 like DistributedSampler(5)
  assert data.steps_per_epoch(cfg, 5) == 3  # floor(ceil(12/5) / 1)
  loader = data.build_train_loader(cfg, global_batch_size=5, seed=0)
  order = np.concatenate([loader.batches.sample_videos(s) for s in range(3)])
  np.testing.assert_array_equal(order[12:], order[:3])
  with pytest.raises(ValueError, match='fewer than global_batch_size'):
    data.build_train_loader(make_cfg(dataset), global_batch_size=16, seed=0)


def test_per_host_sharding_is_disjoint_and_matches_one_host(dataset):
  cfg = make_cfg(dataset)
  one = data.build_train_loader(cfg, global_batch_size=4, seed=1)
  hosts = [data.build_train_loader(cfg, global_batch_size=4, seed=1,
                                   process_index=p, process_count=2)
           for p in range(2)]
  for step in range(6):
    parts = [h.batches.sample_videos(step) for h in hosts]
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.concatenate(parts),
                                  one.batches.sample_videos(step))
  covered = np.concatenate([h.batches.sample_videos(s) for h in hosts
                            for s in range(3)])
  np.testing.assert_array_equal(np.sort(covered), np.arange(NUM_VIDEOS))
  # The data itself: the hosts' batches concatenate to the one-host batch.
  got = [take(iter(h), 2) for h in hosts]
  want = take(iter(one), 2)
  for s in range(2):
    for key in want[s]:
      np.testing.assert_array_equal(
          np.concatenate([got[0][s][key], got[1][s][key]]), want[s][key])
  assert hosts[0].local_batch_size == 2
  with pytest.raises(ValueError, match='multiple of process_count=3'):
    data.build_train_loader(cfg, global_batch_size=4, seed=1, process_index=0,
                            process_count=3)


def test_checkpoint_restore_continues_identically(dataset):
  cfg = make_cfg(dataset)
  loader = data.build_train_loader(cfg, global_batch_size=4, seed=7)
  it = iter(loader)
  take(it, 4)  # crosses an epoch boundary (3 steps per epoch)
  state = it.get_state()
  assert isinstance(state, bytes) and json.loads(state)['next_step'] == 4
  continued = take(it, 3)
  fresh = iter(data.build_train_loader(cfg, global_batch_size=4, seed=7))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), continued)
  # A state from another seed or batch size is refused.
  other = iter(data.build_train_loader(cfg, global_batch_size=4, seed=8))
  with pytest.raises(ValueError, match='seed=7'):
    other.set_state(state)


def test_orbax_checkpoint_with_grain_handler(dataset, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  import grain  # pylint: disable=import-outside-toplevel
  cfg = make_cfg(dataset)
  it = iter(data.build_train_loader(cfg, global_batch_size=4, seed=2))
  take(it, 2)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  continued = take(it, 2)
  fresh = iter(data.build_train_loader(cfg, global_batch_size=4, seed=2))
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert fresh.step == 2
  assert_batches_equal(take(fresh, 2), continued)


def test_workers_give_the_same_batches(dataset):
  cfg = make_cfg(dataset)
  want = take(iter(data.build_train_loader(cfg, global_batch_size=4,
                                           seed=5)), 3)
  cfg.num_workers = 2
  it = iter(data.build_train_loader(cfg, global_batch_size=4, seed=5))
  try:
    got = take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  assert_batches_equal(got, want)
  # A state saved with workers restores without them.
  cfg.num_workers = 0
  fresh = iter(data.build_train_loader(cfg, global_batch_size=4, seed=5))
  fresh.set_state(state)
  assert fresh.step == 3


def test_frame_list_source(dataset):
  cfg = make_cfg(dataset, source='frame_list',
                 train_list=str(dataset / 'frames.txt'),
                 val_list=str(dataset / 'frames.txt'))
  loader = data.build_train_loader(cfg, global_batch_size=4, seed=0)
  batch = next(iter(loader))
  assert batch['video'].shape == (4, 8, 24, 24, 3)
  np.testing.assert_array_equal(batch['num_replaced'], 0)
  np.testing.assert_array_equal(batch['label'],
                                loader.batches.sample_videos(0) % 5)


def test_frame_list_short_videos(dataset, tmp_path):
  lst = tmp_path / 'short.txt'
  lst.write_text(f'{dataset}/frames/clip 0 18 0\n'
                 f'{dataset}/frames/clip 1 5 1\n'
                 f'{dataset}/frames/clip 2 18 2\n'
                 f'{dataset}/frames/clip 3 18 3\n')
  cfg = make_cfg(dataset, source='frame_list', root='', train_list=str(lst))
  with pytest.raises(data.ShortVideoError,
                     match=r"(?s)short_video='loop'.*short\.txt:2: .*clip 1 "
                     r"\(5 frames\)"):
    data.build_train_loader(cfg, global_batch_size=2, seed=0)
  cfg.short_video = 'loop'
  loader = data.build_train_loader(cfg, global_batch_size=4, seed=0)
  batch = next(iter(loader))
  np.testing.assert_array_equal(batch['num_replaced'], 0)


def test_short_video_found_while_decoding_stops_the_run(dataset):
  # The CSV list has no num_frames, so the check happens at decode time; a
  # short video is an error (as in the original), not a replaced sample.
  cfg = make_cfg(dataset, clip_length=24)  # the videos have 20..31 frames
  it = iter(data.build_train_loader(cfg, global_batch_size=12, seed=0))
  with pytest.raises(data.ShortVideoError,
                     match=r"v 0[0-3]\.mp4' has 2[0-3] frames.*'loop'"):
    next(it)


def test_malformed_list_fails_at_start_up(dataset, tmp_path):
  lst = tmp_path / 'bad.txt'
  lst.write_text('a 10 1\nb ten 2\n')
  cfg = make_cfg(dataset, source='frame_list', train_list=str(lst))
  with pytest.raises(data.ListFileError, match=r'bad\.txt:2:'):
    data.build_train_loader(cfg, global_batch_size=1, seed=0)


@pytest.fixture()
def bad_dataset(dataset, tmp_path):
  (tmp_path / 'random.mp4').write_bytes(
      np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
  good = [f'{dataset}/v {k:02d}.mp4,{k % 5}' for k in range(6)]
  rows = good[:2] + [f'{tmp_path}/missing.mp4,1'] + good[2:4] + [
      f'{tmp_path}/random.mp4,2'] + good[4:]
  (tmp_path / 'bad.csv').write_text('\n'.join(rows))
  return make_cfg(dataset, root='', train_list=str(tmp_path / 'bad.csv'),
                  val_list=str(tmp_path / 'bad.csv'))


def test_bad_samples_are_replaced_logged_and_counted(bad_dataset, caplog):
  cfg = bad_dataset
  with caplog.at_level(logging.WARNING, logger='dtf_jax.data'):
    it = iter(data.build_train_loader(cfg, global_batch_size=4, seed=0))
    batches = take(it, 8)  # 4 epochs of 2 steps
  replaced = sum(int(b['num_replaced'].sum()) for b in batches)
  assert replaced >= 8  # two bad videos in each of 4 epochs (each drawn once)
  assert replaced == it.num_replaced
  assert set(os.path.basename(k) for k in it.bad_files) == {'missing.mp4',
                                                            'random.mp4'}
  warnings = [r for r in caplog.records if 'replaced' in r.getMessage()]
  assert len(warnings) == 2  # once per file
  # Replacement is deterministic.
  again = take(iter(data.build_train_loader(cfg, global_batch_size=4,
                                            seed=0)), 8)
  assert_batches_equal(again, batches)
  # Restored iterators keep the counters.
  fresh = iter(data.build_train_loader(cfg, global_batch_size=4, seed=0))
  fresh.set_state(it.get_state())
  assert fresh.num_replaced == replaced and len(fresh.bad_files) == 2


def test_too_many_bad_samples_stop_with_a_list(bad_dataset):
  bad_dataset.max_bad_samples = 1
  it = iter(data.build_train_loader(bad_dataset, global_batch_size=4, seed=0))
  with pytest.raises(data.BadDataError) as info:
    take(it, 8)
  message = str(info.value)
  assert '2 distinct videos' in message
  assert 'max_bad_samples=1' in message
  assert 'missing.mp4' in message and 'random.mp4' in message


def test_eval_loader_views_padding_and_sharding(dataset):
  cfg = make_cfg(dataset, num_clips=2, num_crops=3)
  loader = data.build_eval_loader(cfg, batch_size=5)
  batches = list(loader)
  assert len(batches) == len(loader) == 9  # 7 videos * 6 views = 42 -> 45
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert rows['video'].shape == (45, 8, 24, 24, 3)
  assert rows['valid'].sum() == 42 and not rows['valid'][42:].any()
  np.testing.assert_array_equal(rows['video_index'][:42],
                                np.repeat(np.arange(7), 6))
  np.testing.assert_array_equal(rows['view_index'][:42],
                                np.tile(np.arange(6), 7))
  np.testing.assert_array_equal(rows['video_index'][42:], -1)
  np.testing.assert_array_equal(rows['label'][:42],
                                np.repeat(np.arange(7) % 5, 6))
  assert np.all(rows['video'][42:] == 0)
  # Crops of one clip differ; the same view twice is identical.
  v = rows['video']
  assert not np.array_equal(v[0], v[2])
  np.testing.assert_array_equal(next(iter(loader))['video'], v[:5])
  # Two hosts: same number of batches, disjoint views, together all of them.
  hosts = [list(data.build_eval_loader(cfg, batch_size=5, process_index=p,
                                       process_count=2)) for p in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 5
  seen = [(int(vi), int(w)) for h in hosts for b in h
          for vi, w, ok in zip(b['video_index'], b['view_index'], b['valid'])
          if ok]
  assert sorted(seen) == [(i, w) for i in range(7) for w in range(6)]


def test_eval_one_clip_is_the_start_of_the_video(dataset):
  cfg = make_cfg(dataset, video_dtype='uint8', eval_resize=32,
                 eval_crop_size=32)
  batch = next(iter(data.build_eval_loader(cfg, batch_size=2)))
  assert batch['video'].dtype == np.uint8
  # Video 1's first 8 frames, centre-cropped 32x40 -> 32x32 (left = 4).
  want = video_frames(1, n=8)[:, :, 4:36].astype(int)
  assert np.abs(batch['video'][1].astype(int) - want).mean() < 3


def test_eval_bad_videos_are_invalid_rows(bad_dataset):
  batches = list(data.build_eval_loader(bad_dataset, batch_size=4))
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  np.testing.assert_array_equal(rows['valid'],
                                [1, 1, 0, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(rows['video_index'], np.arange(8))


def test_uint8_output_and_normalize_video(dataset):
  cfg = make_cfg(dataset)
  f32 = next(iter(data.build_train_loader(cfg, global_batch_size=2, seed=0)))
  cfg.video_dtype = 'uint8'
  u8 = next(iter(data.build_train_loader(cfg, global_batch_size=2, seed=0)))
  assert u8['video'].dtype == np.uint8
  np.testing.assert_allclose(data.normalize_video(u8['video']), f32['video'],
                             atol=1e-5)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  np.testing.assert_allclose(
      np.asarray(data.normalize_video(jnp.asarray(u8['video']))),
      f32['video'], atol=1e-5)


def test_config_validation(dataset):
  for field, value, match in (('source', 'hdf5', 'data.source'),
                              ('num_crops', 2, 'num_crops'),
                              ('short_video', 'pad', 'short_video'),
                              ('eval_crop_size', 40, 'eval_crop_size'),
                              ('frame_template', 'x.jpg', 'frame_template')):
    cfg = make_cfg(dataset)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
      data.build_train_loader(cfg, global_batch_size=2, seed=0)
  cfg = make_cfg(dataset, train_list=None)
  with pytest.raises(ValueError, match='train_list'):
    data.build_train_loader(cfg, global_batch_size=2, seed=0)
