"""The latency table of a run or of a config: built on a backend, or read from a file.

A run with ``budget.metric = "latency"`` reads ``budget.latency_table`` or, when that is empty,
builds a table on its own backend before anything else compiles and keeps it in the workdir
(:data:`TABLE_FILE`), so a resumed run estimates with the same table.
``python -m sap_jax.latency`` builds one from a config ahead of a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sap_jax import models
from sap_jax.method import latency
from sap_jax.runtime import parallel
from sap_jax.train import spec as spec_lib

TABLE_FILE = "latency_table.json"


def table_batch(spec: spec_lib.RunSpec, devices: int) -> int:
    """The batch one device computes in this run: the table times layers at it."""
    return max(1, spec.data.batch_size // max(1, devices))


def model_for(spec: spec_lib.RunSpec, num_classes: int | None,
              widths: list[int] | None = None) -> models.PrunableModel:
    """The config's model, dense or at ``widths`` (random weights: values do not change
    speed)."""
    return models.create(spec.model.name, seed=spec.seed, num_classes=num_classes, widths=widths,
                         dtype=None if spec.dtype == "float32" else spec.dtype,
                         **spec_lib.model_arguments(spec.model, spec.image_size))


def build(spec: spec_lib.RunSpec, model: models.PrunableModel, *, device: jax.Device,
          batch: int | None = None, points: int | None = None, reps: int | None = None,
          train: bool = True, log: Callable[[str], None] | None = None,
          estimate: latency.Estimator | None = None,
          device_info: dict[str, Any] | None = None) -> latency.LatencyTable:
    """Measure the table of ``model`` at the run's image size and dtype on ``device`` (or, with
    ``estimate``, ask the compiler; see :func:`sap_jax.method.latency.build_table`)."""
    b = spec.budget
    return latency.build_table(
        model, spec.image_size, batch or table_batch(spec, len(jax.devices(device.platform))),
        dtype=jnp.dtype(spec.dtype), points=points or b.latency_points,
        reps=reps or b.latency_reps, train=train, device=device, log=log, estimate=estimate,
        device_info=device_info)


def for_run(spec: spec_lib.RunSpec, workdir: Any,
            model_fn: Callable[[], models.PrunableModel]) -> latency.LatencyTable | None:
    """The run's table (``None`` with metric "macs"): ``budget.latency_table``, else the one kept
    in ``workdir``, else one built now by process 0 on this backend and written there."""
    b = spec.budget
    if b.metric != "latency":
        return None
    if b.latency_table:
        return latency.LatencyTable.load(b.latency_table)
    path = parallel.path(workdir) / TABLE_FILE
    if not path.exists() and jax.process_index() == 0:
        logging.info("budget.metric = 'latency': measuring a latency table on %s (%s) ...",
                     jax.devices()[0].device_kind, jax.default_backend())
        table = build(spec, model_fn(), device=jax.local_devices()[0], log=logging.info)
        table.save(path)
        logging.info("latency table built in %.0f s: %s", table.build_seconds, path)
    parallel.sync("latency_table")
    return latency.LatencyTable.load(path)
