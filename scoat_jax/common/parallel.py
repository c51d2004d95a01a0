"""Devices, hosts and shardings: one code path for 1 CPU, 8 GPUs or many hosts.

Data parallelism uses a one-axis mesh, `Mesh(devices, ('data',))`: batches are
sharded along their leading axis, the train state is replicated. Each process
feeds only its own share of the global batch, which
`jax.make_array_from_process_local_data` assembles into one global array.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several".
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def fake_cpu_devices_xla_flags(count: int, collective_timeout_s: int = 1800) -> str:
  """XLA_FLAGS giving this host `count` fake CPU devices (tests, CPU benchmarks).

  The fake devices are threads sharing the host's cores. XLA's CPU collectives
  abort the process ("Termination timeout ... exceeded") when a device thread
  waits longer than `collective_timeout_s` for the others at a rendezvous.
  XLA's default, 40 s, is within the spread of the device threads' arrival
  times for a full-size step on a loaded 2-core machine, hence 1800 s for
  benchmarks; the tests' tiny steps pass 120 s, so that a stalled collective
  fails fast instead of hanging. Set before JAX creates its CPU backend.
  """
  return (f"--xla_force_host_platform_device_count={count}"
          f" --xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout_s}"
          f" --xla_cpu_collective_timeout_seconds={collective_timeout_s}")


def maybe_initialize_distributed(force: bool = False) -> bool:
  """Calls `jax.distributed.initialize()` when asked to or when on a cluster.

  On Slurm and Open MPI, JAX reads the coordinator, process count and index
  from the environment. A plain launch sets JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (README, "Several hosts").

  Args:
    force: initialise even when no cluster environment is detected.

  Returns:
    Whether jax.distributed was initialised.
  """
  env = {k: os.environ[k] for k in _CLUSTER_ENV if k in os.environ}
  if not force and not env:
    return False
  if env.get("SLURM_NTASKS") == "1" and not force:
    return False  # A one-task Slurm job is a single process.
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  # Cross-process collectives on CPU need an implementation; gloo ships with
  # jaxlib. (Asking for the backend here would initialise it too early.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def make_mesh(devices=None) -> Mesh:
  """A one-axis data-parallel mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, flag: str = "config.batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over devices and hosts."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(
        f"{flag}={global_batch_size} must be a multiple of the device count "
        f"({devices}); set {flag} to e.g. {devices * max(1, global_batch_size // devices)}.")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"{flag}={global_batch_size} must be a multiple of the process count "
        f"({jax.process_count()}).")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's local batch into globally sharded arrays."""
  sharding = data_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in local batch order.

  The inverse of `global_batch` for one process: the rows this process fed
  (replicated shards are taken once).
  """
  seen, parts = set(), []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    if start in seen:
      continue
    seen.add(start)
    parts.append(np.asarray(shard.data))
  return np.concatenate(parts, axis=0)
