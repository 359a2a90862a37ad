"""The training loop, readable top to bottom: ``train_and_evaluate(config, workdir)``.

1. topology: mesh over all devices (``config.mesh``); global batch ``config.batch_size`` clips per
   data-loader iteration, ``config.iter_size`` iterations per optimizer step;
2. data: ``dtf_jax.data`` loaders (each process reads its slice of every global batch);
3. durations (epochs -> steps, ``durations.py``), optimiser and LR schedule (``optim.py``);
4. model and train state, created directly in their shardings; restored from the latest
   checkpoint in ``workdir`` if any, else optionally initialised from ``config.init_from``;
5. loop: step, non-finite check, logging, periodic 1x1 evaluation and checkpoints, SIGTERM
   (preemption) checkpoint; final checkpoint and evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dtf_jax import evaluate as evaluate_lib
from dtf_jax.train import checkpointing
from dtf_jax.train import durations as durations_lib
from dtf_jax.train import mesh as mesh_lib
from dtf_jax.train import metrics as metrics_lib
from dtf_jax.train import optim
from dtf_jax.train import steps as steps_lib
from dtf_jax.train import train_state as train_state_lib


class NonFiniteLossError(FloatingPointError):
  """Raised when a training step produces a NaN/Inf loss or gradient norm."""


# ----------------------------------------------------------------------------------------------
# Pieces shared with eval.py.
# ----------------------------------------------------------------------------------------------


def default_data_api():
  import dtf_jax.data as data_api  # pylint: disable=import-outside-toplevel
  return data_api


def resolve_bn_group_size(value, batch_size: int):
  """``config.bn_group_size``: None (global batch statistics), 'device' (per-device batch, as
  the originals' per-GPU BatchNorm) or an int number of clips per statistics group."""
  if value is None:
    return None
  if value == "device":
    return batch_size // jax.device_count()
  value = int(value)
  if value <= 0 or batch_size % value:
    raise ValueError(f"bn_group_size={value} must be a positive divisor of batch_size={batch_size}")
  return value


def model_factory(config, *, batch_size: int):
  """A no-argument function building ``config.model`` with fresh parameters."""
  from dtf_jax.models import create_model  # pylint: disable=import-outside-toplevel
  mc = config.model
  overrides = mc.get("overrides", None) or {}
  kwargs = dict(overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else overrides)
  for key in ("remat", "dropout_ratio", "kernel_impl"):
    if mc.get(key, None) is not None:
      kwargs[key] = mc[key]
  if mc.get("dtype", None) is not None:
    kwargs["dtype"] = jnp.dtype(mc.dtype)
  group = resolve_bn_group_size(config.get("bn_group_size", None), batch_size)
  if group is not None:
    kwargs["bn_group_size"] = group
  seed = int(config.get("seed", 0))

  def make():
    return create_model(mc.name, num_classes=config.data.num_classes,
                        clip_length=config.data.clip_length,
                        image_size=mc.get("image_size", None) or config.data.crop_size,
                        rngs=nnx.Rngs(params=seed, dropout=seed + 1), **kwargs)

  return make


def eval_data_config(config, protocol: str):
  """``config.data`` with the view settings of eval protocol ``protocol``.

  ``config.eval.protocols[protocol]`` holds data keys to override (``num_clips``, ``num_crops``,
  ``eval_resize``, ``eval_crop_size``) and optionally ``batch_size``.
  """
  spec = config.eval.protocols[protocol]
  data = ml_collections.ConfigDict(config.data.to_dict())
  for key, value in spec.items():
    if key == "batch_size":
      continue
    if key not in data:
      raise ValueError(f"eval protocol {protocol!r} sets {key!r}, which is not a data config key")
    data[key] = value
  return data


def video_preprocess(config, data_api):
  """On-device normalisation when the loader yields uint8 clips (``data.video_dtype='uint8'``)."""
  if config.data.get("video_dtype", "float32") != "uint8":
    return None
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  return lambda video: data_api.normalize_video(video, mean, std)


def load_init_state(setup, collections, path: str, *, strict: bool):
  """Model collections with the tensors of a converted checkpoint (``save_model_state`` layout)."""
  abstract_full = train_state_lib.model_state_tree(setup.abstract_model_collections())
  loaded = checkpointing.load_model_state(path, abstract_full, strict=strict)
  current_full = train_state_lib.model_state_tree(collections)
  merged = checkpointing.merge_model_state(current_full, loaded)
  return {k: train_state_lib.split_like(merged, collections[k]) for k in collections}


def run_eval_protocol(config, protocol, *, predict, collections, rngs, mesh, data_api, name=None):
  """Runs one eval protocol with the current model; returns ``(metrics, VideoScores)``."""
  spec = config.eval.protocols[protocol]
  data_cfg = eval_data_config(config, protocol)
  batch_size = int(spec.get("batch_size", config.eval.batch_size))
  mesh_lib.check_batch_size(batch_size, "eval batch_size")
  loader = data_api.build_eval_loader(
      data_cfg, batch_size=batch_size // jax.process_count(), process_index=jax.process_index(),
      process_count=jax.process_count(), split=config.eval.get("split", "val"))
  views = int(data_cfg.get("num_clips", 1)) * int(data_cfg.get("num_crops", 1))
  metrics, result = evaluate_lib.run_evaluation(
      lambda video: predict(collections, rngs, video), loader, mesh=mesh,
      num_classes=config.data.num_classes, name=name or f"eval {protocol}",
      expected_views=views, log_every=int(config.eval.get("log_every", 50)))
  source = getattr(loader, "source", None)
  if source is not None and hasattr(source, "name"):
    result.names = {int(v): source.name(int(v)) for v in result.video_index}
  return metrics, result


# ----------------------------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------------------------


class _PreemptionWatch:
  """SIGTERM -> 'save and stop' at the next step boundary (all processes agree)."""

  def __init__(self):
    self._flag = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:  # multi-process: jax's preemption sync service owns SIGTERM
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread
        self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self._flag = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service unavailable
        return False
    return self._flag

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def _save_config(config, workdir: str, durations) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(workdir, "durations.json"), "w", encoding="utf-8") as f:
    json.dump({**durations.__dict__, "steps_per_epoch": durations.steps_per_epoch}, f, indent=2)


