"""TensorBoard event files without TensorFlow, and the run's steps/s and ETA.

The writer is tensorboardX's: a public, documented API that writes the standard event files
``tensorboard --logdir`` reads, in a 0.6 MB pure-Python package with no TensorFlow. clu's
writers import TensorFlow at module load, and tensorboard's own ``summary.writer`` is an
internal module with no stability promise (docs/design.md, "A lean core").

Only process 0 writes events; every process logs each metric to its ``log.txt``
(:func:`sap_jax.runtime.console.detail`). A remote logdir (``gs://...``) gets its events
written locally and copied there by :meth:`Summaries.flush` (``etils.epath``, as the
checkpoints use), since object stores cannot append.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping

from sap_jax.runtime import console

#: How often a remote logdir gets the events written so far.
COPY_EVERY_S = 60.0


class Summaries:
    """Scalars for TensorBoard and the log, and a steps/s + ETA report every ``every_steps``.

    ``enabled=False`` (processes other than 0) keeps only the log lines.
    """

    def __init__(self, logdir: str, *, enabled: bool = True, total_steps: int = 0,
                 every_steps: int = 0):
        self.logdir, self.enabled = str(logdir), enabled
        self.total, self.every = total_steps, every_steps
        self._writer = None
        self._local = None  # where events are written for a remote logdir
        self._last: tuple[float, int] | None = None  # (time, step) of the last progress report
        self._copied = time.monotonic()  # when a remote logdir last got the events
        if enabled:
            from tensorboardX import SummaryWriter

            remote = "://" in self.logdir
            self._local = tempfile.mkdtemp(prefix="sap_jax_events_") if remote else None
            self._writer = SummaryWriter(self._local or self.logdir, flush_secs=30)

    def __enter__(self) -> Summaries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also when the run stops on an error or a preemption: keep what it wrote

    def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
        console.detail("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, float(v), int(step))
            if self._local is not None and time.monotonic() - self._copied > COPY_EVERY_S:
                self.flush()  # TensorBoard on the bucket sees the run as it goes

    def report_progress(self, step: int) -> None:
        """Every ``every_steps`` steps: ``perf/steps_per_sec`` and ``perf/eta_s`` (over the
        steps since the last report), so throughput is on the TensorBoard timeline too."""
        now = time.perf_counter()
        if self._last is None or step < self._last[1]:
            self._last = (now, step)
            return
        if not self.every or step - self._last[1] < self.every:
            return
        rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, step)
        eta = (self.total - step) / rate if self.total > step else 0.0
        console.detail("step %d/%d: %.2f steps/s, ETA %.0f s", step, self.total, rate, eta)
        if self._writer is not None:
            self._writer.add_scalar("perf/steps_per_sec", rate, int(step))
            self._writer.add_scalar("perf/eta_s", eta, int(step))

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self._local is not None:
            self._copy_out()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self._local is not None:
            self._copy_out()
            shutil.rmtree(self._local, ignore_errors=True)
        self._writer = None

    def _copy_out(self) -> None:
        from etils import epath

        self._copied = time.monotonic()
        for f in pathlib.Path(self._local).rglob("*"):
            if f.is_file():
                dest = epath.Path(self.logdir) / str(f.relative_to(self._local))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
