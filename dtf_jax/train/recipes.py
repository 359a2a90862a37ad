"""The experiment-config recipes shared by ``configs/*.py`` (the SIFA pipeline, SPEC.md 6).

``get_base_config`` returns a complete ConfigDict; each experiment file calls it with the
dataset and model and changes what differs (``quickstart_config`` for the CPU quickstart). Field reference (all overridable on the command
line, e.g. ``--config.batch_size=48``):

  seed                 model init / dropout / data order seed.
  model.name           a registered network (``dtf_jax.models.list_models()``).
  model.dtype          compute dtype: 'float32' (the originals) or 'bfloat16' (mixed precision;
                       parameters, BatchNorm statistics, losses stay float32).
  model.remat          rematerialise residual blocks (memory for compute): None (the model's
                       default), False, True, or a policy name ('spatial_convs', ResNets).
  model.kernel_impl    'auto' | 'xla' | 'pallas' for the DTF/SIFA ops.
  model.dropout_ratio  head dropout (0.5 in the originals).
  model.overrides      further builder options (``layers``, ``base_width``, ``depths``, ...).
  data                 ``dtf_jax.data.default_data_config()`` with the dataset's fields.
  batch_size           GLOBAL clips per data-loader iteration over all devices and hosts (the
                       originals: 24 per GPU x 4 GPUs = 96).
  iter_size            iterations accumulated per optimizer step (4 in the originals: effective
                       batch 384 clips); accumulation: 'auto' | 'scan' | 'unroll' (steps.py).
  loss_weight          loss multiplier; with loss_weight = iter_size = 4 (Kinetics) the applied
                       gradient is the SUM of the per-iteration mean gradients, as the originals.
  total_epochs|total_steps, optimizer.warmup_epochs|warmup_steps: durations (one of each pair).
  optimizer            name 'sgd'|'adamw'; recipe 'original' (SPEC 6.4: no Nesterov, decay on all
                       parameters) | 'modern' (Nesterov, no decay on norms/biases/tables);
                       base_learning_rate, momentum, weight_decay, clip_gradient (global L2 norm,
                       None = off), warmup_multiplier, min_lr, schedule ('cosine'|'constant'),
                       skip_unused_parameters (True: parameters outside the loss's graph get
                       no decay/momentum, as PyTorch's None gradients).
  label_smoothing      'none' (the originals' configs) | 'lsr' (the originals' LSR, targets sum
                       to 1 + e/(K-1)) | 'standard'; label_smoothing_epsilon.
  head_weights         per-head loss weights for two-head models (None = 1 each: CE(main)+CE(dual)).
  bn_group_size        None = BatchNorm statistics over the global batch of each iteration
                       (default; identical on any device count) | 'device' = per-device batch (the
                       originals' per-GPU BatchNorm) | an int.
  mesh.fsdp            devices along the parameter-sharding axis (1 = pure data parallel).
  init_from            a model-state directory (``python -m dtf_jax.convert ... --output DIR``),
                       used when the workdir has no checkpoint; init_strict=False keeps the
                       initial values of tensors the file lacks or shapes differently (the
                       originals' transfer_weights / remove_fc).
  {log,eval,checkpoint}_every_{steps,epochs}: periods; checkpoint.keep, checkpoint.async_save.
  eval.protocols       named view settings: '1x1' (the originals' in-training protocol) and
                       'multiview' (extension, SPEC 7.12); eval.in_training names the protocol run
                       every eval period and at the end ('' = none); eval.batch_size is global
                       (views per batch over all hosts).
"""

from __future__ import annotations

import ml_collections

from dtf_jax.data import default_data_config

DATASETS = {
    # SPEC.md 6.1 (kinetics_base.yml / ssv1_base.yml) and the res50-1x16x1.k400 setting.
    "k400": dict(num_classes=400, base_learning_rate=0.04, warmup_epochs=1, total_epochs=64,
                 loss_weight=4.0, no_horizontal_flip=False),
    "ssv1": dict(num_classes=174, base_learning_rate=0.02, warmup_epochs=5, total_epochs=64,
                 loss_weight=1.0, no_horizontal_flip=True),
    # dtf_jax.data's generated motion-order dataset (4 classes), for quick runs.
    "synthetic": dict(num_classes=4, base_learning_rate=0.1, warmup_epochs=1, total_epochs=8,
                      loss_weight=1.0, no_horizontal_flip=False),
}


def data_config(dataset: str, *, clip_length: int = 16) -> ml_collections.ConfigDict:
  """The data fields of a dataset; paths are placeholders set on the command line."""
  d = default_data_config()
  d.clip_length = clip_length
  d.crop_size = 224
  d.num_workers = 8
  # The originals' epoch length floor(ceil(N / 4) / per-GPU batch) of a 4-GPU DistributedSampler.
  d.sampler_num_replicas = 4
  if dataset == "synthetic":
    d.source = "synthetic"
    d.num_workers = 0
    d.sampler_num_replicas = 1
  elif dataset == "k400":
    # Kinetics-400 as encoded videos; a CSV list `path,label[,num_frames]` per split.
    d.source = "video_list"
    d.root = "/path/to/kinetics400"
    d.train_list = "/path/to/kinetics400/train.csv"
    d.val_list = "/path/to/kinetics400/val.csv"
  elif dataset == "ssv1":
    # Something-Something v1 JPEG frames with the originals' list files (SPEC 6.2).
    d.source = "frame_list"
    d.root = "/path/to/20bn-something-something-v1"
    d.train_list = "/path/to/ssv1_frame_train_list.txt"
    d.val_list = "/path/to/ssv1_frame_val_list.txt"
    d.frame_template = "%05d.jpg"
  else:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
  d.num_classes = DATASETS[dataset]["num_classes"]
  d.no_horizontal_flip = DATASETS[dataset]["no_horizontal_flip"]
  return d


