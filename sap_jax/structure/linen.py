"""Linen layers that take their widths from their stored arrays: how a Linen model wrapped by
``nnx.bridge.ToNNX`` runs after the cut.

A Linen layer builds its parameters' shapes from attributes (``nn.Conv(features=64)``) and
refuses stored arrays of another shape (``ScopeParamShapeError``); the cut slices the arrays
but cannot reach those attributes, which the Linen module's own code sets on every call.
Within :func:`stored_widths`, each standard Linen layer (``nn.Dense``, ``nn.DenseGeneral``,
``nn.Conv``, ``nn.ConvTranspose``) whose stored kernel has fewer output channels than its
``features`` says runs with the kernel's width instead (a depthwise conv's
``feature_group_count`` follows; ``nn.MultiHeadDotProductAttention``'s q/k/v projections
take their head count from their kernels); normalisation layers already take theirs from the
input. A custom Linen layer that builds a parameter from an attribute
(``self.param("w", init, (self.width,))``) still fails: the pre-flight check names it, and
``model_ignore`` leaves its channels whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn

#: The standard Linen layers whose width is an attribute (``features``).
_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose)


def _follow(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    m = context.module
    if context.method_name == "__call__" and isinstance(m, _LAYERS) and m.scope is not None \
            and m.has_variable("params", "kernel"):
        k = m.get_variable("params", "kernel").shape
        transposed = getattr(m, "transpose_kernel", False)
        width = int(k[-2] if transposed else k[-1])
        if not isinstance(m.features, int):  # DenseGeneral: kernel (*batch, *in, *features)
            stored = tuple(int(d) for d in k[len(k) - len(m.features):])
            if stored != tuple(m.features):
                object.__setattr__(m, "features", stored)  # an attention's heads
        elif isinstance(m.features, int) and width != m.features:
            if getattr(m, "feature_group_count", 1) == m.features > 1:  # depthwise
                object.__setattr__(m, "feature_group_count", width)
            # A frozen dataclass field: this bound copy lives for this call only.
            object.__setattr__(m, "features", width)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def stored_widths() -> Iterator[None]:
    """Within the block, standard Linen layers take their widths from their stored kernels
    (see the module docstring). Harmless for models without Linen layers."""
    with nn.intercept_methods(_follow):
        yield
