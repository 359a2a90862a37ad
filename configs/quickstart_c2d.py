r"""Quickstart baseline: the same tiny network and budget as ``quickstart.py`` without DTF blocks.

C2D never mixes time steps after its stem, so it cannot tell the synthetic classes apart (they
differ only in the order of motion): expect chance accuracy (~25%)::

  python train.py --config=configs/quickstart_c2d.py --workdir=/tmp/c2d_quickstart
"""

from dtf_jax.train import recipes


def get_config():
  return recipes.quickstart_config("c2d_resnet50")
