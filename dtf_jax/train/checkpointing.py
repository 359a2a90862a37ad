"""Checkpoints: model-state files shared with the converter, and the trainer's resumable state.

Two formats, both orbax:

* **Model state** (``save_model_state`` / ``load_model_state``): one orbax ``StandardCheckpointer``
  directory holding the model's ``nnx.State`` as a pure nested dict (``{'layer1': {0: {'conv1':
  {'kernel': array}}}}``; parameters, frozen parameters and BatchNorm statistics, no RNG
  streams). Written by ``python -m dtf_jax.convert ... --output DIR`` and read by
  ``config.init_from`` and ``eval.py --checkpoint``.
* **Training checkpoints** (``TrainCheckpointer``): an orbax ``CheckpointManager`` under
  ``<workdir>/checkpoints/<step>/`` with the items ``state`` (step, params, frozen params, BatchNorm
  statistics, optimiser state, base RNG key: the train-state pytree) and ``data`` (each process's
  data-iterator state as JSON). Saving is asynchronous and keeps the last ``keep`` steps. A
  training checkpoint's ``state`` item also serves as a model state for evaluation
  (``load_model_state_from_workdir``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

# ----------------------------------------------------------------------------------------------
# Model state files (converter <-> trainer/evaluator contract).
# ----------------------------------------------------------------------------------------------


def _abstract_leaf(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


def save_model_state(path: str | os.PathLike, state) -> None:
  """Writes a model's ``nnx.State`` (or a pure nested dict of arrays) to a new directory ``path``.

  Blocks until the checkpoint is committed. Call it on every process in multi-host runs.
  """
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  path = epath.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, pure)
    ckptr.wait_until_finished()


def load_model_state(path: str | os.PathLike, abstract_state, *, strict: bool = True):
  """Reads a model state written by ``save_model_state`` into the structure of ``abstract_state``.

  Args:
    path: the directory given to ``save_model_state`` (e.g. the converter's ``--output``).
    abstract_state: the target ``nnx.State`` (or pure dict), e.g. ``nnx.state(nnx.eval_shape(
      lambda: create_model(...)), nnx.Not(nnx.RngState))``; leaves may be arrays or
      ``jax.ShapeDtypeStruct`` s (their ``sharding`` places the restored arrays).
    strict: if True, the checkpoint must hold exactly the target's keys with the same shapes
      (``ValueError`` listing the differences otherwise). If False, only the keys present in both
      with equal shapes are restored and the result holds just those (merge it into a freshly
      initialised state, e.g. for a new classifier head).

  Returns:
    The restored state: an ``nnx.State`` of arrays (pure dict if ``abstract_state`` was one).
  """
  path = epath.Path(path).absolute()
  if not path.exists():
    raise ValueError(f"model-state checkpoint {str(path)!r} does not exist")
  is_state = isinstance(abstract_state, nnx.State)
  target = nnx.to_pure_dict(nnx.as_pure(abstract_state)) if is_state else abstract_state
  target = jax.tree.map(_abstract_leaf, target)
  stored = _flat_shapes(_stored_tree(path))
  wanted = _flat_shapes(target)
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  mismatched = sorted(k for k in set(wanted) & set(stored) if wanted[k] != stored[k])
  if strict and (missing or unexpected or mismatched):
    raise ValueError(
        f"checkpoint {str(path)!r} does not match the model: "
        f"missing {_head(missing)} ({len(missing)}), unexpected {_head(unexpected)} "
        f"({len(unexpected)}), shape mismatches (key, stored, model) "
        f"{[(k, stored[k], wanted[k]) for k in mismatched[:10]]} ({len(mismatched)}); check the "
        "model name/overrides/num_classes/clip_length, or load with strict=False to keep only the "
        "matching tensors")
  if not strict:
    keep = (set(wanted) & set(stored)) - set(mismatched)
    for k in sorted(set(wanted) - keep):
      logging.warning("not restored from %s (keeps its initial value): %s", path, k)
    target = _filter_tree(target, keep)
  restored = restore_pytree(path, target, partial=not strict)
  return nnx.State(restored) if is_state else restored


def _head(keys, n=10):
  return f"{keys[:n]}{'...' if len(keys) > n else ''}"


def _stored_tree(path):
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return tree


def restore_pytree(path, target, *, partial: bool = False):
  """Restores the pytree checkpoint directory ``path`` into ``target`` (ShapeDtypeStruct leaves).

  With ``partial``, ``target`` may hold a subset of the stored keys.
  """
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(epath.Path(path), args=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=partial))


def _filter_tree(tree, keep_paths: set[str], prefix: str = ""):
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      sub = _filter_tree(v, keep_paths, p)
      if sub:
        out[k] = sub
    elif p in keep_paths:
      out[k] = v
  return out


def merge_model_state(base, update):
  """Returns ``base`` (pure dict / State) with the leaves present in ``update`` replaced."""
  base_pure = nnx.to_pure_dict(base) if isinstance(base, nnx.State) else base
  upd = nnx.to_pure_dict(update) if isinstance(update, nnx.State) else update

  def merge(b, u):
    out = dict(b)
    for k, v in u.items():
      out[k] = merge(b[k], v) if isinstance(v, dict) else v
    return out

  merged = merge(base_pure, upd)
  return nnx.State(merged) if isinstance(base, nnx.State) else merged


# ----------------------------------------------------------------------------------------------
# Data-iterator state item (per process).
# ----------------------------------------------------------------------------------------------


class DataIteratorStateHandler(ocp.CheckpointHandler):
  """Stores each process's data-iterator state as ``process_<i>-of-<n>.json``.

  The state is captured by the caller (``iterator.get_state()``: bytes or a JSON-able value)
  before the asynchronous save starts, so the iterator may advance meanwhile.
  """

  def save(self, directory: epath.Path, args: "DataIteratorStateSave"):
    value = args.state
    if isinstance(value, bytes):
      record = {"encoding": "base64", "state": base64.b64encode(value).decode("ascii")}
    else:
      record = {"encoding": "json", "state": value}
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / name).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "DataIteratorStateRestore | None" = None):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    file = epath.Path(directory) / name
    if not file.exists():
      raise ValueError(
          f"no data-iterator state {str(file)!r}: the checkpoint was written by a run with a "
          "different number of processes; resume with the same topology")
    record = json.loads(file.read_text())
    if record["encoding"] == "base64":
      return base64.b64decode(record["state"])
    return record["state"]

  def metadata(self, directory):
    del directory
    return None

  def structure(self, directory):
    del directory
    return None

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(DataIteratorStateHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataIteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------------------------
# Training checkpoints.
# ----------------------------------------------------------------------------------------------


def _pure_rec(x):
  if isinstance(x, nnx.State):
    return nnx.to_pure_dict(x)
  if isinstance(x, dict):
    return {k: _pure_rec(v) for k, v in x.items()}
  return x


class TrainCheckpointer:
  """Periodic, asynchronous, keep-last-N training checkpoints under ``<workdir>/checkpoints``.

  Args:
    directory: the checkpoint root (created if needed).
    keep: number of most recent checkpoints kept.
    async_save: write in a background thread (the next steps run meanwhile).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state=None) -> None:
    """Starts saving ``state`` (train-state pytree) and ``data_state`` at ``step``."""
    items = {"state": ocp.args.StandardSave(_pure_rec(state))}
    if data_state is not None:
      items["data"] = DataIteratorStateSave(data_state)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state):
    """Restores ``(state, data_state)`` at ``step`` into the structure of ``abstract_state``.

    ``abstract_state`` leaves are ShapeDtypeStructs (with shardings) in the train-state layout;
    nnx.State nodes in it are restored as nnx.State.
    """
    target = jax.tree.map(_abstract_leaf, _pure_rec(abstract_state))
    items = {"state": ocp.args.StandardRestore(target)}
    has_data = (self.directory / str(step) / "data").exists()
    if has_data:
      items["data"] = DataIteratorStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = _restate(abstract_state, restored["state"])
    return state, (restored["data"] if has_data else None)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _restate(template, pure):
  """Puts nnx.State wrappers of ``template`` back around the restored pure dicts."""
  if isinstance(template, nnx.State):
    return nnx.State(pure)
  if isinstance(template, dict):
    return {k: _restate(template[k], pure[k]) for k in template}
  return pure


