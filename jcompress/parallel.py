"""Data parallelism over all devices and processes, with ``jax.sharding``.

A run's devices form a one-axis :class:`~jax.sharding.Mesh` named ``data``. Each
global batch is split along its first axis over the mesh (:func:`batch_sharding`);
the train state (params, optimizer state, compression state) is replicated on every
device (:func:`replicated`). ``jax.jit`` with these shardings makes XLA insert the
gradient all-reduce; no collective is written by hand. On one device the mesh has
one device and the program is the single-device one.

Several processes (hosts) join one run through :func:`initialize`, which must run
before anything touches a device. Every process then runs the same program on the
global mesh; each reads only the rows of each batch that its own devices hold
(``data.batches(..., sharding=...)``), and only process 0 writes logs and files
besides checkpoints (orbax coordinates those itself).

>>> import jax
>>> mesh = data_mesh()
>>> mesh.axis_names, mesh.size == jax.device_count()
(('data',), True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins a multi-process run with ``jax.distributed.initialize``.

  Does nothing when neither ``coordinator`` nor ``$JAX_COORDINATOR_ADDRESS`` is
  set (a single-process run). ``num_processes`` and ``process_id`` may be left to
  JAX's cluster detection (Slurm, Open MPI, Kubernetes, Cloud TPU). Must be called
  before anything touches a device.

  Args:
    coordinator: ``HOST:PORT`` of process 0, the same in every process.
    num_processes: how many processes take part.
    process_id: this process's index, ``0 <= process_id < num_processes``.

  Raises:
    ValueError: inconsistent options, named as ``--coordinator``,
      ``--num-processes`` or ``--process-id``.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT "
                       "(or $JAX_COORDINATOR_ADDRESS)")
    return
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
  if process_id is not None and (process_id < 0 or
                                 num_processes is not None and process_id >= num_processes):
    raise ValueError(f"--process-id must be in [0, --num-processes), got {process_id}")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  except ValueError as e:
    if None not in (num_processes, process_id):
      raise
    raise ValueError(f"--coordinator {coordinator} without --num-processes and --process-id "
                     f"needs a cluster that JAX detects (Slurm, Open MPI, ...): {e}") from e


def is_main_process() -> bool:
  """Whether this process writes logs, progress bars and metrics (process 0)."""
  return jax.process_index() == 0


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis ``data`` mesh over ``devices`` (default: all devices of all processes).

  Devices stay in id order, so each process's devices hold one contiguous block
  of every batch.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("a mesh needs at least one device")
  return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays split along their first (batch) axis over the mesh's ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Arrays held whole by every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def num_processes(mesh: Mesh) -> int:
  """How many processes own devices of ``mesh``."""
  return len({d.process_index for d in mesh.devices.flat})


def describe(mesh: Mesh) -> str:
  """What a run uses, in words: ``8 devices (gpu) in 2 processes``.

  >>> describe(data_mesh(jax.devices()[:1]))
  '1 device (cpu) in 1 process'
  """
  kinds = sorted({d.platform for d in mesh.devices.flat})
  processes = num_processes(mesh)
  return (f"{mesh.size} device{'s' if mesh.size != 1 else ''} ({', '.join(kinds)}) in "
          f"{processes} process{'es' if processes != 1 else ''}")


def check_batch_size(batch_size: int, mesh: Mesh, option: str = "--batch-size") -> None:
  """Raises ValueError naming ``option`` unless ``batch_size`` splits evenly over ``mesh``.

  >>> check_batch_size(8, data_mesh(jax.devices()[:1]))
  """
  if batch_size % mesh.size:
    processes = num_processes(mesh)
    hosts = f" of {processes} processes" if processes > 1 else ""
    raise ValueError(f"{option} {batch_size} must be divisible by the {mesh.size} devices"
                     f"{hosts} it is split over; use a multiple of {mesh.size}")


def jit_step(step: Callable[..., tuple[Any, Any]], mesh: Mesh, extra: int = 0) -> Callable:
  """``step(state, batch, *extra) -> (state, metrics)`` jitted data parallel over ``mesh``.

  The state goes in replicated (and is donated), the batch split along ``data``,
  the ``extra`` further arguments (a teacher's variables) replicated; everything
  comes out replicated, so XLA all-reduces the gradients.
  """
  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh))
                 + (replicated(mesh),) * extra,
                 out_shardings=replicated(mesh), donate_argnums=0)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree``'s arrays placed whole on every device of ``mesh``.

  Every process must pass equal values (e.g. a state initialised from the same
  seed, or restored from the same checkpoint).
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def mesh_of(tree: Any) -> Mesh:
  """The mesh ``tree``'s arrays are placed on: that of their first ``NamedSharding``,
  else (host or single-device arrays) a mesh over all devices."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return data_mesh()
