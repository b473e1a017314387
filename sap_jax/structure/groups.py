"""Declarative description of a model's prunable channel groups.

Every backbone describes itself once, as a :class:`Structure`: the list of its
convolution, normalisation and linear layers, with each channel dimension
either a fixed integer or a :class:`GroupRef` to one of K prunable channel
groups. Everything that needs to know "which tensors belong to group k" reads
it from here:

* the MAC/parameter count (:mod:`sap_jax.structure.flops`) multiplies the layer
  dimensions;
* the surgery (:mod:`sap_jax.surgery`) slices every :class:`Slice` of a group;
* the partial group lasso penalises the slices of dropped channels;
* the report prints the group names and sizes.

A group is one channel dimension of size ``C_k`` shared by all the tensors it
touches: the conv that *produces* it (output axis), the conv that *consumes*
it (input axis), a depthwise conv running on it, and the BatchNorms that
normalise it (scale, bias, running mean and variance).

Architecture vectors (``arch``) are sequences of K vectors, ``arch[k]`` of
shape ``(C_k,)`` with 1 = keep and 0 = drop.

Minimum-width rule (enforced only in :func:`ensure_min_kept`): a group always
keeps at least ``MIN_KEPT = 1`` channel. A block whose inner width is zero
would not be a smaller block but a different one (its residual branch would
collapse to a constant), so extraction refuses to produce it and instead keeps
the group's strongest channel.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

#: A parameter's path in the model's state, every key a string (an NNX list index 0 is "0"),
#: as in :func:`sap_jax.structure.codec.path_str` and saved models.
Path = tuple[str, ...]


#: An architecture vector v: K vectors of shape (C_k,), 1 = keep channel i of group k, 0 = drop
#: (NumPy or JAX arrays; binary where it is cut, relaxed inside the generator). Every module
#: passes it by this name, ``arch``.
Arch = Sequence[Any]


def as_path(keys: Sequence[Any]) -> Path:
    """``keys`` (strings or list indices) as a :data:`Path`."""
    return tuple(str(k) for k in keys)

#: Every group keeps at least this many channels (see module docstring).
MIN_KEPT = 1


@dataclasses.dataclass(frozen=True)
class GroupRef:
    """A channel dimension that belongs to prunable group ``index``."""

    index: int


@dataclasses.dataclass(frozen=True)
class DimSum:
    """A channel dimension made of parts: ``sum(coef * dim)`` over ``terms``.

    Traced models need it where a layer reads a concatenation (``(g3, 1), (g5, 1), (16, 1)``)
    or a flattened feature map (``((g7, 49),)``: 7x7 positions of group 7's channels).
    """

    terms: tuple[tuple[int | GroupRef, int], ...]


Dim = int | GroupRef | DimSum


def _hw(v: int | Sequence[int]) -> tuple[int, int]:
    """An int or an (h, w) pair as a pair."""
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A 2-D convolution with an HWIO kernel at ``path + ('kernel',)``.

    ``out_hw`` is the spatial size of its output for the described input;
    padding is ``kernel // 2`` on each side. A depthwise conv has
    ``depthwise=True`` and ``in_ch == out_ch``. ``stride``, ``dilation`` (the kernel's,
    atrous) and ``lhs_dilation`` (the input's: a transposed conv, ``nnx.ConvTranspose``,
    inserts ``lhs_dilation - 1`` holes between input pixels) take an int or an (h, w) pair;
    a square one is stored as an int.
    """

    path: Path
    in_ch: Dim
    out_ch: Dim
    kernel: tuple[int, int]
    out_hw: tuple[int, int]
    stride: int | tuple[int, int] = 1
    depthwise: bool = False
    bias: bool = False
    groups: int = 1  # feature_group_count of a grouped (not depthwise) conv
    # Padding ((top, bottom), (left, right)) and input size when they are not the described
    # convention (kernel // 2 each side, input = out_hw * stride): MAC counts that leave out
    # padded taps, a transposed conv's count and the latency table read them.
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None
    in_hw: tuple[int, int] | None = None
    dilation: int | tuple[int, int] = 1
    lhs_dilation: int | tuple[int, int] = 1

    def __post_init__(self):
        # One spelling per value, so that a traced layer equals the same one described by hand.
        for name in ("stride", "dilation", "lhs_dilation"):
            h, w = _hw(getattr(self, name))
            object.__setattr__(self, name, h if h == w else (h, w))

    @property
    def strides(self) -> tuple[int, int]:
        """The window strides (h, w)."""
        return _hw(self.stride)

    @property
    def dilations(self) -> tuple[int, int]:
        """The kernel dilation (h, w)."""
        return _hw(self.dilation)

    @property
    def lhs_dilations(self) -> tuple[int, int]:
        """The input dilation (h, w); above 1 for a transposed conv."""
        return _hw(self.lhs_dilation)

    @property
    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The padding, the described convention (``kernel // 2`` each side) filled in."""
        (kh, kw) = self.kernel
        return self.padding or ((kh // 2, kh // 2), (kw // 2, kw // 2))

    @property
    def input_hw(self) -> tuple[int, int]:
        """The input's spatial size, the described convention (``out_hw * stride``) filled in."""
        (sh, sw) = self.strides
        return self.in_hw or (self.out_hw[0] * sh, self.out_hw[1] * sw)


@dataclasses.dataclass(frozen=True)
class NormLayer:
    """A normalisation over ``ch`` channels holding the per-channel arrays ``names``."""

    path: Path
    ch: Dim
    names: tuple[str, ...] = ("scale", "bias", "mean", "var")


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A linear layer with an (in, out) kernel and a bias."""

    path: Path
    in_ch: Dim
    out_ch: Dim
    bias: bool = True
    tokens: int = 1  # rows per image it is applied to (a channels-last MLP on H*W positions)


@dataclasses.dataclass(frozen=True)
class ScaleLayer:
    """One other per-channel parameter (a layer scale), the array at ``path``."""

    path: Path
    ch: Dim


@dataclasses.dataclass(frozen=True)
class ProductLayer:
    """A matrix product that is not a parameter layer (attention's QKᵀ and AV, a bilinear
    resize): ``per_channel * ch`` MACs per image, no parameters. ``ch`` is the channel
    dimension that passes through it (its cost follows that width), or 1 when the product fixes
    its operands' channels (``per_channel`` is then the whole count)."""

    path: Path  # the layer producing its first operand, then "product<k>"
    ch: Dim
    per_channel: int


Layer = ConvLayer | NormLayer | DenseLayer | ScaleLayer | ProductLayer

#: Slice roles. Kernel roles are what the partial group lasso penalises by
#: default; norm affine roles (BatchNorm, LayerNorm, ...) are optional; running statistics
#: and other per-channel arrays ("channel", e.g. a layer scale) are only sliced.
KERNEL_ROLES = ("out", "in", "depthwise", "bias")
BN_AFFINE_ROLES = ("bn_scale", "bn_bias")
BN_STAT_ROLES = ("bn_mean", "bn_var")


@dataclasses.dataclass(frozen=True)
class Slice:
    """One tensor of a group: the variable at ``path``, channels on ``axis``.

    Channel ``i``'s ``r``-th copy sits at position ``offset + i * stride + r * period`` of the
    axis: the defaults are the whole axis; a concatenation gives an offset, a flattened
    feature map ``repeats`` copies (NHWC flatten: ``period`` = channels per position; NCHW:
    ``stride`` = positions per channel).
    """

    path: Path
    axis: int
    role: str
    offset: int = 0
    stride: int = 1
    repeats: int = 1
    period: int = 0

    @property
    def whole(self) -> bool:
        """Whether the group's channels are the tensor's whole axis, in order (size permitting)."""
        return (self.offset, self.stride, self.repeats) == (0, 1, 1)

    def positions(self, size: int) -> np.ndarray:
        """``(repeats, size)`` positions along the axis of each channel's copies."""
        return (self.offset + np.arange(size)[None, :] * self.stride
                + np.arange(self.repeats)[:, None] * self.period)


@dataclasses.dataclass(frozen=True)
class Group:
    """A prunable channel group: its name, size ``C_k`` and the slices it owns."""

    name: str
    size: int
    slices: tuple[Slice, ...]


def dim_value(d: Dim, widths: Sequence[Any]) -> Any:
    """The size of ``d`` given the group widths (ints, or traced scalars)."""
    if isinstance(d, GroupRef):
        return widths[d.index]
    if isinstance(d, DimSum):
        return sum(c * dim_value(t, widths) for t, c in d.terms)
    return d



def _has_group(d: Dim) -> bool:
    return isinstance(d, GroupRef) or (isinstance(d, DimSum) and any(
        isinstance(t, GroupRef) for t, _ in d.terms))


def is_prunable(layer: Layer) -> bool:
    """Whether any channel dimension of ``layer`` belongs to a group."""
    dims = ((layer.ch,) if isinstance(layer, (NormLayer, ScaleLayer, ProductLayer))
            else (layer.in_ch, layer.out_ch))
    return any(_has_group(d) for d in dims)


@dataclasses.dataclass(frozen=True)
class Structure:
    """The declarative description of one model at one input size.

    Attributes:
      group_names: name of each of the K groups (traced: the path of the layer producing it).
      widths: ``C_k`` of each group in the described model.
      layers: every conv, norm and linear layer, in forward order.
      input_hw: the input's spatial size (H, W).
      in_channels: the input's channel count.
      slices: each group's slices, given explicitly (a traced model); ``None`` derives them
        from the layers (a description built with :class:`StructureBuilder`).
    """

    group_names: tuple[str, ...]
    widths: tuple[int, ...]
    layers: tuple[Layer, ...]
    input_hw: tuple[int, int]
    in_channels: int
    slices: tuple[tuple[Slice, ...], ...] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    @functools.cached_property
    def groups(self) -> tuple[Group, ...]:
        """Each group with every parameter slice it owns (derived from the layers unless given)."""
        if self.slices is not None:
            return tuple(Group(n, w, tuple(s)) for n, w, s in
                         zip(self.group_names, self.widths, self.slices))
        slices: list[list[Slice]] = [[] for _ in self.widths]

        def add(d: Dim, path: Path, axis: int, role: str) -> None:
            if isinstance(d, GroupRef):
                slices[d.index].append(Slice(path, axis, role))

        for layer in self.layers:
            if isinstance(layer, NormLayer):
                for name in layer.names:
                    add(layer.ch, layer.path + (name,), 0, "bn_" + name)
                continue
            if isinstance(layer, ScaleLayer):
                add(layer.ch, layer.path, 0, "channel")
                continue
            if isinstance(layer, ProductLayer):
                continue
            kernel = layer.path + ("kernel",)
            if isinstance(layer, ConvLayer) and layer.depthwise:
                add(layer.out_ch, kernel, -1, "depthwise")
            else:
                add(layer.out_ch, kernel, -1, "out")
                add(layer.in_ch, kernel, -2, "in")
            if layer.bias:
                add(layer.out_ch, layer.path + ("bias",), 0, "bias")
        return tuple(Group(n, w, tuple(s)) for n, w, s in
                     zip(self.group_names, self.widths, slices))

    def param_shapes(self, widths: Sequence[int] | None = None) -> dict[Path, tuple[int, ...]]:
        """Shape of every trainable parameter and BN statistic the layers own."""
        widths = self.widths if widths is None else widths
        shapes: dict[Path, tuple[int, ...]] = {}
        for layer in self.layers:
            if isinstance(layer, NormLayer):
                c = dim_value(layer.ch, widths)
                for name in layer.names:
                    shapes[layer.path + (name,)] = (c,)
                continue
            if isinstance(layer, ScaleLayer):
                shapes[layer.path] = (dim_value(layer.ch, widths),)
                continue
            if isinstance(layer, ProductLayer):
                continue
            cin, cout = dim_value(layer.in_ch, widths), dim_value(layer.out_ch, widths)
            if isinstance(layer, ConvLayer):
                per_group_in = 1 if layer.depthwise else cin // layer.groups  # ints here
                shapes[layer.path + ("kernel",)] = (*layer.kernel, per_group_in, cout)
            else:
                shapes[layer.path + ("kernel",)] = (cin, cout)
            if layer.bias:
                shapes[layer.path + ("bias",)] = (cout,)
        return shapes


class StructureBuilder:
    """Collects layers and groups while a model describes itself."""

    def __init__(self, input_hw: tuple[int, int], in_channels: int):
        self._names: list[str] = []
        self._widths: list[int] = []
        self._layers: list[Layer] = []
        self._input_hw = input_hw
        self._in_channels = in_channels

    def group(self, path: Sequence[Any], width: int) -> GroupRef:
        self._names.append(".".join(as_path(path)))
        self._widths.append(int(width))
        return GroupRef(len(self._widths) - 1)

    def conv(self, path: Sequence[Any], in_ch: Dim, out_ch: Dim, kernel: int,
             out_hw: tuple[int, int], stride: int = 1, *, depthwise: bool = False,
             bias: bool = False) -> None:
        self._layers.append(ConvLayer(as_path(path), in_ch, out_ch, (kernel, kernel), tuple(out_hw),
                                      stride, depthwise, bias))

    def norm(self, path: Sequence[Any], ch: Dim) -> None:
        self._layers.append(NormLayer(as_path(path), ch))

    def dense(self, path: Sequence[Any], in_ch: Dim, out_ch: Dim, *, bias: bool = True) -> None:
        self._layers.append(DenseLayer(as_path(path), in_ch, out_ch, bias))

    def build(self) -> Structure:
        return Structure(tuple(self._names), tuple(self._widths), tuple(self._layers),
                         tuple(self._input_hw), self._in_channels)


# --------------------------------------------------------------------------
# Architecture vectors
# --------------------------------------------------------------------------

def check_arch(arch: Arch, widths: Sequence[int], names: Sequence[str] | None = None,
               *, what: str = "architecture vector") -> None:
    """Raise a clear ``ValueError`` unless ``arch`` has one (C_k,) vector per group.

    Works on traced arrays too (it only reads static shapes).
    """
    if arch is None or isinstance(arch, (str, bytes)) or not hasattr(arch, "__len__"):
        raise ValueError(f"{what} must be a sequence of {len(widths)} vectors, one per "
                         f"channel group; got {type(arch).__name__}.")
    if len(arch) != len(widths):
        raise ValueError(
            f"{what} has {len(arch)} vectors but the model has {len(widths)} channel groups "
            f"(sizes {list(widths)}). Pass exactly one vector per group, in group order "
            f"(see `python -m sap_jax.info --model=...`).")
    for k, (v, c) in enumerate(zip(arch, widths)):
        shape = tuple(np.shape(v))
        if shape != (c,):
            name = f" ({names[k]})" if names else ""
            raise ValueError(
                f"{what}[{k}]{name} has shape {shape}; group {k} has {c} channels, so it "
                f"must have shape ({c},).")
        dtype = np.dtype(v.dtype) if hasattr(v, "dtype") else np.asarray(v).dtype
        if not (dtype == bool  # noqa: E721 - a numpy dtype equals bool; `is` would never match
                or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            name = f" ({names[k]})" if names else ""
            raise ValueError(f"{what}[{k}]{name} has dtype {dtype}; use bool, integer or real "
                             "floating values (1 = keep, 0 = drop).")


def check_binary(arch: Arch, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Return ``arch`` as boolean NumPy vectors, or raise if any entry is not 0/1."""
    out = []
    for k, v in enumerate(arch):
        a = np.asarray(v)
        if a.dtype == bool:
            out.append(a)
            continue
        bad = ~((a == 0) | (a == 1))
        if bad.any():
            name = f" ({names[k]})" if names else ""
            first = a[bad].ravel()[0].item()
            raise ValueError(
                f"architecture vector {k}{name} is not binary: it holds {first!r} (and "
                f"{int(bad.sum())} non-0/1 entries in all). Extraction needs hard keep/drop "
                f"decisions: threshold a soft vector first, e.g. `v > 0.5`, or use the "
                f"AGN's deterministic output.")
        out.append(a.astype(bool))
    return out


def ensure_min_kept(arch: Arch, scores: Sequence[Any] | None = None,
                    names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Apply the minimum-width rule: every group keeps >= ``MIN_KEPT`` channels.

    Args:
      arch: K binary vectors.
      scores: optional K vectors of channel importance (e.g. weight norms); a
        group with too few kept channels gains its highest-scoring dropped
        channels. Without scores the lowest channel indices are used.
      names: group names for the log message.

    Returns:
      K boolean vectors, equal to ``arch`` wherever the rule already held.
    """
    out = []
    for k, v in enumerate(check_binary(arch, names)):
        v = v.copy()
        missing = MIN_KEPT - int(v.sum())
        if missing > 0:
            s = np.zeros(v.shape) if scores is None else np.asarray(scores[k], dtype=np.float64)
            order = np.argsort(-s, kind="stable")
            add = [int(i) for i in order if not v[i]][:missing]
            v[add] = True
            name = names[k] if names else str(k)
            logging.warning("group %s kept no channel; keeping channel(s) %s (minimum width %d).",
                            name, add, MIN_KEPT)
        out.append(v)
    return out


def full_arch(widths: Sequence[int]) -> list[np.ndarray]:
    """The all-ones architecture (the dense model)."""
    return [np.ones((c,), np.float32) for c in widths]
