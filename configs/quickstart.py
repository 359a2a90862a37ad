r"""Quickstart: a tiny DTF-ResNet on the synthetic motion-order dataset, on CPU in minutes.

The labels of ``dtf_jax.data``'s synthetic set depend only on the ORDER of the motion between
4-frame groups, so a DTF model (which mixes time steps) can learn it while a C2D model (which
never mixes the time steps after its stem) stays at chance -- compare with
``quickstart_c2d.py``::

  python train.py --config=configs/quickstart.py --workdir=/tmp/dtf_quickstart
  python train.py --config=configs/quickstart_c2d.py --workdir=/tmp/c2d_quickstart
  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/dtf_quickstart

Everything else is the originals' recipe (SGD with the per-iteration warm-up + cosine schedule,
gradient clipping at 40, weight decay 1e-4 on every parameter), shortened; see
``dtf_jax.train.recipes.quickstart_config``.
"""

from dtf_jax.train import recipes


def get_config():
  return recipes.quickstart_config("c2d_dtf_resnet50")
