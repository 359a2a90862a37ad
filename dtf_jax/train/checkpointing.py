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

from dtf_jax.model_state import (  # noqa: F401  (re-exported: the trainer's and the converter's API)
    _abstract_leaf,
    _filter_tree,
    _flat_shapes,
    _head,
    _stored_tree,
    load_model_state,
    merge_model_state,
    restore_pytree,
    save_model_state,
)

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
