"""Processes, device mesh and shardings: one code path for 1 CPU, N fake CPU devices and N GPUs.

* ``initialize_distributed``: multi-host start-up through ``jax.distributed.initialize`` (explicit
  coordinator/num_processes/process_id, or cluster auto-detection, e.g. SLURM).
* ``create_mesh``: a 2-D mesh ``('data', 'fsdp')``; the batch is split over both axes (pure data
  parallelism when ``fsdp == 1``, the default), large train-state arrays over ``'fsdp'``.
* ``state_shardings``: per-leaf shardings of a train state by a shape rule (replicate, or shard
  the largest dimension divisible by the fsdp size) -- the same rule places parameters and their
  optimiser moments identically.
* ``global_batch``: per-host numpy batches -> global ``jax.Array`` s
  (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

_CLUSTER_ENV_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _cluster_detected() -> bool:
  for var in _CLUSTER_ENV_HINTS:
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, mode: str = "auto") -> bool:
  """Starts ``jax.distributed`` when the run spans several processes.

  Args:
    coordinator_address: ``host:port`` of process 0 (explicit multi-process start).
    num_processes: number of processes (explicit start).
    process_id: this process's index (explicit start).
    mode: 'auto' (explicit arguments if given, else jax's cluster auto-detection when a
      multi-task SLURM/Open MPI job is detected, else single process), 'on' (always call
      ``jax.distributed.initialize``, letting jax detect the cluster), 'off'.

  Returns:
    Whether ``jax.distributed`` was initialised. Must run before any other JAX call.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(explicit) and not all(explicit):
    raise ValueError(
        "pass all of --coordinator_address, --num_processes and --process_id, or none of them "
        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if mode == "off" or (mode == "auto" and not all(explicit) and not _cluster_detected()):
    return False
  # Cross-process collectives between CPU devices need an implementation (gloo ships with
  # jaxlib); the setting only affects the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(explicit):
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id))
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def create_mesh(mesh_config=None) -> jax.sharding.Mesh:
  """A ``('data', 'fsdp')`` mesh over all devices.

  Args:
    mesh_config: ``config.mesh`` with ``fsdp`` (devices along the parameter-sharding axis; 1 =
      pure data parallelism (default), -1 = all devices).
  """
  n = jax.device_count()
  fsdp = int((mesh_config or {}).get("fsdp", 1))
  if fsdp == -1:
    fsdp = n
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {n} (or be -1 for all)")
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Sharding of an array whose axis ``batch_axis`` is split over all devices."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def leaf_sharding(mesh, shape, *, min_fsdp_size: int = 2 ** 16) -> NamedSharding:
  """Replicated, or (fsdp > 1 and size >= min_fsdp_size) sharded on its largest divisible axis."""
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(mesh, abstract_state, *, min_fsdp_size: int = 2 ** 16):
  """Shardings for every leaf of ``abstract_state`` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: leaf_sharding(mesh, np.shape(x), min_fsdp_size=min_fsdp_size),
                      abstract_state)


def check_batch_size(global_batch_size: int, what: str = "batch_size") -> int:
  """Validates a global batch size against the topology; returns the per-process batch."""
  if global_batch_size % jax.device_count():
    raise ValueError(
        f"{what}={global_batch_size} must be a multiple of the number of devices "
        f"({jax.device_count()}); it is the global batch over all hosts")
  return global_batch_size // jax.process_count()


def global_batch(mesh, local_batch, *, batch_axis: int = 0):
  """Assembles per-process numpy arrays (batch on ``batch_axis``) into global jax arrays.

  Args:
    mesh: the device mesh.
    local_batch: a pytree of numpy arrays, each holding this process's slice
      ``(..., B_local, ...)`` of the global batch (processes in ``process_index`` order).
    batch_axis: the axis that is split over processes and devices.
  """

  def put(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, x.ndim, batch_axis), x, tuple(shape))

  return jax.tree.map(put, local_batch)
