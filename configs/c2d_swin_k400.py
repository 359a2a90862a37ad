r"""C2D Swin-B baseline on Kinetics-400, the SIFA pipeline's recipe (SPEC.md 6).

Initialise from ImageNet weights (the originals' transfer_weights + remove_fc), then train::

  python -m dtf_jax.convert --model c2d_swin_vit_b_p4_w7 --source imagenet --num-classes 400 \
      --input swin_base_patch4_window7_224.pth --output pretrained/c2d_swin_vit_b_p4_w7_imagenet
  python train.py --config=configs/c2d_swin_k400.py --workdir=runs/c2d_swin_k400 \
      --config.init_from=pretrained/c2d_swin_vit_b_p4_w7_imagenet \
      --config.data.root=/data/k400 --config.data.train_list=/data/k400/train.csv --config.data.val_list=/data/k400/val.csv

Evaluate (1 clip x 1 crop as the originals, and the multi-view extension)::

  python eval.py --config=configs/c2d_swin_k400.py --checkpoint=runs/c2d_swin_k400 \
      --config.data.root=/data/k400 --config.data.val_list=/data/k400/val.csv
"""

from dtf_jax.train import recipes


def get_config():
  c = recipes.get_base_config(model="c2d_swin_vit_b_p4_w7", dataset="k400", multiview_size=224)
  c = recipes.swin_overrides(c)
  return c
