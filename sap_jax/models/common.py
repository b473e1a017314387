"""Layers, the gate, and the base class shared by every prunable backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sap_jax.structure import groups as G

# He-normal with fan_out, as torchvision initialises conv kernels.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

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


def gate(x: jax.Array, v: jax.Array | None) -> jax.Array:
    """Multiply the channels (last axis) of ``x`` by the keep vector ``v``.

    Written by hand in every built-in backbone although :func:`sap_jax.tracing.gated_call`
    could gate them: it is the oracle the traced gating is checked against
    (tests/test_trace.py), and it costs no trace."""
    return x if v is None else x * v.astype(x.dtype)


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


def down(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Output size of a stride-``stride`` conv or pool with ``kernel // 2`` padding.

    Exact for odd kernels whenever the input size divides by the stride, which
    :meth:`PrunableModel.check_image_size` guarantees.
    """
    return (hw[0] // stride, hw[1] // stride)


class PrunableModel(nnx.Module):
    """Base class of every backbone.

    A subclass is built from an explicit width spec ``widths`` (one entry per
    prunable channel group, ``None`` = dense) and describes itself with
    :meth:`describe`. A pruned model is the same class with smaller widths.

    Subclasses set ``self.widths``, ``self.in_channels``,
    ``self.total_stride`` and ``self.stages`` (a list of lists of blocks, each
    block with ``num_groups``, ``__call__(x, arch)`` and ``describe``), and
    define ``config()`` (constructor kwargs that rebuild the model),
    ``default_widths()`` (the dense widths), ``describe(builder, hw)`` and
    ``__call__(x, arch=None)``.
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

    def _run_blocks(self, x: jax.Array, arch: Sequence[Any] | None) -> jax.Array:
        blocks = [blk for _, blk in self.blocks()]
        for block, a in zip(blocks, split_arch(arch, [blk.num_groups for blk in blocks])):
            x = block(x, a)
        return x

    def _describe_blocks(self, b: G.StructureBuilder, hw: tuple[int, int]) -> tuple[int, int]:
        for path, block in self.blocks():
            hw = block.describe(b, path, hw)
        return hw

    def trace_ignore(self) -> tuple[str, ...]:
        """Layers whose output channels the paper's recipe leaves whole: with
        ``sap_jax.tracing.structure(model, x, ignore=model.trace_ignore())`` the traced groups
        are exactly :meth:`describe`'s (the stem's output is not an inner width)."""
        return ("stem_conv",)

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    def structure(self, image_size: int | tuple[int, int]) -> G.Structure:
        """The model's channel-group description for a square (or (H, W)) input."""
        hw = self.check_image_size(image_size)
        b = G.StructureBuilder(hw, self.in_channels)
        self.describe(b, hw)
        s = b.build()
        assert s.widths == self.widths, (s.widths, self.widths)
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


def split_arch(arch: Sequence[Any] | None, counts: Sequence[int]) -> list[Sequence[Any] | None]:
    """Hand each block its consecutive slice of the architecture vector."""
    out, k = [], 0
    for n in counts:
        out.append(None if arch is None else arch[k:k + n])
        k += n
    return out


def dtype_from(name: str | None) -> Any:
    return None if name is None else jnp.dtype(name)
