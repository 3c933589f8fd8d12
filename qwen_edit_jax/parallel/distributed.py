"""Multi-host runs: `jax.distributed` start-up and per-host batch rows.

One process runs per host (TPU VM worker or GPU node); together they see every device of the job
as one `jax.devices()` list, build one mesh (`parallel.make_mesh`) and run one SPMD program.

- `initialize()` starts `jax.distributed` when the job has several processes: on Cloud TPU pods
  (`QWEN_EDIT_JAX_DISTRIBUTED=1`, set by `train/launch_tpu_pod.sh`), SLURM and Open MPI JAX
  detects everything; elsewhere (e.g. `train/launch_gpu_multinode.sh`,
  tests on localhost) the three environment variables `JAX_COORDINATOR_ADDRESS` (host:port of
  process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` say it. A single-process run does nothing.
- Data: every host loads only the rows of the global batch that land on its own devices
  (`local_batch_rows`), then `jax.make_array_from_process_local_data` assembles the global array
  (`global_batch`). The global batch is identical to a single-host run's, so the loss is too.
- Checkpoints: Orbax writes sharded arrays collectively; every process calls save/restore
  (`training.checkpoint.TrainCheckpointer`), each writing its own shards.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_FORCE = "QWEN_EDIT_JAX_DISTRIBUTED"  # "1": start jax.distributed with JAX's auto-detection (TPU pods)


class DistributedError(RuntimeError):
    """The multi-host environment is inconsistent (names the variable and value at fault)."""


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} must be an integer") from None


def _auto_detected_cluster() -> bool:
    """True when JAX can find the other processes by itself (TPU pod slice, SLURM, Open MPI)."""
    if os.environ.get(ENV_FORCE, "") == "1":  # set by train/launch_tpu_pod.sh
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Any = None,
    initialization_timeout: int = 300,
) -> bool:
    """Start `jax.distributed` if this is a multi-process job; returns True if it is now running.

    Must run before anything touches a device. Arguments override the `JAX_*` environment
    variables; with neither, a TPU pod / SLURM / Open MPI job is auto-detected and anything else
    is treated as a single-process run (no-op).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [n for n, v in ((ENV_COORDINATOR, coordinator_address), (ENV_NUM_PROCESSES, num_processes),
                                  (ENV_PROCESS_ID, process_id)) if v is None]
        if missing:
            raise DistributedError(f"multi-host start-up needs all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
                                   f"{ENV_PROCESS_ID}; missing {missing}")
        if not 0 <= process_id < num_processes:
            raise DistributedError(
                f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes})")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=initialization_timeout)
        return True
    if _auto_detected_cluster():
        jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=initialization_timeout)
        return True
    return False


def local_batch_rows(sharding: jax.sharding.Sharding, global_batch: int) -> np.ndarray:
    """Indices (sorted) of the global batch rows that live on this process's devices.

    `sharding` is the batch sharding (`parallel.batch_sharding(mesh, global_batch)`), applied to
    the leading axis. A replicated batch gives every row to every process.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        sl = index[0] if index else slice(None)
        rows.update(range(*sl.indices(global_batch)))
    return np.array(sorted(rows), dtype=np.int64)


def global_batch(local: Any, sharding: jax.sharding.Sharding, global_batch_size: int, axis: int = 0) -> Any:
    """Global arrays from this host's rows (`local_batch_rows` order, on batch axis `axis`) of every leaf.

    Thin wrapper over `jax.make_array_from_process_local_data` that checks the row count, so a
    data loader that loaded the wrong rows fails with a clear message instead of a shape error.
    """
    n_local = len(local_batch_rows(sharding, global_batch_size)) if axis == 0 else None

    def one(x):
        x = np.asarray(x)
        if n_local is not None and x.shape[0] != n_local:
            raise DistributedError(f"process {jax.process_index()} passed {x.shape[0]} batch rows, but its devices "
                                   f"hold {n_local} of the global batch of {global_batch_size}")
        shape = (*x.shape[:axis], global_batch_size, *x.shape[axis + 1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local)


def to_host(x: Any) -> np.ndarray:
    """A jax array as numpy on this host; an array spread over several hosts is all-gathered first
    (every process must call this for the same array, as for any collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sync(name: str = "barrier") -> None:
    """Block until every process reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
