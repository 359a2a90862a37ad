r"""Quickstart: a tiny DTF-ResNet on the synthetic motion-order dataset, on CPU in minutes.

The labels of ``dtf_jax.data``'s synthetic set depend only on the ORDER of the motion between
4-frame groups, so a DTF model (which mixes time steps) can learn it while a C2D model (which
never mixes the time steps after its stem) stays at chance -- compare with
``quickstart_c2d.py``::

  python train.py --config=configs/quickstart.py --workdir=/tmp/dtf_quickstart
  python train.py --config=configs/quickstart_c2d.py --workdir=/tmp/c2d_quickstart
  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/dtf_quickstart

Tiny network (one bottleneck per stage, stem width 16), 32x32 frames, 4 epochs of 2048 videos
with AdamW (warm-up + cosine per iteration, clipping at 40); see
``dtf_jax.train.recipes.quickstart_config``. Shorter/longer: ``--config.total_steps=N``.
"""

from dtf_jax.train import recipes


def get_config():
  return recipes.quickstart_config("c2d_dtf_resnet50")
