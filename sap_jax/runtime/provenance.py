"""What made a run: the code, the library versions and the machine (results.json's
``provenance``).

Per-seed numbers depend on the machine: XLA:CPU picks kernels by the CPU's instruction set,
so the same code, versions and seed give different floating-point rounding, and from the first
epoch on different numbers, on another CPU (docs/results.md). This record says which machine a
number came from, and ``code_digest`` lets a study refuse to mix runs of different code.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import platform
import subprocess
from typing import Any

#: CPU features that change XLA:CPU's kernels (and so its rounding).
_ISA_PREFIXES = ("sse", "avx", "fma", "f16c", "amx", "bmi", "vnni", "neon", "asimd", "sve")
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # sap_jax/


@functools.cache
def code_digest() -> str:
    """SHA-256 over every ``.py`` file of the installed sap_jax package (path and content): equal
    digests mean the same code, committed or not."""
    h = hashlib.sha256()
    for f in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(f.relative_to(_PACKAGE)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(_PACKAGE.parent), *args], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = sorted(x for x in value.split() if x.startswith(_ISA_PREFIXES))
    except OSError:  # not Linux: the model platform gives is what there is
        pass
    return {"model": model, "count": os.cpu_count(), "isa_flags": flags}


def collect() -> dict[str, Any]:
    """The record: ``git_commit`` and ``git_dirty`` (None outside a git checkout),
    ``code_digest``, ``sap_jax_version``, ``jax_version``, ``jaxlib_version``,
    ``flax_version``, ``python``, ``platform``, ``device_kind``, ``cpu`` (model, count, the
    instruction-set flags XLA:CPU uses) and ``xla_flags`` (the environment's ``XLA_FLAGS``)."""
    import flax
    import jax
    import jaxlib

    from sap_jax.runtime.version import VERSION

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "code_digest": code_digest(),
        "sap_jax_version": VERSION,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": _cpu(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def same_code(record: dict[str, Any] | None) -> bool:
    """Whether a run's ``provenance`` record was made by the code running now."""
    return bool(record) and record.get("code_digest") == code_digest()
