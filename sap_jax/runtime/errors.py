"""Every error sap_jax reports to a user, and the exit code of ``python -m sap_jax.main`` for each
(README, "Faults and exit codes"). Each message says what happened and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: Bad config, missing dataset, unreadable or foreign checkpoint, or a non-finite loss.
EXIT_BAD_INPUT = 2
#: The multi-process job could not form (bad setup or unreachable coordinator).
EXIT_DISTRIBUTED_SETUP = 3
#: A checkpoint could not be written (disk full, permissions); the previous one is intact.
EXIT_WRITE_FAILED = 74
#: Preempted by SIGTERM (or a first Ctrl-C) after saving a checkpoint: rerun to resume.
EXIT_PREEMPTED = 75
#: A second Ctrl-C: stopped at once, without saving (the shell's code for SIGINT).
EXIT_ABORTED = 130


class ConfigError(ValueError):
    """A config field has a value the run cannot use."""


class DatasetNotPrepared(RuntimeError):
    """A TFDS dataset is missing; the message says how to prepare it."""


class DistributedSetupError(ValueError):
    """The multi-process arguments do not describe a job that can start."""


class NonFiniteLoss(FloatingPointError):
    """The loss or gradients became NaN or Inf; the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved at the next step boundary."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names it and says what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


#: Most specific first: CheckpointWriteError is also a CheckpointError.
_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (Preempted, EXIT_PREEMPTED),
    (CheckpointWriteError, EXIT_WRITE_FAILED),
    (DistributedSetupError, EXIT_DISTRIBUTED_SETUP),
    (ConfigError, EXIT_BAD_INPUT),
    (DatasetNotPrepared, EXIT_BAD_INPUT),
    (NonFiniteLoss, EXIT_BAD_INPUT),
    (CheckpointError, EXIT_BAD_INPUT),
)


def close_fields(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The config fields a user may have meant by the dotted ``name``, for "did you mean":
    the same field name in another section first (a field that moved, ``sap.p`` ->
    ``budget.p``, which no spelling match finds), then close spellings of the whole path."""
    known = list(known)
    last = name.rsplit(".", 1)[-1]
    out = [k for k in known if k != name and k.rsplit(".", 1)[-1] == last]
    out += difflib.get_close_matches(name, known, n=n)
    return list(dict.fromkeys(out))[:n]


def exit_code(e: BaseException) -> int | None:
    """The exit code for ``e``, or None for an error that is a bug (keep its traceback)."""
    return next((code for cls, code in _CODES if isinstance(e, cls)), None)
