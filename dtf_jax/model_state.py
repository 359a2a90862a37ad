"""Model-state files: the contract between the converter, the trainer and the evaluator.

One orbax ``StandardCheckpointer`` directory holding a model's ``nnx.State`` as a pure nested dict
(``{'layer1': {0: {'conv1': {'kernel': array}}}}``; parameters, frozen parameters and BatchNorm
statistics, no RNG streams). Written by ``python -m dtf_jax.convert ... --output DIR`` and read by
``config.init_from`` and ``eval.py --checkpoint``. Lives below both ``dtf_jax.convert`` and
``dtf_jax.train`` so that neither imports the other (ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx


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
