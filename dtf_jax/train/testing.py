"""Stand-ins for smoke tests of the training infrastructure (no video decoding, tiny network).

* ``TinyVideoNet``: conv (1x3x3, stride 2) -> BatchNorm -> ReLU -> global mean -> dropout -> linear,
  with one ``FrozenParam`` (a fixed per-channel scale) and optionally a second head (to exercise
  the SIFA-ResNet two-head path). Registered as ``tiny_video_test`` by ``register_tiny_model()``.
* ``InMemoryVideoData``: the ``dtf_jax.data`` loader interface over deterministic random clips:
  global batch ``k`` of the training stream is drawn from ``(seed, k)`` and every process takes its
  slice, so 1 process / N processes / N devices see the same global batches.

``python -m dtf_jax.train.testing --workdir DIR [--steps N] ...`` runs a tiny training (used by
the subprocess tests; also a quick check of a multi-host setup).
"""

from __future__ import annotations

import numpy as np
import ml_collections
import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax.layers import common

TINY_MODEL = "tiny_video_test"


class TinyVideoNet(nnx.Module):
  """``(N, L, H, W, 3) -> (N, K)`` logits (or a tuple of two with ``two_heads``)."""

  def __init__(self, *, num_classes, clip_length=4, image_size=8, rngs, width=4, dtype=None,
               bn_group_size=None, dropout_ratio=0.0, two_heads=False, batch_norm=True,
               unused_parameter=False, **unused):
    del clip_length, image_size, unused
    self.dtype = dtype
    self.conv1 = common.conv3d(3, width, (1, 3, 3), strides=(1, 2, 2), padding=(0, 1, 1), rngs=rngs,
                               dtype=dtype)
    self.bn1 = common.BatchNorm(width, group_size=bn_group_size) if batch_norm else None
    self.channel_scale = common.frozen_weight(jnp.linspace(0.5, 1.5, width))
    self.dropout = nnx.Dropout(dropout_ratio, rngs=rngs)
    self.fc = common.linear(width, num_classes, rngs=rngs, dtype=dtype)
    self.fc_dual = common.linear(width, num_classes, rngs=rngs, dtype=dtype) if two_heads else None
    # Like DTF-Swin's `conv` (SPEC 7.7): a parameter the forward pass never reads.
    self.spare = common.linear(width, width, rngs=rngs) if unused_parameter else None

  def __call__(self, x):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y = self.conv1(x)
    y = jax.nn.relu(self.bn1(y) if self.bn1 is not None else y)
    y = y * jax.lax.stop_gradient(self.channel_scale[...]).astype(y.dtype)
    feat = self.dropout(jnp.mean(y, axis=(1, 2, 3)))
    if self.fc_dual is not None:
      return self.fc(feat), self.fc_dual(feat)
    return self.fc(feat)


def register_tiny_model() -> None:
  """Registers ``TinyVideoNet`` as ``tiny_video_test`` (idempotent)."""
  from dtf_jax.models import registry  # pylint: disable=import-outside-toplevel
  if TINY_MODEL not in registry._REGISTRY:  # pylint: disable=protected-access
    registry.register(TINY_MODEL)(lambda **kw: TinyVideoNet(**kw))


def tiny_data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      source="in_memory", num_classes=3, clip_length=4, crop_size=8, num_clips=1, num_crops=1,
      train_size=64, val_size=10, seed=0))
  cfg.update(overrides)
  return cfg


def _clips(rng, n, cfg):
  """Random clips whose label shifts the mean of one colour channel (learnable)."""
  labels = rng.integers(0, cfg.num_classes, size=n).astype(np.int32)
  video = rng.normal(size=(n, cfg.clip_length, cfg.crop_size, cfg.crop_size, 3)).astype(np.float32)
  video[..., 0] += (labels.astype(np.float32) - (cfg.num_classes - 1) / 2)[:, None, None, None]
  return video, labels


