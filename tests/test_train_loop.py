"""The training loop on the stand-in model/data (in-process, one CPU device).

Gradient accumulation, non-finite stop, resume + evaluation from a checkpoint, initialisation
from a model-state directory, two-head models.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtf_jax.train import checkpointing
from dtf_jax.train import durations as durations_lib
from dtf_jax.train import mesh as mesh_lib
from dtf_jax.train import metrics as metrics_lib
from dtf_jax.train import optim
from dtf_jax.train import steps as steps_lib
from dtf_jax.train import testing
from dtf_jax.train import train_state as train_state_lib
from dtf_jax.train import trainer

testing.register_tiny_model()


def build_step(config, mesh, accumulation="auto"):
  d = durations_lib.resolve_durations(config, 100)
  tx, schedule = optim.build_optimizer(config.optimizer, d)
  setup = train_state_lib.setup_model(trainer.model_factory(config, batch_size=config.batch_size), tx, mesh)
  state, rngs = train_state_lib.init_train_state(setup, tx, config.seed)
  step = steps_lib.make_train_step(setup, tx, schedule, mesh=mesh, iter_size=config.iter_size,
                                   loss_weight=config.loss_weight, accumulation=accumulation)
  return setup, state, rngs, step


def test_gradient_accumulation_equals_the_large_batch():
  mesh = mesh_lib.create_mesh()
  rng = np.random.default_rng(0)
  video = rng.normal(size=(8, 4, 8, 8, 3)).astype(np.float32)
  label = rng.integers(0, 3, size=8).astype(np.int32)
  results = {}
  for iter_size, loss_weight, accumulation in ((1, 1.0, "auto"), (2, 1.0, "scan"), (4, 1.0, "unroll"),
                                               (2, 2.0, "auto")):
    config = testing.tiny_config(**{"iter_size": iter_size, "loss_weight": loss_weight,
                                    "batch_size": 8 // iter_size, "model.dropout_ratio": 0.0,
                                    "model.overrides": {"batch_norm": False},
                                    "optimizer.clip_gradient": None,
                                    # lr(i) differs between iteration 0 and 1: keep it fixed.
                                    "optimizer.schedule": "constant"})
    setup, state, rngs, step = build_step(config, mesh, accumulation)
    batch = mesh_lib.global_batch(mesh, {"video": video.reshape((iter_size, 8 // iter_size) + video.shape[1:]),
                                         "label": label.reshape(iter_size, 8 // iter_size)}, batch_axis=1)
    params0 = jax.tree.map(np.asarray, state["params"])
    state, metrics = step(state, rngs, batch)
    results[(iter_size, loss_weight)] = (params0, jax.tree.map(np.asarray, state["params"]),
                                         {k: float(v) for k, v in metrics.items()})
  big0, big1, big_m = results[(1, 1.0)]
  for key in ((2, 1.0), (4, 1.0)):
    p0, p1, m = results[key]
    for a, b in zip(jax.tree.leaves(big1), jax.tree.leaves(p1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert m["loss"] == pytest.approx(big_m["loss"], rel=1e-5)
    assert m["grad_norm"] == pytest.approx(big_m["grad_norm"], rel=1e-5)
  # loss_weight = iter_size: the applied gradient is the SUM of the micro-batch mean gradients.
  assert results[(2, 2.0)][2]["grad_norm"] == pytest.approx(2 * big_m["grad_norm"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(big0), jax.tree.leaves(results[(2, 2.0)][0])):
    np.testing.assert_array_equal(a, b)  # same initialisation


class NaNAfter(testing.InMemoryVideoData):
  """Stand-in data whose training batch number ``bad`` is all NaN."""

  def __init__(self, bad):
    self.bad = bad

  def build_train_loader(self, cfg, **kw):
    it = super().build_train_loader(cfg, **kw)
    bad = self.bad

    class Poisoned(testing.InMemoryTrainIterator):
      def __next__(self):
        pos = self.position
        batch = super().__next__()
        if pos == bad:
          batch["video"] = np.full_like(batch["video"], np.nan)
        return batch

    p = Poisoned.__new__(Poisoned)
    p.__dict__.update(it.__dict__)
    return p


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = testing.tiny_config(**{"total_steps": 8, "checkpoint_every_steps": 2})
  with pytest.raises(trainer.NonFiniteLossError, match="step 5.*Last good checkpoint: step 4"):
    trainer.train_and_evaluate(config, str(tmp_path), data_api=NaNAfter(bad=4))
  ckpt = checkpointing.TrainCheckpointer(tmp_path / "checkpoints")
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()


def test_resume_continues_and_evaluate_checkpoint_matches(tmp_path):
  data = testing.InMemoryVideoData()
  config = testing.tiny_config(**{"total_steps": 4, "checkpoint_every_steps": 2,
                                  "model.overrides": {"two_heads": True}})
  first = trainer.train_and_evaluate(config, str(tmp_path), data_api=data)
  assert first["status"] == "completed" and first["step"] == 4
  # A longer run in the same workdir resumes at step 4 (data position and step restored).
  config = testing.tiny_config(**{"total_steps": 6, "checkpoint_every_steps": 2,
                                  "model.overrides": {"two_heads": True}})
  second = trainer.train_and_evaluate(config, str(tmp_path), data_api=data)
  assert second["step"] == 6
  ckpt = checkpointing.TrainCheckpointer(tmp_path / "checkpoints")
  assert ckpt.all_steps() == [2, 4, 6]
  ckpt.close()
  logged = metrics_lib.read_metrics(tmp_path)
  assert sorted(logged) == [1, 2, 3, 4, 5, 6]
  # Two heads: the loss is CE(main) + CE(dual), about 2 ln 3 at the start.
  assert 1.6 < logged[1]["loss"] < 2.8
  results = trainer.evaluate_checkpoint(config, str(tmp_path), str(tmp_path / "eval"),
                                        data_api=data)
  assert results["1x1"] == pytest.approx({k: v for k, v in second["eval"].items()} | {
      "seconds": results["1x1"]["seconds"]})
  assert results["multiview"]["views_per_video"] == 2.0
  assert os.path.exists(tmp_path / "eval" / "predictions_multiview.csv")
  # The same weights as a model-state directory (the converter's output layout) evaluate alike.
  setup = train_state_lib.setup_model(trainer.model_factory(config, batch_size=8), None,
                                      mesh_lib.create_mesh())
  collections, step = checkpointing.load_model_state_from_workdir(
      tmp_path, setup.abstract_model_collections())
  assert step == 6
  checkpointing.save_model_state(tmp_path / "exported",
                                 train_state_lib.model_state_tree(collections))
  exported = trainer.evaluate_checkpoint(config, str(tmp_path / "exported"), str(tmp_path / "eval2"),
                                         protocols=["1x1"], data_api=data)
  assert exported["1x1"]["top1"] == results["1x1"]["top1"]
  assert exported["1x1"]["mean_class_accuracy"] == results["1x1"]["mean_class_accuracy"]


def test_init_from_model_state_directory(tmp_path):
  mesh = mesh_lib.create_mesh()
  source = testing.TinyVideoNet(num_classes=3, rngs=nnx.Rngs(5))
  checkpointing.save_model_state(tmp_path / "model", nnx.state(source, nnx.Not(nnx.RngState)))
  # Same architecture with 5 classes: everything but the classifier is taken from the file.
  config = testing.tiny_config(**{"data.num_classes": 5})
  setup = train_state_lib.setup_model(trainer.model_factory(config, batch_size=8), None, mesh)
  collections, _ = train_state_lib.init_model_collections(setup)
  with pytest.raises(ValueError, match="shape mismatches"):
    trainer.load_init_state(setup, collections, str(tmp_path / "model"), strict=True)
  loaded = trainer.load_init_state(setup, collections, str(tmp_path / "model"), strict=False)
  np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"], source.conv1.kernel[...])
  np.testing.assert_array_equal(loaded["frozen"]["channel_scale"], source.channel_scale[...])
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], collections["params"]["fc"]["kernel"])
  assert not np.array_equal(loaded["params"]["conv1"]["kernel"], collections["params"]["conv1"]["kernel"])


def test_bfloat16_compute_keeps_float32_parameters():
  mesh = mesh_lib.create_mesh()
  config = testing.tiny_config(**{"model.dtype": "bfloat16"})
  setup, state, rngs, step = build_step(config, mesh)
  rng = np.random.default_rng(3)
  batch = mesh_lib.global_batch(mesh, {
      "video": rng.normal(size=(1, 8, 4, 8, 8, 3)).astype(np.float32),
      "label": rng.integers(0, 3, size=(1, 8)).astype(np.int32)}, batch_axis=1)
  state, metrics = step(state, rngs, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
  assert state["batch_stats"]["bn1"]["mean"].dtype == jnp.float32


def test_parameters_outside_the_loss_are_never_updated():
  # PyTorch skips parameters whose gradient is None (no decay, no momentum); so do we.
  mesh = mesh_lib.create_mesh()
  config = testing.tiny_config(**{"model.overrides": {"unused_parameter": True},
                                  "optimizer.weight_decay": 0.5})
  make_model = trainer.model_factory(config, batch_size=8)
  mask = steps_lib.parameters_reaching_loss(make_model, (8, 4, 8, 8, 3), (8,))
  assert not any(jax.tree.leaves(mask["spare"])) and all(jax.tree.leaves(mask["fc"]))
  assert all(jax.tree.leaves(mask["conv1"])) and all(jax.tree.leaves(mask["bn1"]))
  d = durations_lib.resolve_durations(config, 100)
  tx, schedule = optim.build_optimizer(config.optimizer, d, trainable_mask=mask)
  setup = train_state_lib.setup_model(make_model, tx, mesh)
  state, rngs = train_state_lib.init_train_state(setup, tx, 0)
  step = steps_lib.make_train_step(setup, tx, schedule, mesh=mesh, iter_size=1, loss_weight=1.0)
  before = jax.tree.map(np.asarray, state["params"])
  rng = np.random.default_rng(4)
  for _ in range(2):
    batch = mesh_lib.global_batch(mesh, {
        "video": rng.normal(size=(1, 8, 4, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 3, size=(1, 8)).astype(np.int32)}, batch_axis=1)
    state, _ = step(state, rngs, batch)
  after = jax.tree.map(np.asarray, state["params"])
  np.testing.assert_array_equal(after["spare"]["kernel"], before["spare"]["kernel"])
  assert not np.allclose(after["fc"]["kernel"], before["fc"]["kernel"])
