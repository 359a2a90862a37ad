"""The TFDS source against a tiny ArrayRecord dataset built here."""

import importlib.util
import io
import sys

import numpy as np
import pytest
from PIL import Image

import dtf_jax.data as data
from dtf_jax.data import sources

HAVE_TFDS = importlib.util.find_spec('tensorflow_datasets') is not None
NUM_TRAIN, NUM_TEST = 6, 3


def frame_value(i, k):
  """Pixel value of frame k of the i-th video of a split (k < 10)."""
  return 40 * i + 2 * k


def video_of(value):
  """The i of frame_value(i, k)."""
  return int(round((float(value) - 9) / 40))


def _build(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class DtfJaxTinyVideos(tfds.core.GeneratorBasedBuilder):
    """Videos of constant frames whose value encodes (video, frame)."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'video': tfds.features.Sequence(tfds.features.Image(
                  shape=(20, 28, 3), dtype=np.uint8, encoding_format='png')),
              'label': tfds.features.ClassLabel(num_classes=3),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, NUM_TRAIN),
              'test': self._generate_examples(100, NUM_TEST)}

    def _generate_examples(self, first, count):
      for i in range(count):
        video = first + i
        frames = []
        for k in range(5 + i):  # 5.. frames
          buf = io.BytesIO()
          Image.fromarray(np.full((20, 28, 3), frame_value(i, k),
                                  np.uint8)).save(buf, format='PNG')
          buf.seek(0)
          frames.append(buf)  # encoded already: no TensorFlow needed
        yield video, {'video': frames, 'label': video % 3}

  builder = DtfJaxTinyVideos(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return builder.name


@pytest.fixture(scope='module')
def tfds_cfg(tmp_path_factory):
  if not HAVE_TFDS:
    pytest.skip('tensorflow_datasets is not installed')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  name = _build(data_dir)
  cfg = data.default_data_config()
  cfg.source = 'tfds'
  cfg.tfds_name = name
  cfg.tfds_data_dir = data_dir
  cfg.tfds_train_split = 'train'
  cfg.tfds_val_split = 'test'
  cfg.clip_length = 4
  cfg.crop_size = 16
  cfg.color_jitter = False
  return cfg


def test_tfds_train_loader(tfds_cfg):
  assert data.dataset_size(tfds_cfg, 'train') == NUM_TRAIN
  assert data.dataset_size(tfds_cfg, 'val') == NUM_TEST
  tfds_cfg.video_dtype = 'uint8'
  loader = data.build_train_loader(tfds_cfg, global_batch_size=3, seed=0)
  it = iter(loader)
  seen = []
  for _ in range(2):  # one epoch
    batch = next(it)
    assert batch['video'].shape == (3, 4, 16, 16, 3)
    np.testing.assert_array_equal(batch['num_replaced'], 0)
    for clip, label in zip(batch['video'], batch['label']):
      i = video_of(clip[0, 8, 8, 0])  # the record's identity from its pixels
      assert label == i % 3
      seen.append(i)
  assert sorted(seen) == list(range(NUM_TRAIN))


def test_tfds_eval_reads_the_sampled_frames(tfds_cfg):
  tfds_cfg.video_dtype = 'uint8'
  batches = list(data.build_eval_loader(tfds_cfg, batch_size=2))
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert rows['valid'].tolist() == [True, True, True, False]
  seen = []
  for v in range(3):
    got = rows['video'][v][:, 8, 8, 0].astype(int)
    i = video_of(got[0])
    seen.append(i)
    # One clip from the start of the video: frames 0..3.
    assert np.abs(got - [frame_value(i, k) for k in range(4)]).max() <= 1
    assert rows['label'][v] == (100 + i) % 3
  assert sorted(seen) == [0, 1, 2]


def test_tfds_source_pickles_without_its_reader(tfds_cfg):
  import pickle  # pylint: disable=import-outside-toplevel
  src = data.build_source(tfds_cfg, 'train')
  src.read(0, lambda d: [0])
  clone = pickle.loads(pickle.dumps(src))
  assert clone._source is None  # pylint: disable=protected-access
  for record in range(NUM_TRAIN):
    frames = clone.read(record, lambda d: np.arange(d))
    i = video_of(frames[0, 0, 0, 0])
    assert frames.shape == (5 + i, 20, 28, 3)


def test_missing_tfds_explains_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match=r"pip install 'dtf_jax\[tfds\]'"):
    sources.import_tfds()
