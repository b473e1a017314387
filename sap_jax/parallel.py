"""One device mesh for the whole run: data parallel over a ``data`` axis, replicated params.

Room for FSDP later: parameters get their sharding from :func:`param_sharding`,
the only place that would change.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed() -> None:
    """Join a multi-host job when one is configured; a no-op on a single host.

    ``jax.distributed.initialize()`` auto-detects TPU pods, Slurm and Open MPI
    clusters, or reads ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
    ``JAX_PROCESS_ID``. It is only called when such an environment is present,
    so a laptop or a single GPU box never waits for a coordinator.
    """
    if not any(os.environ.get(k) for k in _MULTIHOST_ENV):
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def param_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host tree (identical on every process) on all devices, replicated."""
    sharding = param_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda idx: np.asarray(x)[idx]), tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble per-process batches into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
