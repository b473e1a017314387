"""What a run prints on the terminal, and the full log it keeps in the workdir.

The terminal gets the run's own lines (start, one line per epoch, the cut, warnings and
errors) in a short format, plus, on a terminal, one live progress line with steps/s and an
ETA. Everything else a run logs (each metric as written to TensorBoard, steps/s notes, orbax,
compilation-cache and backend messages) goes only to ``<workdir>/log.txt``.
``--verbosity=1`` (absl's flag) puts all of it back on the terminal.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
import time
from typing import TextIO

from absl import logging

#: Sources (path fragments) whose INFO lines stay out of the terminal: orbax, the compilation
#: cache, JAX's backend probing (tpu on a CPU host). Metric echoes go through :func:`detail`.
QUIET_SOURCES = ("/orbax/", "compilation_cache.py", "xla_bridge.py")
LOG_FILE = "log.txt"
#: A logger for lines that belong in the log file only (every metric of an epoch).
DETAIL = "sap_jax.detail"
pylogging.getLogger(DETAIL).setLevel(pylogging.INFO)


def detail(msg: str, *args) -> None:
    """Log a line for ``log.txt`` (and ``--verbosity=1``), not for the terminal."""
    pylogging.getLogger(DETAIL).info(msg, *args, stacklevel=2)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for the block: TensorFlow's C++ start-up banners ("oneDNN custom
    operations are on", printed before any setting can stop them). An exception raised inside
    is reported after the descriptor is back."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet(record: pylogging.LogRecord) -> bool:
    if record.levelno >= pylogging.WARNING:
        return True
    return record.name != DETAIL and not any(s in record.pathname for s in QUIET_SOURCES)


def setup_terminal(verbosity: int) -> None:
    """Filter and shorten the terminal's log lines, unless ``verbosity`` > 0. Call it before
    JAX first looks for its backends (it logs each one it cannot find)."""
    handler = logging.get_absl_handler()
    if verbosity <= 0:
        handler.addFilter(_quiet)
        handler.setFormatter(pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    else:  # the full detail, but orbax's per-checkpoint lines still add nothing
        handler.addFilter(lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)


def setup_file(workdir: str | None, process_index: int = 0) -> str | None:
    """Copy every log line into the workdir's log file (local workdirs; ``log.N.txt`` for
    process N > 0). Returns its path, or None."""
    if not workdir or "://" in workdir:
        return None  # remote workdirs: the terminal (or the job's log) is the log
    try:
        os.makedirs(workdir, exist_ok=True)
        name = LOG_FILE if process_index == 0 else f"log.{process_index}.txt"
        file_handler = pylogging.FileHandler(os.path.join(workdir, name))
    except OSError:
        return None  # the run itself reports an unwritable workdir
    file_handler.setFormatter(pylogging.Formatter(
        "%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s"))
    file_handler.setLevel(pylogging.INFO)
    pylogging.getLogger().addHandler(file_handler)
    return file_handler.baseFilename


class ProgressLine:
    """One terminal line rewritten in place: phase, epoch, step, steps/s and ETA. Silent when
    the stream is not a terminal (batch jobs, CI), so logs hold only whole lines."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, every_s: float = 0.5,
                 enabled: bool = True):
        self.stream = stream or sys.stderr
        self.on = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.every = total_steps, every_s
        self.width = 0
        self._t = self._step = None
        self._rate = None  # steps/s, smoothed

    def update(self, step: int, text: str) -> None:
        if not self.on:
            return
        now = time.perf_counter()
        if self._t is None:
            self._t, self._step = now, step
            return
        if now - self._t < self.every:
            return
        rate = (step - self._step) / (now - self._t)
        # Smoothed, so a compilation pause shows as a slower rate rather than a jump.
        self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        self._t, self._step = now, step
        eta = (self.total - step) / self._rate if self._rate > 0 else float("inf")
        line = (f"  {text}  step {step}/{self.total}  {self._rate:.1f} steps/s  "
                f"ETA {_duration(eta)}")
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self) -> None:
        """Remove the line before whole lines are logged (and when the run ends)."""
        if self.on and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def human(n: float) -> str:
    """A count with a G/M/K suffix (MACs, parameters): 4.09G, 25.56M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