def get_base_config(*, model: str, dataset: str, clip_length: int = 16,
                    multiview_size: int = 256) -> ml_collections.ConfigDict:
  """The originals' recipe for ``model`` on ``dataset`` ('k400', 'ssv1' or 'synthetic').

  Args:
    model: registered network name.
    dataset: 'k400', 'ssv1' or 'synthetic'.
    clip_length: frames per clip.
    multiview_size: resize/crop of the multi-view protocol (256 for ResNets; 224 for Swins, whose
      windows fix the input size).
  """
  ds = DATASETS[dataset]
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = model
  c.model.dtype = "float32"
  c.model.remat = ml_collections.FieldReference(None, field_type=object)  # None: the model's default
  c.model.kernel_impl = "auto"
  c.model.dropout_ratio = 0.5
  c.model.image_size = ml_collections.FieldReference(None, field_type=int)
  c.model.overrides = ml_collections.ConfigDict()

  c.data = data_config(dataset, clip_length=clip_length)

  c.batch_size = 96          # 24 per GPU x 4 GPUs
  c.iter_size = 4
  c.accumulation = "auto"
  c.loss_weight = ds["loss_weight"]
  c.total_epochs = ml_collections.FieldReference(ds["total_epochs"], field_type=float)
  c.total_steps = ml_collections.FieldReference(None, field_type=int)
  c.bn_group_size = ml_collections.FieldReference(None, field_type=object)
  c.label_smoothing = "none"
  c.label_smoothing_epsilon = 0.1
  c.head_weights = ml_collections.FieldReference(None, field_type=object)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.recipe = "original"
  c.optimizer.base_learning_rate = ds["base_learning_rate"]
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = ml_collections.FieldReference(None, field_type=bool)
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_gradient = ml_collections.FieldReference(40.0, field_type=float)
  c.optimizer.warmup_epochs = ml_collections.FieldReference(float(ds["warmup_epochs"]), field_type=float)
  c.optimizer.warmup_steps = ml_collections.FieldReference(None, field_type=int)
  c.optimizer.warmup_multiplier = 100.0
  c.optimizer.min_lr = 1e-6
  c.optimizer.schedule = "cosine"
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # Parameters the loss does not depend on are never updated (PyTorch's None gradients).
  c.optimizer.skip_unused_parameters = True

  c.mesh = ml_collections.ConfigDict(dict(fsdp=1, min_fsdp_size=2 ** 16))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True))
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.init_strict = False
  c.tensorboard = True

  c.log_every_steps = ml_collections.FieldReference(10, field_type=int)
  c.log_every_epochs = ml_collections.FieldReference(None, field_type=float)
  c.eval_every_epochs = ml_collections.FieldReference(10.0, field_type=float)  # eva_inter_freq
  c.eval_every_steps = ml_collections.FieldReference(None, field_type=int)
  c.checkpoint_every_epochs = ml_collections.FieldReference(1.0, field_type=float)
  c.checkpoint_every_steps = ml_collections.FieldReference(None, field_type=int)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32
  c.eval.split = "val"
  c.eval.in_training = "1x1"
  c.eval.log_every = 50
  c.eval.protocols = ml_collections.ConfigDict({
      "1x1": {"num_clips": 1, "num_crops": 1},
      "multiview": {"num_clips": 20, "num_crops": 3, "eval_resize": multiview_size,
                    "eval_crop_size": multiview_size},
  })
  return c


def swin_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Settings shared by the Swin configs (transformer families)."""
  # The SIFA pipeline (SGD, original recipe) trains every family; AdamW (optimizer.name='adamw',
  # recipe='modern', weight_decay 0.05, base_learning_rate ~1e-4 per 64 clips) is the usual
  # alternative for video transformers.
  c.model.remat = True
  return c


def quickstart_config(model: str) -> ml_collections.ConfigDict:
  """A tiny ``model`` (one bottleneck per stage, stem width 16) on a small synthetic set.

  Sized to train and evaluate on a 2-core CPU in a few minutes (``configs/quickstart*.py``):
  32x32 frames, 16 frames per clip (4 groups), 4 epochs of 2048 training videos, AdamW. The SGD
  recipe of the originals needs far more steps at this batch size (16 clips).
  """
  c = get_base_config(model=model, dataset="synthetic", multiview_size=32)
  c.model.overrides.layers = (1, 1, 1, 1)
  c.model.overrides.base_width = 16
  c.model.dropout_ratio = 0.0
  c.model.remat = False

  c.data.synthetic.height = 32
  c.data.synthetic.width = 32
  c.data.synthetic.num_train = 2048
  c.data.synthetic.num_val = 256
  c.data.clip_length = 16
  c.data.crop_size = 32
  c.data.crop_scale = (1.0, 1.0)   # no random crop: the whole (resized) frame
  c.data.crop_ratio = (1.0, 1.0)
  c.data.color_jitter = False
  c.data.num_workers = 0

  c.batch_size = 16
  c.iter_size = 1
  c.loss_weight = 1.0
  c.total_epochs = 4
  c.optimizer.name = "adamw"
  c.optimizer.recipe = "modern"
  c.optimizer.base_learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_epochs = 0.1

  c.log_every_steps = 16
  c.eval_every_epochs = 2.0
  c.checkpoint_every_epochs = 1.0
  c.eval.batch_size = 64
  c.eval.log_every = 0
  c.eval.protocols.multiview.num_clips = 1
  c.eval.protocols.multiview.num_crops = 3
  c.eval.protocols.multiview.eval_resize = 36
  c.eval.protocols.multiview.eval_crop_size = 32
  return c
