r"""SIFA-Swin-B (SIFA-Transformer) on Something-Something v1, the SIFA pipeline's recipe (SPEC.md 6).

Initialise from ImageNet weights (the originals' transfer_weights + remove_fc), then train::

  python -m dtf_jax.convert --model c2d_sifa_swin_vit_b_p4_w7 --source imagenet --num-classes 174 \
      --input swin_base_patch4_window7_224.pth --output pretrained/c2d_sifa_swin_vit_b_p4_w7_imagenet
  python train.py --config=configs/sifa_swin_ssv1.py --workdir=runs/sifa_swin_ssv1 \
      --config.init_from=pretrained/c2d_sifa_swin_vit_b_p4_w7_imagenet \
      --config.data.root=/data/ssv1 --config.data.train_list=/data/ssv1/ssv1_frame_train_list.txt \
      --config.data.val_list=/data/ssv1/ssv1_frame_val_list.txt

Evaluate (1 clip x 1 crop as the originals, and the multi-view extension)::

  python eval.py --config=configs/sifa_swin_ssv1.py --checkpoint=runs/sifa_swin_ssv1 \
      --config.data.root=/data/ssv1 --config.data.val_list=/data/ssv1/ssv1_frame_val_list.txt
"""

from dtf_jax.train import recipes


def get_config():
  c = recipes.get_base_config(model="c2d_sifa_swin_vit_b_p4_w7", dataset="ssv1", multiview_size=224)
  c = recipes.swin_overrides(c)
  return c
