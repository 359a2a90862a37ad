"""Jitted train step (gradient accumulation over ``iter_size`` micro-batches) and predict.

Train step semantics (SPEC.md 6.4): for each of the ``iter_size`` micro-batches (each a full
data-loader iteration of ``batch_size`` clips over all devices), the loss is
``loss_total = loss / iter_size * loss_weight`` and its gradient is accumulated; BatchNorm running
statistics are updated after every micro-batch, in order. Then one optimizer update (clipping,
decay, momentum, learning rate: see ``optim.py``). The loss is the mean over the micro-batch of all
devices (= the originals' per-GPU mean averaged by DDP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dtf_jax import evaluate as evaluate_lib
from dtf_jax.train import losses
from dtf_jax.train import mesh as mesh_lib
from dtf_jax.train.train_state import ModelSetup, merge_model, split_model


def make_train_step(setup: ModelSetup, tx, schedule, *, mesh, iter_size: int, loss_weight: float,
                    label_smoothing: str = "none", label_smoothing_epsilon: float = 0.1,
                    head_weights=None, preprocess=None, accumulation: str = "auto"):
  """Returns ``train_step(state, rngs, batch) -> (state, metrics)``, jitted and donating ``state``.

  ``batch``: ``{'video': (iter_size, B, L, H, W, 3), 'label': (iter_size, B)}`` global arrays
  sharded on axis 1. ``metrics``: replicated scalars ``loss`` (mean unweighted loss over the
  micro-batches), ``accuracy`` (top-1 of the first head), ``grad_norm`` (global L2 norm of the
  accumulated gradient before clipping), ``learning_rate``.

  ``preprocess``: optional on-device transform of the video batch (e.g. uint8 -> normalised
  float32, ``dtf_jax.data.normalize_video``).

  ``accumulation``: how the ``iter_size`` micro-batches are looped inside the step: 'scan'
  (``lax.scan``: one compiled body), 'unroll' (straight-line code: compile time grows with
  ``iter_size``; XLA:CPU runs the convolutions of a loop body ~8x slower), or 'auto' (unroll when
  ``iter_size == 1`` or on CPU, else scan).
  """
  if accumulation not in ("auto", "scan", "unroll"):
    raise ValueError(f"accumulation must be 'auto', 'scan' or 'unroll', got {accumulation!r}")
  if accumulation == "auto":
    unroll = iter_size == 1 or jax.default_backend() == "cpu"
  else:
    unroll = accumulation == "unroll"
  graphdef = setup.graphdef
  scale = float(loss_weight) / float(iter_size)

  def train_step(state, rngs, batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    frozen = state.get("frozen")

    def micro_step(carry, inputs):
      grad_sum, batch_stats, other = carry
      video, label, index = inputs
      if preprocess is not None:
        video = preprocess(video)

      def loss_fn(params):
        model = merge_model(graphdef, dict(params=params, frozen=frozen, batch_stats=batch_stats,
                                           other=other), rngs)
        nnx.reseed(model, dropout=jax.random.fold_in(step_key, index))
        model.train()
        outputs = model(video)
        loss, logits = losses.classification_loss(
            outputs, label, label_smoothing=label_smoothing, epsilon=label_smoothing_epsilon,
            head_weights=head_weights)
        _, collections, _ = split_model(model)
        return loss * scale, (loss, logits, collections["batch_stats"], collections["other"])

      (_, (loss, logits, batch_stats, other_new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"])
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      correct = jnp.sum(jnp.argmax(logits, axis=-1) == label)
      return (grad_sum, batch_stats, other_new if other is not None else None), (loss, correct)

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    carry = (zeros, state["batch_stats"], state.get("other"))
    if unroll:
      # Straight-line code: XLA:CPU runs convolutions inside a loop body ~8x slower.
      outs = []
      for k in range(iter_size):
        carry, out = micro_step(carry, (batch["video"][k], batch["label"][k], jnp.asarray(k, jnp.int32)))
        outs.append(out)
      grads, batch_stats, other = carry
      loss, correct = (jnp.stack(x) for x in zip(*outs))
    else:
      (grads, batch_stats, other), (loss, correct) = jax.lax.scan(
          micro_step, carry, (batch["video"], batch["label"], jnp.arange(iter_size)))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state)
    new_state.update(step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     batch_stats=batch_stats, opt_state=opt_state)
    if other is not None:
      new_state["other"] = other
    metrics = {
        "loss": jnp.mean(loss),
        "accuracy": jnp.sum(correct) / batch["label"].size,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state["step"]),
    }
    return new_state, metrics

  batch_shardings = {"video": mesh_lib.batch_sharding(mesh, 6, 1),
                     "label": mesh_lib.batch_sharding(mesh, 2, 1)}
  return jax.jit(train_step,
                 in_shardings=(setup.shardings, setup.rng_shardings, batch_shardings),
                 out_shardings=(setup.shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,))


def parameters_used_by(loss, params, *args):
  """Which leaves of ``params`` ``loss(params, *args)`` depends on (``True``), as a params-shaped
  bool tree. Traces abstractly (``args`` may be ``jax.ShapeDtypeStruct``s; nothing is compiled)
  and runs dead-code elimination on the jaxpr."""
  # pylint: disable-next=import-outside-toplevel
  from jax._src.interpreters import partial_eval as pe
  closed = jax.make_jaxpr(loss)(params, *args)
  _, used_inputs = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [bool(u) for u in used_inputs[:len(leaves)]])


def parameters_reaching_loss(make_model, video_shape, label_shape, *, label_smoothing="none",
                             head_weights=None):
  """Which parameters the training loss depends on (``True``) -- a params-shaped bool tree.

  PyTorch leaves the ``.grad`` of a parameter outside the loss's graph at ``None``, and
  ``torch.optim.SGD`` then skips it entirely (no weight decay, no momentum; SPEC.md 6.4). JAX
  returns zeros instead, so the optimiser would decay such parameters (e.g. DTF-Swin's unused
  ``conv``, SPEC.md 7.7). See ``parameters_used_by``.

  Args:
    make_model: the model factory.
    video_shape: shape of one training micro-batch ``(B, L, H, W, 3)``.
    label_shape: ``(B,)``.
  """
  graphdef, collections, rngs = split_model(nnx.eval_shape(make_model))
  params = collections.pop("params")

  def loss(params, collections, rngs, video, label):
    model = merge_model(graphdef, dict(params=params, **collections), rngs)
    model.train()
    return losses.classification_loss(model(video), label, label_smoothing=label_smoothing,
                                      head_weights=head_weights)[0]

  return parameters_used_by(loss, params, collections, rngs,
                            jax.ShapeDtypeStruct(video_shape, jnp.float32),
                            jax.ShapeDtypeStruct(label_shape, jnp.int32))


def make_predict(setup: ModelSetup, *, mesh, preprocess=None):
  """Returns ``predict(collections, rngs, video (B, L, H, W, 3)) -> probabilities (B, K)``.

  Eval mode (running BatchNorm statistics, no dropout); class probabilities as
  ``evaluate.class_probabilities`` (two-head models: mean of the heads' softmaxes).
  """
  graphdef = setup.graphdef

  def predict(collections, rngs, video):
    model = merge_model(graphdef, collections, rngs)
    model.eval()
    if preprocess is not None:
      video = preprocess(video)
    return evaluate_lib.class_probabilities(model(video))

  return jax.jit(predict,
                 in_shardings=(setup.model_shardings(), setup.rng_shardings,
                               mesh_lib.batch_sharding(mesh, 5, 0)),
                 out_shardings=mesh_lib.batch_sharding(mesh, 2, 0))
