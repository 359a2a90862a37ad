r"""Quickstart: a tiny DTF-ResNet on the synthetic motion-order dataset, on CPU in minutes.

The labels of ``dtf_jax.data``'s synthetic set depend only on the ORDER of the motion between
4-frame groups, so a DTF model (which mixes time steps) learns it while a C2D model (which never
mixes the time steps after its stem) stays at chance -- compare with ``quickstart_c2d.py``::

  python train.py --config=configs/quickstart.py --workdir=/tmp/dtf_quickstart
  python train.py --config=configs/quickstart_c2d.py --workdir=/tmp/c2d_quickstart
  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/dtf_quickstart

Everything else is the originals' recipe (SGD with the per-iteration warm-up + cosine schedule,
gradient clipping at 40, weight decay 1e-4 on every parameter), shortened.
"""

from configs import common


def get_config(model: str = "c2d_dtf_resnet50"):
  c = common.get_base_config(model=model, dataset="synthetic", multiview_size=64)
  # A tiny network: one bottleneck per stage, stem width 8.
  c.model.overrides.layers = (1, 1, 1, 1)
  c.model.overrides.base_width = 8
  c.model.dropout_ratio = 0.0
  c.model.remat = False

  c.data.clip_length = 16
  c.data.crop_size = 56
  c.data.crop_scale = (0.5, 1.0)
  c.data.color_jitter = False
  c.data.num_workers = 0

  c.batch_size = 16
  c.iter_size = 1
  c.loss_weight = 1.0
  c.total_epochs = 6
  c.optimizer.base_learning_rate = 0.1
  c.optimizer.warmup_epochs = 0.5

  c.log_every_steps = 8
  c.eval_every_epochs = 2.0
  c.checkpoint_every_epochs = 2.0
  c.eval.batch_size = 32
  c.eval.log_every = 0
  c.eval.protocols.multiview.num_clips = 1
  c.eval.protocols.multiview.num_crops = 3
  c.eval.protocols.multiview.eval_resize = 64
  c.eval.protocols.multiview.eval_crop_size = 56
  c.tensorboard = True
  return c