class InMemoryTrainIterator:
  """Infinite iterator of per-process batches with ``get_state``/``set_state``."""

  def __init__(self, cfg, global_batch_size, seed, process_index, process_count):
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} not divisible by {process_count} processes")
    self.cfg = cfg
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.local = global_batch_size // process_count
    self.process_index = process_index
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position])
    video, labels = _clips(rng, self.global_batch_size, self.cfg)
    self.position += 1
    s = slice(self.process_index * self.local, (self.process_index + 1) * self.local)
    return {"video": video[s], "label": labels[s], "num_replaced": np.zeros((), np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


class InMemoryVideoData:
  """The ``dtf_jax.data`` loader interface (train/eval/steps_per_epoch) over random clips."""

  @staticmethod
  def steps_per_epoch(cfg, global_batch_size):
    return cfg.train_size // global_batch_size

  @staticmethod
  def build_train_loader(cfg, *, global_batch_size, seed, process_index, process_count):
    return InMemoryTrainIterator(cfg, global_batch_size, seed, process_index, process_count)

  @staticmethod
  def build_eval_loader(cfg, *, batch_size, process_index, process_count, split="val"):
    del split
    rng = np.random.default_rng([cfg.seed, 10 ** 6])
    views = cfg.num_clips * cfg.num_crops
    video, labels = _clips(rng, cfg.val_size * views, cfg)
    video_index = np.repeat(np.arange(cfg.val_size), views).astype(np.int32)
    view_index = np.tile(np.arange(views), cfg.val_size).astype(np.int32)
    labels = np.repeat(labels[::views][:cfg.val_size], views)  # one label per video
    n = len(labels)
    gb = batch_size * process_count
    num_batches = -(-n // gb)
    batches = []
    for b in range(num_batches):
      rows = np.arange(b * gb + process_index * batch_size, b * gb + (process_index + 1) * batch_size)
      valid = rows < n
      rows = np.minimum(rows, n - 1)
      batches.append({"video": video[rows], "label": labels[rows], "video_index": video_index[rows],
                      "view_index": view_index[rows], "valid": valid})
    return batches


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A complete experiment config for ``TinyVideoNet`` on ``InMemoryVideoData``."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name=TINY_MODEL, dtype="float32", dropout_ratio=0.2, remat=None, kernel_impl=None,
      image_size=None, overrides={}))
  config.data = tiny_data_config()
  config.batch_size = 8
  config.iter_size = 1
  config.loss_weight = 1.0
  config.total_steps = 6
  config.total_epochs = None
  config.bn_group_size = None
  config.label_smoothing = "none"
  config.label_smoothing_epsilon = 0.1
  config.head_weights = None
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", recipe="original", base_learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
      nesterov=None, clip_gradient=40.0, warmup_epochs=None, warmup_steps=1,
      warmup_multiplier=100.0, min_lr=1e-6, schedule="cosine"))
  config.mesh = ml_collections.ConfigDict(dict(fsdp=1, min_fsdp_size=2 ** 16))
  config.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True))
  config.log_every_steps = 1
  config.log_every_epochs = None
  config.eval_every_steps = None
  config.eval_every_epochs = None
  config.checkpoint_every_steps = 2
  config.checkpoint_every_epochs = None
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=8, split="val", in_training="1x1", log_every=0,
      protocols={"1x1": {"num_clips": 1, "num_crops": 1}, "multiview": {"num_clips": 2, "num_crops": 1}}))
  config.init_from = None
  config.init_strict = False
  config.tensorboard = False
  config.update_from_flattened_dict(overrides) if overrides else None
  return config


def main(argv=None):
  """Runs ``train_and_evaluate`` on the stand-ins; flags mirror train.py's distributed flags."""
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[], help="config override key=json_value")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--sleep_per_step", type=float, default=0.0)
  args = parser.parse_args(argv)
  import logging  # pylint: disable=import-outside-toplevel
  from dtf_jax.train import metrics  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  metrics.quiet_library_logs()
  from dtf_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  from dtf_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.reuse_step_memory()  # as train.py does
  from dtf_jax.train import trainer  # pylint: disable=import-outside-toplevel
  register_tiny_model()
  overrides = {}
  for item in args.set:
    key, value = item.split("=", 1)
    overrides[key] = json.loads(value)
  config = tiny_config(**overrides)
  data = InMemoryVideoData()
  if args.sleep_per_step:
    base_loader = data.build_train_loader

    class Slow(InMemoryTrainIterator):
      def __next__(self):
        time.sleep(args.sleep_per_step)
        return super().__next__()

    def slow_loader(cfg, **kw):
      it = base_loader(cfg, **kw)
      slow = Slow.__new__(Slow)
      slow.__dict__.update(it.__dict__)
      return slow

    data.build_train_loader = slow_loader
  summary = trainer.train_and_evaluate(config, args.workdir, data_api=data)
  if jax.process_index() == 0:
    print("SUMMARY " + json.dumps({"status": summary["status"], "step": summary["step"],
                                   "eval": summary["eval"]}), flush=True)


if __name__ == "__main__":
  main()
