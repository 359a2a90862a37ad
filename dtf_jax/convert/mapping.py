"""The pure mapping PyTorch state_dict <-> Flax state, guided by the model's own parameter tree.

``checkpointed_state(model)`` is what a checkpoint holds: every ``nnx.Param``, ``FrozenParam`` and
``nnx.BatchStat`` (not the RNG streams). For each of its leaves the family :class:`KeyTable` gives
the PyTorch key and the layout; the model (real or ``nnx.eval_shape`` abstract) gives shape and dtype.
Nothing here imports torch: state_dicts are ``{key: numpy array}``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtf_jax.convert.keymap import KeyTable, Layout
from dtf_jax.layers.common import FrozenParam

CHECKPOINTED = (nnx.Param, FrozenParam, nnx.BatchStat)
Path = tuple[Any, ...]


def checkpointed_state(model: nnx.Module) -> nnx.State:
  """The part of the model's state a checkpoint holds: parameters, frozen parameters, batch stats."""
  return nnx.state(model, CHECKPOINTED)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One Flax leaf and its PyTorch counterpart."""

  path: Path
  torch_key: str
  layout: Layout
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def torch_shape(self) -> tuple[int, ...]:
    return tuple(self.layout.torch_shape(self.shape))


def leaf_specs(model: nnx.Module, table: KeyTable) -> list[LeafSpec]:
  """The key/layout/shape of every checkpointed leaf of ``model`` (real or abstract)."""
  specs, seen = [], {}
  for path, variable in nnx.to_flat_state(checkpointed_state(model)):
    value = variable.get_value()
    shape = tuple(int(d) for d in value.shape)
    spec = LeafSpec(tuple(path), table.torch_key(path), table.layout(path, shape), shape,
                    np.dtype(value.dtype))
    if spec.torch_key in seen:
      raise ValueError(f"two Flax leaves map to the PyTorch key {spec.torch_key!r}: "
                       f"{seen[spec.torch_key]} and {path}")
    seen[spec.torch_key] = path
    specs.append(spec)
  return specs


class ConversionError(ValueError):
  """A checkpoint does not fit the model: every offending key is listed at once."""

  def __init__(self, model_name: str, *, unexpected=(), missing=(), mismatched=(), constants=(),
               hints=()):
    self.unexpected = sorted(unexpected)
    self.missing = sorted(missing)
    self.mismatched = sorted(mismatched)
    self.constants = sorted(constants)
    lines = [f"the checkpoint does not match the model {model_name!r}:"]

    def block(title, items):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)

    block("unexpected keys (in the checkpoint, not in the model)", self.unexpected)
    block("missing keys (in the model, not in the checkpoint)", self.missing)
    block("shape mismatches (key: checkpoint shape vs model's PyTorch-layout shape)", self.mismatched)
    block("constant buffers that differ from the model's recomputed ones", self.constants)
    lines.extend(f"  hint: {h}" for h in hints)
    super().__init__("\n".join(lines))


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did (printed as the summary)."""

  model: str
  source: str
  converted: list[str] = dataclasses.field(default_factory=list)
  dropped_by_rule: dict[str, str] = dataclasses.field(default_factory=dict)
  ignored: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  constants_checked: list[str] = dataclasses.field(default_factory=list)
  constants_absent: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)

  def summary(self, max_keys: int = 12) -> str:
    """Human-readable summary; long key lists are grouped by pattern (block indices -> ``*``)."""

    def keys(items):
      items = sorted(items)
      if len(items) <= max_keys:
        return ", ".join(items)
      groups: dict[str, int] = {}
      for key in items:
        pattern = re.sub(r"^(layer\d+(_dual)?\.\d+|layers\.\d+\.blocks\.\d+|layers\.\d+)\.", "*.", key)
        groups[pattern] = groups.get(pattern, 0) + 1
      return ", ".join(f"{p} ({n})" if n > 1 else p for p, n in sorted(groups.items()))

    lines = [f"{self.model} <- {self.source} checkpoint:",
             f"  tensors converted: {len(self.converted)}"]
    by_rule: dict[str, list[str]] = {}
    for key, rule in self.dropped_by_rule.items():
      by_rule.setdefault(rule, []).append(key)
    lines.append(f"  dropped by rule: {len(self.dropped_by_rule)}")
    for rule, items in sorted(by_rule.items()):
      lines.append(f"    {rule} ({len(items)}): {keys(items)}")
    lines.append(f"  checkpoint keys with no place in the model (ignored): {len(self.ignored)}"
                 + (f": {keys(self.ignored)}" if self.ignored else ""))
    lines.append(f"  missing (kept at the model's initialisation): {len(self.missing)}"
                 + (f": {keys(self.missing)}" if self.missing else ""))
    lines.append(f"  constant buffers checked against recomputed values: {len(self.constants_checked)}"
                 + (f" (absent, recomputed: {len(self.constants_absent)})" if self.constants_absent else ""))
    lines.extend(f"  WARNING: {w}" for w in self.warnings)
    return "\n".join(lines)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    model: nnx.Module,
    table: KeyTable,
    *,
    model_name: str,
    report: ConversionReport,
    may_be_missing: Callable[[str], bool] = lambda key: False,
    may_be_ignored: Callable[[str], bool] = lambda key: False,
    hints: Callable[[ConversionError], list[str]] | None = None,
) -> nnx.State:
  """Maps a PyTorch-layout state_dict onto ``model``'s checkpointed state.

  Args:
    state_dict: ``{torch key: numpy array}`` after any key rule (inflation, dropping).
    model: the target network, real or abstract (only shapes/dtypes/attributes are read).
    table: the family key table.
    model_name: for messages.
    report: filled in (converted / missing / ignored / constants).
    may_be_missing: keys of the model the checkpoint may lack (their leaves are left out of the
      result, so the model keeps its own values).
    may_be_ignored: checkpoint keys the model has no place for that are reported, not rejected.
    hints: extra advice for the error message.

  Returns:
    An ``nnx.State`` holding jax arrays for the converted leaves only (``nnx.update`` it into the
    model).

  Raises:
    ConversionError: listing every unexpected, missing or shape-mismatched key and every constant
      buffer that differs, all at once.
  """
  specs = leaf_specs(model, table)
  constants = table.constants(model) if table.constants else {}
  unexpected, missing, mismatched, bad_constants = [], [], [], []
  flat: list[tuple[Path, nnx.Variable]] = []
  variables = dict(nnx.to_flat_state(checkpointed_state(model)))
  by_key = {s.torch_key: s for s in specs}

  for key in state_dict:
    if key not in by_key and key not in constants:
      if may_be_ignored(key):
        report.ignored.append(key)
      else:
        unexpected.append(key)
  for key, expected in constants.items():
    if key not in state_dict:
      report.constants_absent.append(key)
      continue
    given = np.asarray(state_dict[key])
    if given.shape != expected.shape or not np.array_equal(given, expected):
      bad_constants.append(f"{key}: checkpoint {tuple(given.shape)} vs recomputed {expected.shape}"
                           + ("" if given.shape != expected.shape else " (values differ)"))
    else:
      report.constants_checked.append(key)
  for spec in specs:
    if spec.torch_key not in state_dict:
      if may_be_missing(spec.torch_key):
        report.missing.append(spec.torch_key)
      else:
        missing.append(spec.torch_key)
      continue
    value = np.asarray(state_dict[spec.torch_key])
    if tuple(value.shape) != spec.torch_shape:
      mismatched.append(f"{spec.torch_key}: {tuple(value.shape)} vs {spec.torch_shape}")
      continue
    converted = _cast(spec.layout.to_flax(value), spec)
    variable = variables[spec.path]
    flat.append((spec.path, variable.replace(jnp.asarray(converted))))
    report.converted.append(spec.torch_key)

  if unexpected or missing or mismatched or bad_constants:
    error = ConversionError(model_name, unexpected=unexpected, missing=missing,
                            mismatched=mismatched, constants=bad_constants)
    extra = hints(error) if hints else []
    if extra:
      error = ConversionError(model_name, unexpected=unexpected, missing=missing,
                              mismatched=mismatched, constants=bad_constants, hints=extra)
    raise error
  return nnx.from_flat_state(flat)


