"""Per-channel norms, defined once from the channel groups.

The penalty (``group_l2`` of the dropped channels), the alignment metrics, the norm baselines,
trimming to the budget at the cut and surgery's minimum-width rule all read a channel's norm
through :func:`channel_norms` (or, for the penalty's sums, :func:`slice_norms`). Which tensors
count comes from the model's :class:`~sap_jax.structure.groups.Structure`: a slice
``t[..., i, ...]`` on its group's axis is channel ``i``'s part of tensor ``t``.

Kinds:

* ``group_l2``: the sum, over the group's kernel slices (producing and consuming convs,
  depthwise kernels, conv biases; with ``include_bn`` also BN scale and bias), of each slice's
  L2 norm. The quantity the (partial) group lasso shrinks.
* ``l1``: the L1 norm of the channel's producing filters (Li et al., 2017).
* ``producer_l2``: the L2 norm of all of the channel's producing weights together (producing
  and depthwise kernels), the minimum-width rule's score.

``xp=np`` computes on the host in float64 (choices: baselines, the cut); ``xp=jnp`` in float32,
traceable and differentiable (the penalty, inside jit).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sap_jax.structure import groups as G
from sap_jax.structure.codec import path_str

BN_ROLES = ("bn_scale", "bn_bias")
#: The slice roles each kind reads (group_l2 adds BN_ROLES with include_bn).
KINDS = {"group_l2": G.KERNEL_ROLES, "l1": ("out",), "producer_l2": ("out", "depthwise")}


@functools.lru_cache(maxsize=64)
def owned_slices(structure: G.Structure, roles: tuple[str, ...]
                 ) -> dict[G.Path, tuple[tuple[int, G.Slice], ...]]:
    """``{param path: ((group k, slice), ...)}`` of every tensor slice with one of ``roles``, in
    the order the tensors first appear in the groups."""
    out: dict[G.Path, list[tuple[int, G.Slice]]] = {}
    for k, g in enumerate(structure.groups):
        for sl in g.slices:
            if sl.role in roles:
                out.setdefault(sl.path, []).append((k, sl))
    return {p: tuple(v) for p, v in out.items()}


def channel_view(t: Any, sl: G.Slice, size: int, xp=jnp) -> Any:
    """``t``'s entries of each of the group's ``size`` channels, as a ``(size, rest)`` matrix.

    A whole-axis slice is a transpose; a slice of a concatenation or of a flattened feature
    map gathers its (static) positions, every copy of channel ``i`` in row ``i``.
    """
    t = xp.moveaxis(t, sl.axis, 0)
    if not (sl.whole and t.shape[0] == size):
        t = t[sl.positions(size).T.ravel()]
    return t.reshape(size, -1)


def roles_of(kind: str, include_bn: bool = False) -> tuple[str, ...]:
    if kind not in KINDS:
        raise ValueError(f"unknown channel norm {kind!r}; use one of {tuple(KINDS)}.")
    return KINDS[kind] + (BN_ROLES if include_bn and kind == "group_l2" else ())


def owned_tensors(params: Any, structure: G.Structure, roles: tuple[str, ...]) -> dict[G.Path, Any]:
    """The tensors of ``params`` (any pytree keyed like the model) that slices with ``roles``
    read, by path; a clear error if ``params`` lacks one."""
    found = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    need = owned_slices(structure, roles)
    missing = [p for p in need if p not in found]
    if missing:
        raise ValueError(
            f"params lack {len(missing)} tensor(s) the channel groups own, e.g. "
            f"{'/'.join(missing[0])}. Pass the parameters of the model the structure was "
            f"built from (e.g. nnx.state(model, nnx.Param)).")
    return {p: found[p] for p in need}


def l2_along(t: Any, axis: int, xp=jnp) -> Any:
    """L2 norm of every slice of ``t`` along ``axis``; with jnp its gradient is 0 (not NaN) at
    a zero slice."""
    t = xp.asarray(t, xp.float32 if xp is jnp else xp.float64)
    axis = axis % t.ndim
    sq = xp.sum(xp.square(t), axis=tuple(a for a in range(t.ndim) if a != axis))
    positive = sq > 0
    return xp.where(positive, xp.sqrt(xp.where(positive, sq, 1.0)), 0.0)


def _measure(t: Any, sl: G.Slice, size: int, kind: str, xp) -> Any:
    if kind == "group_l2" and sl.whole and np.shape(t)[sl.axis] == size:
        return l2_along(t, sl.axis, xp)  # no transpose on the penalty's hot path
    t = channel_view(xp.asarray(t, xp.float32 if xp is jnp else xp.float64), sl, size, xp)
    if kind == "group_l2":
        return l2_along(t, 0, xp)
    return xp.abs(t).sum(1) if kind == "l1" else xp.square(t).sum(1)  # producer_l2: squares


def slice_norms(params: Any, structure: G.Structure, kind: str = "group_l2", *,
                include_bn: bool = False, xp=jnp) -> Iterator[tuple[int, Any]]:
    """``(k, per-channel measure of one tensor slice)`` for every slice ``kind`` reads."""
    roles = roles_of(kind, include_bn)
    owned = owned_slices(structure, roles)
    for path, t in owned_tensors(params, structure, roles).items():
        for k, sl in owned[path]:
            yield k, _measure(t, sl, structure.widths[k], kind, xp)


def channel_norms(params: Any, structure: G.Structure, kind: str = "group_l2", *,
                  include_bn: bool = False, xp=np) -> list[Any]:
    """One norm per channel of every group (K vectors of shape (C_k,)); see the module doc."""
    dtype = xp.float32 if xp is jnp else xp.float64
    out = [xp.zeros((c,), dtype) for c in structure.widths]
    for k, n in slice_norms(params, structure, kind, include_bn=include_bn, xp=xp):
        out[k] = out[k] + n
    return [xp.sqrt(o) for o in out] if kind == "producer_l2" else out