def _next_step_batch(train_iter, iter_size: int, progress):
  """``iter_size`` data-loader batches stacked on a new leading axis (host numpy)."""
  t0 = time.perf_counter()
  batches = [next(train_iter) for _ in range(iter_size)]
  progress.add_data_wait(time.perf_counter() - t0)
  video = np.stack([np.asarray(b["video"]) for b in batches])
  label = np.stack([np.asarray(b["label"], np.int32) for b in batches])
  replaced = sum(int(np.sum(b.get("num_replaced", 0))) for b in batches)
  return {"video": video, "label": label}, replaced


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data_api=None) -> dict:
  """Trains (resuming from ``workdir`` if it holds a checkpoint) and evaluates.

  Args:
    config: an experiment config (see ``configs/``).
    workdir: output directory: ``checkpoints/``, ``tensorboard/``, ``metrics.jsonl``,
      ``config.json``, ``predictions_*.csv``.
    data_api: object with ``build_train_loader``, ``build_eval_loader``, ``steps_per_epoch``
      (default: ``dtf_jax.data``); tests pass an in-memory stand-in.

  Returns:
    A summary: ``status`` ('completed' | 'preempted'), ``step``, last ``train`` metrics and the
    final ``eval`` metrics.
  """
  data_api = data_api or default_data_api()
  workdir = os.path.abspath(workdir)
  mesh = create_mesh_for(config)
  batch_size = int(config.batch_size)
  local_batch = mesh_lib.check_batch_size(batch_size)
  iter_size = int(config.get("iter_size", 1))
  seed = int(config.get("seed", 0))

  # Data.
  if config.data.get("source", None) == "synthetic" and hasattr(data_api, "ensure_synthetic_dataset"):
    if jax.process_index() == 0:
      data_api.ensure_synthetic_dataset(config.data)
    _barrier("synthetic_dataset")
  train_loader = data_api.build_train_loader(
      config.data, global_batch_size=batch_size, seed=seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  iterations_per_epoch = int(data_api.steps_per_epoch(config.data, batch_size))
  durations = durations_lib.resolve_durations(config, iterations_per_epoch)
  _save_config(config, workdir, durations)

  # Optimiser, model, train state.
  make_model = model_factory(config, batch_size=batch_size)
  trainable_mask = None
  if config.optimizer.get("skip_unused_parameters", True):
    d = config.data
    trainable_mask = steps_lib.parameters_reaching_loss(
        make_model, (batch_size, d.get("num_segments", 1) * d.clip_length, d.crop_size, d.crop_size, 3),
        (batch_size,), label_smoothing=config.get("label_smoothing", "none"),
        head_weights=config.get("head_weights", None))
    unused = [jax.tree_util.keystr(p, simple=True, separator="/") for p, used in
              jax.tree_util.tree_flatten_with_path(trainable_mask)[0] if not used]
    if unused:
      metrics_lib.log_info("%d parameter tensors do not reach the loss and are never updated "
                           "(as the originals' None gradients): %s", len(unused),
                           ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
  tx, schedule = optim.build_optimizer(config.optimizer, durations, trainable_mask=trainable_mask)
  setup = train_state_lib.setup_model(make_model, tx, mesh,
                                      min_fsdp_size=int(config.mesh.get("min_fsdp_size", 2 ** 16)))
  state, rngs = train_state_lib.init_train_state(setup, tx, seed)
  ckpt = checkpointing.TrainCheckpointer(
      os.path.join(workdir, "checkpoints"), keep=int(config.checkpoint.get("keep", 3)),
      async_save=bool(config.checkpoint.get("async_save", True)))
  train_iter = iter(train_loader)
  start_step = ckpt.latest_step()
  if start_step is not None:
    state, data_state = ckpt.restore(start_step, setup.abstract)
    if data_state is not None and hasattr(train_iter, "set_state"):
      train_iter.set_state(data_state)
    metrics_lib.log_info("resumed from %s at step %d", ckpt.directory, start_step)
  elif config.get("init_from", None):
    loaded = load_init_state(setup, {k: state[k] for k in setup.collections}, config.init_from,
                             strict=bool(config.get("init_strict", False)))
    state.update(jax.device_put(loaded, setup.model_shardings()))
    metrics_lib.log_info("initialised the model from %s", config.init_from)
  step = int(jax.device_get(state["step"]))

  train_step = steps_lib.make_train_step(
      setup, tx, schedule, mesh=mesh, iter_size=iter_size,
      loss_weight=float(config.get("loss_weight", 1.0)),
      label_smoothing=config.get("label_smoothing", "none"),
      label_smoothing_epsilon=float(config.get("label_smoothing_epsilon", 0.1)),
      head_weights=config.get("head_weights", None), preprocess=video_preprocess(config, data_api),
      accumulation=config.get("accumulation", "auto"))
  predict = steps_lib.make_predict(setup, mesh=mesh, preprocess=video_preprocess(config, data_api))

  log_every = durations_lib.every_steps(config, "log", durations, default_steps=50)
  eval_every = durations_lib.every_steps(config, "eval", durations)
  ckpt_every = durations_lib.every_steps(config, "checkpoint", durations)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(config.get("tensorboard", True)))
  progress = metrics_lib.Progress(durations.total_steps, batch_size * iter_size, first_step=step)
  metrics_lib.log_info(
      "training %s: %d steps (%d per epoch, %d iterations per epoch, iter_size %d), global batch "
      "%d clips (%d per process) on %d devices, mesh %s", config.model.name, durations.total_steps,
      durations.steps_per_epoch, iterations_per_epoch, iter_size, batch_size, local_batch,
      jax.device_count(), dict(mesh.shape))

  def do_eval(at_step: int):
    protocol = config.eval.get("in_training", "1x1")
    if not protocol:
      return None
    metrics, result = run_eval_protocol(
        config, protocol, predict=predict, collections={k: state[k] for k in setup.collections},
        rngs=rngs, mesh=mesh, data_api=data_api)
    writer.write(at_step, {k: v for k, v in metrics.items() if k != "seconds"}, split=f"eval_{protocol}")
    if jax.process_index() == 0:
      evaluate_lib.write_predictions_csv(os.path.join(workdir, f"predictions_{protocol}.csv"), result)
    metrics_lib.log_info("eval %s at step %d: top1 %.4f top5 %.4f mean-class %.4f (%d videos x "
                         "%.0f views, %.1fs)", protocol, at_step, metrics["top1"], metrics["top5"],
                         metrics["mean_class_accuracy"], metrics["num_videos"],
                         metrics["views_per_video"], metrics["seconds"])
    return metrics

  def save(at_step: int):
    data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
    ckpt.save(at_step, state, data_state)

  status, last_train, last_eval = "completed", {}, None
  accum: dict[str, float] = {}
  accum_steps = 0
  bad_samples = 0
  try:
    with _PreemptionWatch() as preemption:
      while step < durations.total_steps:
        host_batch, replaced = _next_step_batch(train_iter, iter_size, progress)
        bad_samples += replaced
        batch = mesh_lib.global_batch(mesh, host_batch, batch_axis=1)
        state, metrics = train_step(state, rngs, batch)
        step += 1
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
          ckpt.wait()
          last_good = ckpt.latest_step()
          raise NonFiniteLossError(
              f"non-finite training loss {metrics['loss']} / gradient norm {metrics['grad_norm']} "
              f"at step {step} (learning rate {metrics['learning_rate']:.3g}); the run is stopped "
              f"without saving this state. Last good checkpoint: step {last_good} in "
              f"{ckpt.directory}. Lower optimizer.base_learning_rate, check the data, or use "
              "model.dtype='float32'.")
        for k, v in metrics.items():
          accum[k] = accum.get(k, 0.0) + v
        accum_steps += 1
        if step % log_every == 0 or step == durations.total_steps:
          last_train = {k: v / accum_steps for k, v in accum.items()}
          rates = progress.measure(step)
          # Cumulative bad (replaced) samples: the loader's own count survives resumption.
          replaced_total = getattr(train_iter, "num_replaced", bad_samples)
          scalars = {**last_train, "clips_per_second": rates["clips_per_second"],
                     "data_wait_seconds": rates["data_wait_seconds"],
                     "data_wait_fraction": rates["data_wait_fraction"],
                     "bad_samples": float(replaced_total), "epoch": durations.epoch_of_step(step)}
          writer.write(step, scalars)
          metrics_lib.log_info("%s", progress.line(step, durations.epoch_of_step(step), last_train, rates))
          accum, accum_steps = {}, 0
        if eval_every and step % eval_every == 0 and step < durations.total_steps:
          last_eval = do_eval(step)
        if preemption.reached(step):
          save(step)
          ckpt.wait()
          metrics_lib.log_info("SIGTERM: saved checkpoint at step %d; exiting", step)
          status = "preempted"
          break
        if (ckpt_every and step % ckpt_every == 0) or step == durations.total_steps:
          save(step)
    if status == "completed":
      if ckpt.latest_step() != step:
        save(step)
      last_eval = do_eval(step)
  finally:
    ckpt.close()
    writer.close()
  return {"status": status, "step": step, "train": last_train, "eval": last_eval,
          "durations": durations}


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, output_dir: str, *,
                        protocols=None, step: int | None = None, data_api=None) -> dict:
  """Evaluates a checkpoint with the protocols of ``config.eval.protocols``.

  Args:
    config: the experiment config (model, data, eval).
    checkpoint: a training workdir (latest or ``step`` checkpoint) or a model-state directory
      (``save_model_state`` layout, e.g. the converter's output).
    output_dir: where ``predictions_<protocol>.csv`` and ``eval_results.json`` go.
    protocols: names of the protocols to run (default: all).
    step: training checkpoint step (default: the latest).
    data_api: as in ``train_and_evaluate``.

  Returns:
    ``{protocol: metrics}``.
  """
  data_api = data_api or default_data_api()
  mesh = create_mesh_for(config)
  setup = train_state_lib.setup_model(model_factory(config, batch_size=int(config.batch_size)), None,
                                      mesh)
  collections, rngs = train_state_lib.init_model_collections(setup)
  if checkpointing.is_training_workdir(checkpoint):
    collections, step = checkpointing.load_model_state_from_workdir(
        checkpoint, setup.abstract_model_collections(), step)
    source = f"{checkpoint} (step {step})"
  else:
    collections = load_init_state(setup, collections, checkpoint, strict=True)
    source = checkpoint
  metrics_lib.log_info("evaluating %s from %s", config.model.name, source)
  predict = steps_lib.make_predict(setup, mesh=mesh, preprocess=video_preprocess(config, data_api))
  protocols = list(protocols or config.eval.protocols.keys())
  results = {}
  for protocol in protocols:
    if protocol not in config.eval.protocols:
      raise ValueError(f"unknown eval protocol {protocol!r}; config.eval.protocols has "
                       f"{sorted(config.eval.protocols.keys())}")
    metrics, result = run_eval_protocol(config, protocol, predict=predict, collections=collections,
                                        rngs=rngs, mesh=mesh, data_api=data_api)
    results[protocol] = metrics
    metrics_lib.log_info("%s: top1 %.4f top5 %.4f mean-class %.4f over %d videos x %.0f views",
                         protocol, metrics["top1"], metrics["top5"], metrics["mean_class_accuracy"],
                         metrics["num_videos"], metrics["views_per_video"])
    if jax.process_index() == 0:
      evaluate_lib.write_predictions_csv(os.path.join(output_dir, f"predictions_{protocol}.csv"), result)
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval_results.json"), "w", encoding="utf-8") as f:
      json.dump({"checkpoint": source, "results": results}, f, indent=2)
  return results


def create_mesh_for(config):
  return mesh_lib.create_mesh(config.get("mesh", None))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