def _cast(value: np.ndarray, spec: LeafSpec) -> np.ndarray:
  value = np.asarray(value, order="C")
  if np.issubdtype(spec.dtype, np.integer):
    if not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{spec.torch_key}: expected an integer tensor, got {value.dtype}")
    info = np.iinfo(spec.dtype)
    if value.size and (value.min() < info.min or value.max() > info.max):
      raise ValueError(f"{spec.torch_key}: value {value} does not fit {spec.dtype}")
  return value.astype(spec.dtype)


def flax_to_torch(model: nnx.Module, table: KeyTable) -> dict[str, np.ndarray]:
  """The model's checkpointed state as a PyTorch-layout state_dict (original key names).

  Floating tensors are float32, ``num_batches_tracked`` int64; the constant buffers of the family
  (Swin ``relative_position_index`` / ``attn_mask``) are added, so the result loads into the
  original PyTorch network with ``strict=True``.
  """
  out: dict[str, np.ndarray] = {}
  variables = dict(nnx.to_flat_state(checkpointed_state(model)))
  for spec in leaf_specs(model, table):
    value = np.asarray(variables[spec.path].get_value())
    if jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(np.float32)
    out[spec.torch_key] = np.asarray(spec.layout.to_torch(value), order="C")
  if table.constants:
    out.update(table.constants(model))
  return out


def assemble_model(abstract: nnx.Module, state: nnx.State, rngs: nnx.Rngs) -> nnx.Module | None:
  """The model from its abstract graph, a complete checkpointed state and fresh RNG stream keys.

  Returns None if the model holds state other than checkpointed tensors and RNG streams.
  """
  graphdef, _, rest = nnx.split(abstract, CHECKPOINTED, ...)
  flat = nnx.to_flat_state(rest)
  if any(not isinstance(v, (nnx.RngKey, nnx.RngCount)) for _, v in flat):
    return None
  num_keys = sum(isinstance(v, nnx.RngKey) for _, v in flat)
  try:
    base = rngs.dropout()
  except (AttributeError, KeyError):
    base = rngs.params()
  keys = jax.random.split(base, max(num_keys, 1))
  leaves, i = [], 0
  for path, variable in flat:
    if isinstance(variable, nnx.RngKey):
      leaves.append((path, variable.replace(keys[i])))
      i += 1
    else:
      abstract_value = variable.get_value()
      leaves.append((path, variable.replace(jnp.zeros(abstract_value.shape, abstract_value.dtype))))
  return nnx.merge(graphdef, state, nnx.from_flat_state(leaves))
