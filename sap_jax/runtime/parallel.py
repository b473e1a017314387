"""One device mesh for the whole run: data parallel over a ``data`` axis, replicated params.

Room for FSDP later: parameters get their sharding from :func:`param_sharding`,
the only place that would change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sap_jax.runtime import errors

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                  "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")

EXIT_DISTRIBUTED_SETUP = errors.EXIT_DISTRIBUTED_SETUP
DistributedSetupError = errors.DistributedSetupError


def _check_args(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> None:
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
        raise DistributedSetupError(
            f"explicit multi-process start-up needs --coordinator_address, --num_processes and "
            f"--process_id together; missing {missing}. (On Cloud TPU and under Slurm give none "
            "of them: they are detected.)")
    if coordinator_address is None:
        return
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(
            f"--coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. 10.0.0.2:1234 "
            "(the address of process 0, reachable from every process).")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise DistributedSetupError(f"--num_processes={num_processes!r} must be an integer >= 1.")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise DistributedSetupError(
            f"--process_id={process_id!r} does not fit --num_processes={num_processes}: it must "
            f"lie in [0, {num_processes - 1}], a different one on every process.")


def _wait_for_port(address: str, timeout_s: float) -> None:
    """Fail clearly, instead of aborting inside the runtime, when process 0 is unreachable."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as e:
            last = e
            time.sleep(0.5)
    raise DistributedSetupError(
        f"the coordinator {address} (process 0) could not be reached within {timeout_s:g} s "
        f"({last}). Check that process 0 is running, that the address and port are right and "
        "reachable from this host, or raise --distributed_timeout_s.")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: float = 300.0) -> bool:
    """Join a multi-process job when one is configured; a no-op on a single host.

    Explicit arguments (``--coordinator_address/--num_processes/--process_id``)
    work everywhere. Without them, ``jax.distributed.initialize()`` auto-detects
    Cloud TPU pods, Slurm and Open MPI, or reads ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; it is only called when such an
    environment is present, so a laptop or a single GPU box never waits.

    Start-up is bounded by ``timeout_s``: a process that cannot reach process
    0, or a job where not all processes arrive, raises
    :class:`DistributedSetupError` or exits with :data:`EXIT_DISTRIBUTED_SETUP`
    and a message, instead of hanging. Returns whether a job was joined.
    """
    _check_args(coordinator_address, num_processes, process_id)
    explicit = coordinator_address is not None
    if not explicit and not any(os.environ.get(k) for k in _MULTIHOST_ENV):
        return False
    if jax.distributed.is_initialized():
        return True
    if explicit and num_processes == 1:
        return False
    if explicit and process_id != 0:
        _wait_for_port(coordinator_address, timeout_s)
    where = coordinator_address or "the detected cluster"
    logging.info("joining the multi-process job at %s (waiting up to %g s)", where, timeout_s)

    # The runtime aborts the process (SIGABRT, no Python exception) when the
    # job does not form in time; this watchdog fires first and says why.
    def give_up() -> None:
        print(f"error: the multi-process job at {where} did not form within {timeout_s:g} s: "
              "not every process started, or one cannot reach the coordinator. Start all "
              "processes with the same --num_processes and distinct --process_id, check the "
              "address and port, or raise --distributed_timeout_s.", file=sys.stderr, flush=True)
        os._exit(EXIT_DISTRIBUTED_SETUP)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(timeout_s) + 30)
    finally:
        watchdog.cancel()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def make_mesh(devices: Any = None) -> Mesh:
    """The run's mesh: one ``data`` axis over ``devices`` (default: every device, JAX's order).

    The axis is ``Auto``: the compiler propagates shardings through the model, so user code
    that broadcasts a parameter against the batch (a ViT's cls token, a position embedding)
    runs as written; with ``Explicit`` axes such a concatenation is a sharding type error.
    """
    n = jax.device_count() if devices is None else len(devices)
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def param_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract(tree: Any, sharding: Any) -> Any:
    """``tree``'s arrays (or shapes) as ``ShapeDtypeStruct``s placed by ``sharding``: what
    ``jit(...).lower`` compiles for without any data (ahead-of-time compiles)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host tree (identical on every process) on all devices, replicated."""
    sharding = param_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                               lambda idx: np.asarray(x)[idx]),
        tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble per-process batches into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


# --------------------------------------------------------------------------
# Files on shared storage (local disk, NFS, or any path orbax/epath support, e.g. gs://)
# --------------------------------------------------------------------------

def path(p: Any):
    """An absolute ``etils.epath.Path``: local paths are made absolute, URLs kept as they are."""
    from etils import epath

    s = os.fspath(p)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process; every process must call it (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def write_text_atomic(target: Any, text: str) -> None:
    """Write ``text`` to ``target`` via a temporary file and a rename (readers never see half)."""
    target = path(target)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)


# --------------------------------------------------------------------------
# Persistent compilation cache
# --------------------------------------------------------------------------

@dataclasses.dataclass
class CacheStats:
    """What the persistent compilation cache did within :func:`compilation_cache`."""

    directory: str | None  # the cache in use; None = none
    requests: int = 0  # compilations that consulted the cache
    loaded: int = 0  # ... and found their program there
    saved_s: float = 0.0  # compile time those programs originally took, minus loading them

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def compilation_cache(directory: Any):
    """Within the block, JAX keeps compiled programs in ``directory`` and loads them from there,
    so a resumed or repeated run skips most of its compile time (``docs/benchmarks.md``).
    Yields a :class:`CacheStats` that counts what the cache did meanwhile.

    ``None`` or ``""`` leaves JAX's own setting alone, as does a cache directory set outside
    sap_jax (``JAX_COMPILATION_CACHE_DIR``), which wins. Afterwards JAX's previous setting is
    restored. JAX writes entries from process 0 only, for programs that took over
    ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_compilation_cache_dir
    if directory and before:
        logging.info("compilation cache: JAX_COMPILATION_CACHE_DIR=%s wins over %s", before,
                     directory)
    ours = bool(directory) and not before
    stats = CacheStats(os.fspath(path(directory)) if ours else before)

    def count(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            stats.requests += 1
        elif event == "/jax/compilation_cache/cache_hits":
            stats.loaded += 1

    def saved(event: str, secs: float, **_: Any) -> None:
        if event == "/jax/compilation_cache/compile_time_saved_sec":
            stats.saved_s += secs

    if ours:
        cc.set_cache_dir(stats.directory)
        cc.reset_cache()  # JAX reads the directory once, at its first compile: make it read again
    jax.monitoring.register_event_listener(count)
    jax.monitoring.register_event_duration_secs_listener(saved)
    try:
        yield stats
    finally:
        jax.monitoring.unregister_event_listener(count)
        jax.monitoring.unregister_event_duration_listener(saved)
        if ours:
            cc.set_cache_dir(before)
            cc.reset_cache()
