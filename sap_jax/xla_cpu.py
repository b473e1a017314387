"""XLA:CPU compiler settings for the library's jitted steps.

Measured on the 2-core development CPU (``docs/benchmarks.md``, "CPU
train step"): keeping XLA's YNNPACK fusions for reductions only (BN
statistics) and running convolutions through XLA's Eigen kernels makes
train steps 11-44 % faster than XLA's defaults (ResNet-50 44 %, ResNet-56
18 %, ResNet-20 20 %, MobileNetV2 11 %). The options apply only when JAX's
default backend is the CPU; set ``SAP_JAX_XLA_CPU_DEFAULTS=1`` to compile
with XLA's own defaults instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

#: Per-executable XLA options used on the CPU: YNNPACK fusions for reductions
#: only (XLA's default also gives it convolutions, which Eigen runs faster here).
COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, Any] | None:
    """The options :func:`jit` adds, or ``None`` off the CPU or when disabled."""
    if jax.default_backend() != "cpu" or os.environ.get("SAP_JAX_XLA_CPU_DEFAULTS", "") not in ("", "0"):
        return None
    return dict(COMPILER_OPTIONS)


def jit(fn: Callable, **kwargs: Any) -> Callable:
    """``jax.jit`` plus :data:`COMPILER_OPTIONS` when compiling for the CPU."""
    opts = compiler_options()
    if opts is not None:
        kwargs["compiler_options"] = {**opts, **kwargs.get("compiler_options", {})}
    return jax.jit(fn, **kwargs)
