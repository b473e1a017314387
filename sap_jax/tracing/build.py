"""From an analysis to a :class:`~sap_jax.structure.groups.Structure`.

Every space a layer produces becomes one channel group unless it is fixed, ignored, or (with
``prune="inner"``) coupled; each parameter use recorded on it becomes a
:class:`~sap_jax.structure.groups.Slice`, and every layer seen is listed with its dimensions
for the MAC count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from sap_jax.structure import groups as G
from sap_jax.structure.slicing import NORM_TYPES
from sap_jax.tracing.analysis import Analysis, Record
from sap_jax.tracing.labels import TraceError

_NORM_ROLES = {"scale": "bn_scale", "bias": "bn_bias", "mean": "bn_mean", "var": "bn_var"}


def _fit_positions(pos: np.ndarray, ch: np.ndarray, size: int
                   ) -> tuple[int, int, int, int] | None:
    """``(offset, stride, repeats, period)`` with position = offset + i*stride + r*period of
    channel i's r-th copy, or None when the channels do not sit on such a grid."""
    counts = np.bincount(ch, minlength=size)
    if counts.size != size or counts.min() != counts.max() or counts.min() == 0:
        return None
    reps = int(counts[0])
    grid = np.stack([np.sort(pos[ch == i]) for i in range(size)], axis=1)  # (reps, size)
    offset = int(grid[0, 0])
    stride = int(grid[0, 1] - grid[0, 0]) if size > 1 else 1
    period = int(grid[1, 0] - grid[0, 0]) if reps > 1 else 0
    want = offset + np.arange(size)[None, :] * stride + np.arange(reps)[:, None] * period
    return (offset, stride, reps, period) if np.array_equal(grid, want) else None


def _is_norm(mod: Any) -> bool:
    """An NNX normalisation layer, or a Linen one's variables (a Linen model through
    ``nnx.bridge`` is dicts of arrays): running statistics beside at most a scale and bias."""
    if isinstance(mod, NORM_TYPES):
        return True
    return isinstance(mod, Mapping) and {"mean", "var"} <= set(mod) <= set(_NORM_ROLES)


def _is_layer(mod: Any) -> bool:
    """An NNX conv or linear layer, or a Linen one's variables (a kernel)."""
    return isinstance(mod, (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral)) or (
        isinstance(mod, Mapping) and "kernel" in mod)


def _role(kind: str, path: G.Path, module_of: Callable[[G.Path], Any]) -> str:
    if kind != "param":
        return kind
    mod = module_of(path[:-1])
    if _is_norm(mod):
        return _NORM_ROLES.get(path[-1], "channel")
    if _is_layer(mod) and path[-1] == "bias":
        return "bias"
    return "channel"


def module_getter(model: nnx.Module) -> Callable[[G.Path], Any]:
    """``get(path)``: the module (or variable) of ``model`` at ``path``, None where none is."""
    def get(path: G.Path) -> Any:
        node = model
        for k in path:
            try:
                if isinstance(node, Mapping):  # a Linen model's variables (nnx.bridge)
                    node = node[k]
                else:
                    node = getattr(node, k) if isinstance(k, str) and hasattr(node, k) \
                        else node[int(k)]
            except (TypeError, ValueError, IndexError, KeyError, AttributeError):
                return None
        return node
    return get


def _tie_shared(an: Analysis) -> None:
    """One tensor axis is one set of channels: a module called twice (weight sharing) ties the
    spaces its calls read or write, channel by channel; parameters whose entries a reduction
    mixed along that axis (weight standardisation) fix them."""
    by_axis: dict[tuple[G.Path, int], list[Record]] = {}
    for r in an.records:
        by_axis.setdefault((r.path, r.axis), []).append(r)
    for key, recs in by_axis.items():
        if key in an.mixed_axes:
            for r in recs:
                an.fix_ids(r.sid, f"its parameter {'/'.join(key[0])} is normalised across "
                                  "channels (e.g. weight standardisation)")
            continue
        first = recs[0]
        for r in recs[1:]:
            if len(r.sid) != len(first.sid) or not np.array_equal(r.cidx, first.cidx):
                an.fix_ids(np.concatenate([first.sid, r.sid]),
                           f"{'/'.join(key[0])} is used twice with different channel layouts")
                continue
            for a, b in zip(first.sid, r.sid):
                if a >= 0 and b >= 0:
                    an.union(int(a), int(b), coupled=False)


