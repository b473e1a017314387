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
COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(inference_of: Any = None) -> dict[str, Any] | None:
    """The options :func:`jit` adds, or ``None`` (XLA's defaults) off the CPU or when disabled.

    ``inference_of``: the ``groups.Structure`` of the model an inference-only
    function runs. Forward passes of models with depthwise convolutions keep
    XLA's defaults, whose YNNPACK depthwise kernels beat Eigen's at inference
    (MobileNetV2 at batch 32: 1.25-1.3x the images/s; batch-1 latency within
    3 %; ``docs/benchmarks.md``); their train steps and everything else get
    :data:`COMPILER_OPTIONS`.
    """
    if (jax.default_backend() != "cpu"
            or os.environ.get("SAP_JAX_XLA_CPU_DEFAULTS", "") not in ("", "0")):
        return None
    if inference_of is not None and any(getattr(layer, "depthwise", False)
                                        for layer in inference_of.layers):
        return None
    return dict(COMPILER_OPTIONS)


def jit(fn: Callable, *, inference_of: Any = None, **kwargs: Any) -> Callable:
    """``jax.jit`` plus :func:`compiler_options` when compiling for the CPU."""
    opts = compiler_options(inference_of)
    if opts is not None:
        kwargs["compiler_options"] = {**opts, **kwargs.get("compiler_options", {})}
    return jax.jit(fn, **kwargs)
