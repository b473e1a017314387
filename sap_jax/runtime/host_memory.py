"""Keep freed host memory in the process, so that XLA:CPU's buffers are not mapped afresh each call.

XLA:CPU allocates every call's outputs and temporaries with ``malloc``. glibc serves blocks of
32 MiB and more (a ResNet-50's activations at batch 32 are 103 MB each in stage 1) with ``mmap``
and unmaps them when they are freed, so every call page-faults its buffers in again. On the
development VM a fresh 103 MB output cost 35-46 ms as shipped and 7 ms in retained memory, and a
pruned ResNet-50's throughput efficiency rose from 0.84 to 0.88-0.90 (``docs/benchmarks.md``,
"Host memory"): a pruned model keeps the dense model's full-width residual stream, so this cost
weighs more on it.

:func:`apply` with ``"retain"`` asks glibc (``mallopt``) to

* serve large blocks from its heap instead of ``mmap`` (``M_MMAP_MAX = 0``),
* never hand freed heap memory back to the system (``M_TRIM_THRESHOLD``), and
* use one arena (``M_ARENA_MAX = 1``): a thread's own arena holds blocks of at most 64 MiB, so
  larger ones would still be mapped and unmapped per call.

The cost: the process's resident memory stays at its peak, and its threads share one malloc
lock, which slows XLA's compiler (the quickstart, compile-bound, took 102-108 s instead of 91).
So ``"system"`` is the default, and ``"retain"`` is for processes that run large programs many
times: CPU inference, latency tables, speed benchmarks. It must come before JAX starts a
backend, and as early as possible: a thread keeps the arena it first allocated from, so the
command lines apply it before anything else (config field ``host_memory``; ``--host-memory``
of ``python -m sap_jax.latency`` and ``benchmarks/pruned_speedup.py``). A process that has
imported NumPy and JAX still retains (``tests/test_host_memory.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from sap_jax.runtime.errors import ConfigError

MODES = ("retain", "system")

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int takes

#: What :func:`apply` did in this process (``results.json``'s ``speed.host_memory``).
_status = "system: not asked"


def status() -> str:
    """What :func:`apply` did in this process: ``"retained: ..."`` or ``"system: why"``."""
    return _status


def _backend_started() -> bool:
    try:  # no public API says whether a backend has started
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without it: try, as mallopt is harmless late
        return False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc, not musl
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return libc


def apply_config_value(mode: Any) -> str:
    """:func:`apply` a config's ``host_memory`` if it is one of :data:`MODES`; any other value is
    left alone, for the config's validation to report with its other errors."""
    return apply(mode) if mode in MODES else _status


def apply(mode: str) -> str:
    """Set this process's malloc for ``mode`` (:data:`MODES`) and return :func:`status`.

    ``"retain"`` keeps freed memory (the module's docstring says how and why); ``"system"``
    leaves malloc alone. Retaining is skipped, with the reason in the returned status, off glibc
    and once a JAX backend has started. Raises :class:`ConfigError` for another mode.
    """
    global _status
    if mode not in MODES:
        raise ConfigError(f"host_memory = {mode!r} must be one of {', '.join(map(repr, MODES))}.")
    if _status.startswith("retained"):
        pass  # glibc cannot be set back (nor needs setting twice)
    elif mode == "system":
        _status = "system: as configured"
    elif _backend_started():
        _status = "system: a JAX backend had already started"
    elif (libc := _glibc()) is None:
        _status = "system: not glibc"
    else:
        refused = [name for name, p, v in (("M_ARENA_MAX", _M_ARENA_MAX, 1),
                                           ("M_MMAP_MAX", _M_MMAP_MAX, 0),
                                           ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _NEVER_TRIM))
                   if libc.mallopt(p, v) != 1]
        _status = ("retained: glibc keeps freed memory (one arena, no mmap, no trim)"
                   if not refused else
                   f"system: glibc refused mallopt {', '.join(refused)} (the rest took effect)")
    return _status
