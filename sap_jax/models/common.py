"""Layers and the base class shared by every prunable backbone."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sap_jax import tracing
from sap_jax.structure import groups as G

# He-normal with fan_out, as torchvision initialises conv kernels.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# Traced structures of built-in backbones, keyed by (class, config JSON, input size).
_STRUCTURES: dict[tuple[Any, str, tuple[int, int]], G.Structure] = {}

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 in Flax's convention.
BN_EPSILON = 1e-5


def conv(cin: int, cout: int, kernel: int, stride: int = 1, *, depthwise: bool = False,
         dtype: Any = None, rngs: nnx.Rngs) -> nnx.Conv:
    """A bias-free conv with PyTorch-style symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                    feature_group_count=cin if depthwise else 1, use_bias=False,
                    kernel_init=_CONV_INIT, dtype=dtype, rngs=rngs)


def batch_norm(ch: int, *, dtype: Any = None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # Two-pass variance: E[x^2] - E[x]^2 cancels badly in float32, which made
    # 8-way data-parallel runs drift visibly from 1-device runs within steps.
    return nnx.BatchNorm(ch, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                         use_fast_variance=False, rngs=rngs)


def materialize(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """Identity that makes XLA:CPU keep ``x`` in memory; a no-op on other platforms.

    Why: the CPU backend duplicates cheap elementwise producers into every
    consumer fusion. Along a residual chain (each block's output feeds the next
    block's add) the backward pass's layout-changing copies for the weight
    gradients then recompute the BN, ReLU and add of every earlier block:
    work quadratic in depth, 1.26 s of a 1.65 s ResNet-56 train step at batch
    128 (``docs/benchmarks.md``). ``lax.optimization_barrier`` does not help:
    the CPU pipeline removes it before fusion. A conditional is opaque to
    fusion, so its result is computed once.

    ``anchor`` is a replicated runtime array (a parameter of the calling
    block): its first element is the branch predicate, which XLA cannot fold
    and which, unlike an element of ``x``, is not split across devices. Both
    branches return ``x`` unchanged; the second differs only so that it is
    not merged with the first.
    """
    def opaque(v, a):
        return jax.lax.cond(jnp.isfinite(a.reshape(-1)[0]), lambda u: u, lambda u: u * 1, v)

    return jax.lax.platform_dependent(x, jax.lax.stop_gradient(anchor), cpu=opaque,
                                      default=lambda v, a: v)


class PrunableModel(nnx.Module):
    """Base class of every backbone.

    A subclass is built from an explicit width spec ``widths`` (one entry per
    prunable channel group, ``None`` = dense). A pruned model is the same class with smaller
    widths. Its channel groups and its gated forward both come from the tracer
    (:mod:`sap_jax.tracing`), as for any user's model: there is no hand-written description
    to drift from the code.

    Subclasses set ``self.widths``, ``self.in_channels``,
    ``self.total_stride`` and ``self.stages`` (a list of lists of blocks, each
    block with ``num_groups`` and ``__call__(x)``), and define ``config()`` (constructor
    kwargs that rebuild the model), ``default_widths()`` (the dense widths, in forward order
    of the traced groups), ``features(x)`` (images to pooled features) and
    ``classify(features, rngs)`` (the head).
    """

    widths: tuple[int, ...]
    in_channels: int
    total_stride: int

    # ---- shared -------------------------------------------------------------
    def blocks(self):
        """Yield ``(path, block)`` for every block, in forward (= group) order."""
        for s, stage in enumerate(self.stages):
            for i, block in enumerate(stage):
                yield ("stages", s, i), block

    def _run_blocks(self, x: jax.Array) -> jax.Array:
        for _, block in self.blocks():
            x = block(x)
        return x

    def __call__(self, x: jax.Array, arch: Sequence[Any] | None = None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits of NHWC images; with ``arch`` (one keep vector per group) the channels of
        group k are multiplied by ``arch[k]`` where layers read them
        (:func:`sap_jax.tracing.gated_call` on :meth:`features`). ``rngs`` (stream
        "dropout") is needed only to train a head with dropout."""
        self.check_input(x, arch)
        if arch is None:
            f = self.features(x)
        else:
            f = tracing.gated_call(self, x, arch, self.structure(tuple(x.shape[1:3])),
                                   method="features")
        return self.classify(f, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Images to what :meth:`classify` reads: the part of the forward that holds every
        group (each backbone defines it)."""
        raise NotImplementedError(f"{type(self).__name__} defines no features().")

    def classify(self, f: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The head on :meth:`features` (each backbone defines it); runs outside the gated
        trace, so it may use ``rngs`` (dropout)."""
        raise NotImplementedError(f"{type(self).__name__} defines no classify().")

    def trace_ignore(self) -> tuple[str, ...]:
        """Layers whose output channels the paper's recipe leaves whole (the stem's output is
        not an inner width); :meth:`structure` traces with them ignored."""
        return ("stem_conv",)

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    def structure(self, image_size: int | tuple[int, int]) -> G.Structure:
        """The model's channel groups for a square (or (H, W)) input, traced
        (:func:`sap_jax.tracing.structure`) with :meth:`trace_ignore` left whole.

        Cached per class, ``config()`` and input size: the groups depend on nothing else, and
        jitted steps ask for them on every trace."""
        hw = self.check_image_size(image_size)
        key = (type(self), json.dumps(self.config(), sort_keys=True), hw)
        s = _STRUCTURES.get(key)
        if s is None:
            s = tracing.structure(self, (1, *hw, self.in_channels), ignore=self.trace_ignore())
            if s.widths != self.widths:
                raise AssertionError(f"{type(self).__name__}: traced group widths "
                                     f"{list(s.widths)}, constructed {list(self.widths)}.")
            if len(_STRUCTURES) >= 64:
                _STRUCTURES.clear()
            _STRUCTURES[key] = s
        return s

    def check_image_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any((not isinstance(s, int)) or s < self.total_stride
                               or s % self.total_stride for s in hw):
            raise ValueError(
                f"unsupported image size {image_size!r} for {type(self).__name__}: height and "
                f"width must be positive multiples of the network's total stride "
                f"{self.total_stride} (e.g. {self.total_stride * max(1, 224 // self.total_stride)}"
                f" or {self.total_stride}).")
        return hw  # type: ignore[return-value]

    def _validate_widths(self, widths: Sequence[int] | None) -> tuple[int, ...]:
        dense = self.default_widths()
        if widths is None:
            return dense
        widths = tuple(widths)
        if len(widths) != len(dense):
            raise ValueError(f"{type(self).__name__} has {len(dense)} prunable channel groups "
                             f"but widths has {len(widths)} entries.")
        for k, w in enumerate(widths):
            if isinstance(w, bool) or not isinstance(w, int) or w < G.MIN_KEPT:
                raise ValueError(f"widths[{k}] = {w!r}: every group width must be an integer "
                                 f">= {G.MIN_KEPT}.")
        return tuple(int(w) for w in widths)

    def check_input(self, x: jax.Array, arch: Sequence[Any] | None) -> None:
        """Static checks of a forward call, so mistakes fail here and not inside XLA."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects NHWC images with "
                             f"{self.in_channels} channels; got shape {tuple(x.shape)}.")
        self.check_image_size(tuple(int(s) for s in x.shape[1:3]))
        if arch is not None:
            G.check_arch(arch, self.widths)


def dtype_from(name: str | None) -> Any:
    return None if name is None else jnp.dtype(name)