def load_model_state_from_workdir(workdir: str | os.PathLike, abstract_model_state, step: int | None = None):
  """Model collections (params, frozen, batch_stats) of a training checkpoint in ``workdir``.

  Args:
    workdir: a training workdir (holding ``checkpoints/``) or its ``checkpoints`` directory.
    abstract_model_state: dict of model collections, e.g. ``{'params': State, 'frozen': State,
      'batch_stats': State}``, with ShapeDtypeStruct leaves (shardings place the result).
    step: the checkpoint step (default: the latest).

  Returns:
    ``(model_state_dict, step)``.
  """
  root = epath.Path(workdir).absolute()
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "state").exists())
  if not steps:
    raise ValueError(f"no training checkpoint under {str(root)!r}")
  step = steps[-1] if step is None else int(step)
  target = {k: jax.tree.map(_abstract_leaf, _pure_rec(v)) for k, v in abstract_model_state.items()}
  restored = restore_pytree(root / str(step) / "state", target, partial=True)
  return {k: nnx.State(restored[k]) for k in target}, step


def is_training_workdir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a training workdir (or its ``checkpoints`` directory) with a checkpoint."""
  p = epath.Path(path)
  if (p / "checkpoints").exists():
    p = p / "checkpoints"
  if not p.exists():
    return False
  return any(c.name.isdigit() and (c / "state").exists() for c in p.iterdir())
