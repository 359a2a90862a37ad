"""The train state: a plain pytree built from an NNX model, created directly with its shardings.

Layout (also the on-disk layout of a training checkpoint's ``state`` item)::

  {'step': int32 (), 'rng': uint32 (2,) base key data,
   'params': State (nnx.Param),  'frozen': State (FrozenParam),  'batch_stats': State (nnx.BatchStat),
   ['other': State (any other non-RNG variables, only if the model has some)],
   'opt_state': optax state over 'params'}

The States hold plain arrays (``nnx.as_pure``); the model is rebuilt inside jitted functions with
``nnx.merge(graphdef, params, frozen, batch_stats, rngs, other)``. RNG streams (``nnx.RngState``)
are not part of the train state: dropout keys are re-derived every step from ``rng`` and the step
number (``nnx.reseed``), which makes a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dtf_jax.layers.common import FrozenParam
from dtf_jax.train import mesh as mesh_lib

MODEL_COLLECTIONS = ("params", "frozen", "batch_stats", "other")
_FILTERS = (nnx.Param, FrozenParam, nnx.BatchStat, nnx.RngState, ...)


def split_model(model: nnx.Module):
  """``(graphdef, {'params', 'frozen', 'batch_stats', 'other'} pure States, rng State)``."""
  graphdef, params, frozen, batch_stats, rngs, other = nnx.split(model, *_FILTERS)
  collections = dict(params=params, frozen=frozen, batch_stats=batch_stats, other=other)
  return graphdef, {k: nnx.as_pure(v) for k, v in collections.items()}, nnx.as_pure(rngs)


def merge_model(graphdef, collections: dict, rngs) -> nnx.Module:
  """Inverse of ``split_model`` (missing collections are empty)."""
  parts = [collections.get(k) or nnx.State({}) for k in MODEL_COLLECTIONS]
  return nnx.merge(graphdef, parts[0], parts[1], parts[2], rngs, parts[3])


def model_state_tree(collections: dict) -> dict:
  """The model's full state as one pure nested dict (the converter's file layout)."""
  out: dict = {}

  def put(dst, src):
    for k, v in src.items():
      if isinstance(v, dict):
        put(dst.setdefault(k, {}), v)
      else:
        dst[k] = v

  for k in MODEL_COLLECTIONS:
    if k in collections and collections[k] is not None:
      put(out, nnx.to_pure_dict(collections[k]) if isinstance(collections[k], nnx.State) else collections[k])
  return out


def split_like(full: dict, template) -> nnx.State:
  """The sub-tree of ``full`` with the keys of ``template`` (a collection's State or dict)."""
  tmpl = nnx.to_pure_dict(template) if isinstance(template, nnx.State) else template

  def pick(src, ref):
    return {k: pick(src[k], v) if isinstance(v, dict) else src[k] for k, v in ref.items()}

  return nnx.State(pick(full, tmpl))


@dataclasses.dataclass
class ModelSetup:
  """Everything static about the model of a run.

  Attributes:
    graphdef: NNX graph definition.
    make_model: no-argument factory of a freshly initialised model.
    abstract: abstract train state (ShapeDtypeStruct leaves with shardings).
    shardings: train-state shardings (same structure as ``abstract``).
    rng_shardings / abstract_rngs: of the model's RNG streams.
  """

  graphdef: object
  make_model: Callable[[], nnx.Module]
  abstract: dict
  shardings: dict
  abstract_rngs: object
  rng_shardings: object
  collections: tuple[str, ...]

  def model_shardings(self) -> dict:
    return {k: self.shardings[k] for k in self.collections}

  def abstract_model_collections(self) -> dict:
    return {k: self.abstract[k] for k in self.collections}


def _with_sharding(x, sharding):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def setup_model(make_model: Callable[[], nnx.Module], tx, mesh, *, min_fsdp_size: int = 2 ** 16) -> ModelSetup:
  """Traces ``make_model`` abstractly and derives the train-state structure and shardings."""

  def build():
    graphdef, collections, rngs = split_model(make_model())
    del graphdef
    collections = {k: v for k, v in collections.items() if k in ("params", "batch_stats") or len(v)}
    state = {"step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32), **collections,
             "opt_state": tx.init(collections["params"]) if tx is not None else ()}
    return state, rngs

  abstract_model = nnx.eval_shape(make_model)
  graphdef, _, _ = split_model(abstract_model)
  abstract_state, abstract_rngs = jax.eval_shape(build)
  shardings = mesh_lib.state_shardings(mesh, abstract_state, min_fsdp_size=min_fsdp_size)
  rng_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_rngs)
  abstract_state = jax.tree.map(_with_sharding, abstract_state, shardings)
  abstract_rngs = jax.tree.map(_with_sharding, abstract_rngs, rng_shardings)
  collections = tuple(k for k in MODEL_COLLECTIONS if k in abstract_state)
  return ModelSetup(graphdef, make_model, abstract_state, shardings, abstract_rngs, rng_shardings,
                    collections)


def init_train_state(setup: ModelSetup, tx, seed: int):
  """Initialises ``(train_state, rngs)`` directly in their shardings (no host round trip)."""

  def build():
    _, collections, rngs = split_model(setup.make_model())
    collections = {k: v for k, v in collections.items() if k in setup.collections}
    state = {"step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
             **collections,
             "opt_state": tx.init(collections["params"]) if tx is not None else ()}
    return state, rngs

  return jax.jit(build, out_shardings=(setup.shardings, setup.rng_shardings))()


def init_model_collections(setup: ModelSetup):
  """``(collections, rngs)`` of a fresh model (for evaluation: no optimiser state)."""

  def build():
    _, collections, rngs = split_model(setup.make_model())
    return {k: v for k, v in collections.items() if k in setup.collections}, rngs

  return jax.jit(build, out_shardings=(setup.model_shardings(), setup.rng_shardings))()