def build(an: Analysis, module_of, *, prune: str, ignore: Sequence[str], input_hw, in_channels,
          prefix: G.Path = ()) -> tuple[G.Structure, dict[str, str]]:
    """The groups and layers of ``an`` and ``{layer: "prunable" or why not}`` (see
    :func:`sap_jax.tracing.trace`); ``module_of`` maps a path to the model's module there."""
    _tie_shared(an)
    find = np.vectorize(lambda s: an.find(int(s)) if s >= 0 else -1, otypes=[int])
    rec_roots = [find(r.sid) for r in an.records]
    producers: dict[int, list[int]] = {}
    for i, r in enumerate(an.records):
        if r.kind == "out":
            producers.setdefault(int(rec_roots[i][0]), []).append(i)
    layer_names = {".".join(r.path[:-1] or r.path) for r in an.records if r.kind == "out"}
    for name in ignore:
        if name.replace("/", ".") not in layer_names:
            raise TraceError(f"ignore names {name!r}, which is not a convolution or linear "
                             f"layer of the model; layers: {', '.join(sorted(layer_names))}.")
    ignored = {n.replace("/", ".") for n in ignore}
    status: dict[str, str] = {}
    chosen: list[tuple[int, list[G.Slice]]] = []
    for root, recs in producers.items():
        name = ".".join(an.records[recs[0]].path[:-1] or an.records[recs[0]].path)
        if root in an.fixed or name in ignored:
            status[name] = an.fixed.get(root, "ignored")
            continue
        if root in an.coupled and prune != "all":
            status[name] = "coupled (a residual stream); prunable with prune='all'"
            continue
        slices, size = [], an.size[root]
        for r, roots in zip(an.records, rec_roots):
            mask = roots == root
            if not mask.any():
                continue
            fit = _fit_positions(np.flatnonzero(mask), r.cidx[mask], size)
            if fit is None:
                slices = None
                status[name] = f"its channels are laid out irregularly in {'/'.join(r.path)}"
                break
            axis = r.axis - r.ndim if r.ndim > 1 else 0
            offset, stride, reps, period = fit
            sl = G.Slice(prefix + r.path, axis, _role(r.kind, r.path, module_of), offset, stride,
                         reps, period)
            if sl not in slices:
                slices.append(sl)
        if slices is not None:
            chosen.append((root, slices))
            status[name] = "prunable"
    group_of = {root: k for k, (root, _) in enumerate(chosen)}

    def dim(lab) -> G.Dim:
        if isinstance(lab, int):
            return lab
        roots = find(lab[0])
        terms, fixed = {}, 0
        for r in roots:
            if int(r) in group_of:
                terms[int(r)] = terms.get(int(r), 0) + 1
            else:
                fixed += 1
        parts = [(G.GroupRef(group_of[r]), n // an.size[r]) for r, n in terms.items()]
        if not parts:
            return fixed
        if fixed == 0 and len(parts) == 1 and parts[0][1] == 1:
            return parts[0][0]
        return G.DimSum(tuple(parts) + (((fixed, 1),) if fixed else ()))

    layers: list[G.Layer] = []
    for lr in an.layers:
        path = prefix + lr.path
        bias = module_of(lr.path + ("bias",)) is not None and not _is_norm(module_of(lr.path))
        if lr.kind == "conv":
            pad, in_hw = lr.padding or (None, None)
            layers.append(G.ConvLayer(path, dim(lr.ins), dim(lr.out), lr.kernel, lr.out_hw,
                                      lr.stride, lr.depthwise, bias,
                                      1 if lr.depthwise else lr.groups, pad, in_hw,
                                      lr.dilation, lr.lhs_dilation))
        elif lr.kind == "dense":
            layers.append(G.DenseLayer(path, dim(lr.ins), dim(lr.out), bias, lr.tokens))
        elif lr.kind == "product":
            layers.append(G.ProductLayer(path, dim(lr.out), lr.tokens))
    seen = {lr.path for lr in an.layers}
    for r in an.records:
        if r.kind != "param" or r.path[:-1] in seen and not _is_norm(module_of(r.path[:-1])):
            continue
        mod = module_of(r.path[:-1])
        if _is_norm(mod):
            if r.path[:-1] in seen:
                continue
            seen.add(r.path[:-1])
            names = tuple(n for n in ("scale", "bias", "mean", "var")
                          if module_of(r.path[:-1] + (n,)) is not None)
            layers.append(G.NormLayer(prefix + r.path[:-1], dim((r.sid, r.cidx)), names))
        elif r.path not in seen:
            seen.add(r.path)
            layers.append(G.ScaleLayer(prefix + r.path, dim((r.sid, r.cidx))))
    s = G.Structure(tuple(an.name[r] for r, _ in chosen), tuple(an.size[r] for r, _ in chosen),
                    tuple(layers), tuple(input_hw), int(in_channels),
                    tuple(tuple(sl) for _, sl in chosen))
    return s, status
