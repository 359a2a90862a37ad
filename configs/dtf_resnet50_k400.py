r"""DTF-ResNet-50 (DTF-Net) on Kinetics-400, the SIFA pipeline's recipe (SPEC.md 6).

Initialise from ImageNet weights (the originals' transfer_weights + remove_fc), then train::

  python -m dtf_jax.convert --model c2d_dtf_resnet50 --source imagenet --num-classes 400 \
      --input resnet50-19c8e357.pth --output pretrained/c2d_dtf_resnet50_imagenet
  python train.py --config=configs/dtf_resnet50_k400.py --workdir=runs/dtf_resnet50_k400 \
      --config.init_from=pretrained/c2d_dtf_resnet50_imagenet \
      --config.data.root=/data/k400 --config.data.train_list=/data/k400/train.csv --config.data.val_list=/data/k400/val.csv

Evaluate (1 clip x 1 crop as the originals, and the multi-view extension)::

  python eval.py --config=configs/dtf_resnet50_k400.py --checkpoint=runs/dtf_resnet50_k400 \
      --config.data.root=/data/k400 --config.data.val_list=/data/k400/val.csv
"""

from dtf_jax.train import recipes


def get_config():
  c = recipes.get_base_config(model="c2d_dtf_resnet50", dataset="k400")
  return c
