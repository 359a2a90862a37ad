r"""DTF-ResNet-50 (DTF-Net) on Something-Something v1, the SIFA pipeline's recipe (SPEC.md 6).

Initialise from ImageNet weights (the originals' transfer_weights + remove_fc), then train::

  python -m dtf_jax.convert --model c2d_dtf_resnet50 --source imagenet --num-classes 174 \
      --input resnet50-19c8e357.pth --output pretrained/c2d_dtf_resnet50_imagenet
  python train.py --config=configs/dtf_resnet50_ssv1.py --workdir=runs/dtf_resnet50_ssv1 \
      --config.init_from=pretrained/c2d_dtf_resnet50_imagenet \
      --config.data.root=/data/ssv1 --config.data.train_list=/data/ssv1/ssv1_frame_train_list.txt \
      --config.data.val_list=/data/ssv1/ssv1_frame_val_list.txt

Evaluate (1 clip x 1 crop as the originals, and the multi-view extension)::

  python eval.py --config=configs/dtf_resnet50_ssv1.py --checkpoint=runs/dtf_resnet50_ssv1 \
      --config.data.root=/data/ssv1 --config.data.val_list=/data/ssv1/ssv1_frame_val_list.txt
"""

from dtf_jax.train import recipes


def get_config():
  c = recipes.get_base_config(model="c2d_dtf_resnet50", dataset="ssv1")
  return c
