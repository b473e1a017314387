"""Norm-based channel selection: the classic baselines SAP is compared with.

* Group lasso on every channel, then a cut by group norms to a MAC budget
  (``channel_norms(kind="group_l2")`` + ``arch_by_norm(p=...)``).
* L1-norm filter pruning (Li et al., 2017): keep, in each group, the channels
  whose producing filters have the largest L1 norm, to given widths
  (``channel_norms(kind="l1")`` + ``arch_by_norm(widths=...)``).

Both read the same channel-group description as the penalty and the surgery.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sap_jax import flops
from sap_jax import groups as G
from sap_jax.codec import path_str

NORMS = ("group_l2", "l1")


def channel_norms(params: Any, structure: G.Structure, kind: str = "group_l2") -> list[np.ndarray]:
    """One importance score per channel, as K vectors of shape (C_k,).

    ``group_l2``: the sum over the group's kernel tensors of each channel
    slice's L2 norm (the quantity a group lasso shrinks). ``l1``: the L1 norm
    of the channel's producing filters (the conv output slices).
    """
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}.")
    flat = {path_str(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = [np.zeros(c) for c in structure.widths]
    for k, g in enumerate(structure.groups):
        for sl in g.slices:
            if sl.role not in (("out",) if kind == "l1" else G.KERNEL_ROLES):
                continue
            t = flat.get(tuple(map(str, sl.path)))
            if t is None:
                raise ValueError(f"params lack {'/'.join(map(str, sl.path))}, which group {k} owns.")
            t = np.moveaxis(t, sl.axis, 0).reshape(t.shape[sl.axis], -1)
            out[k] += np.abs(t).sum(1) if kind == "l1" else np.sqrt(np.square(t).sum(1))
    return out


def arch_by_norm(norms: Sequence[np.ndarray], structure: G.Structure, *,
                 widths: Sequence[int] | None = None, p: float | None = None,
                 scope: str = "prunable", start: Sequence[Any] | None = None) -> list[np.ndarray]:
    """Keep the highest-norm channels: per group to ``widths``, or globally to a MAC budget.

    With ``p``, channels are dropped in increasing order of norm (across all
    groups) while the MAC ratio over ``scope`` exceeds ``p``; a group never
    drops below one channel. ``start`` (0/1 vectors; default: keep all) is the
    architecture to trim: only its kept channels are candidates, so an
    architecture already within ``p`` comes back unchanged. Returns K float32
    0/1 vectors.
    """
    if (widths is None) == (p is None):
        raise ValueError("give exactly one of widths (per-group kept counts) or p (a MAC budget).")
    sizes = list(structure.widths)
    if len(norms) != len(sizes) or any(np.shape(n) != (c,) for n, c in zip(norms, sizes)):
        raise ValueError(f"norms must be {len(sizes)} vectors of sizes {sizes}.")
    if widths is not None:
        widths = [int(w) for w in widths]
        if len(widths) != len(sizes) or any(not G.MIN_KEPT <= w <= c for w, c in zip(widths, sizes)):
            raise ValueError(f"widths {widths} must give one count in [1, C_k] per group; "
                             f"the groups have {sizes} channels.")
        out = []
        for n, w in zip(norms, widths):
            v = np.zeros(len(n), np.float32)
            v[np.argsort(-np.asarray(n), kind="stable")[:w]] = 1.0
            out.append(v)
        return out
    if not 0 < p <= 1:
        raise ValueError(f"budget p = {p} must lie in (0, 1].")
    full = flops.count(structure)
    ratio = lambda ws: widths_ratio(structure, ws, scope, full=full)  # noqa: E731

    if start is None:
        keep = [np.ones(c, np.float32) for c in sizes]
    else:
        keep = [np.asarray(v, np.float32).copy() for v in start]
        if len(keep) != len(sizes) or any(v.shape != (c,) for v, c in zip(keep, sizes)):
            raise ValueError(f"start must be {len(sizes)} 0/1 vectors of sizes {sizes}.")
    kept = [int(v.sum()) for v in keep]
    order = sorted((float(x), k, i) for k, n in enumerate(norms) for i, x in enumerate(n)
                   if keep[k][i] == 1)
    for _, k, i in order:
        if ratio(kept) <= p:
            break
        if kept[k] > G.MIN_KEPT:
            keep[k][i] = 0.0
            kept[k] -= 1
    return keep


def widths_ratio(structure: G.Structure, widths: Sequence[int], scope: str = "prunable", *,
                 full: flops.Counts | None = None) -> float:
    """MACs of the model at ``widths`` over the dense model's, on ``scope`` ("prunable" or "total").

    ``full``: the dense model's counts, if already known (callers that loop pass it once)."""
    full = flops.count(structure) if full is None else full
    c = flops.count(structure, list(widths))
    return (c.prunable_macs / full.prunable_macs if scope == "prunable" else c.macs / full.macs)


def uniform_widths(structure: G.Structure, p: float, scope: str = "prunable") -> list[int]:
    """The widest uniform keep fraction (the same in every group) whose MAC ratio is <= ``p``."""
    if not 0 < p <= 1:
        raise ValueError(f"budget p = {p} must lie in (0, 1].")
    sizes, full = list(structure.widths), flops.count(structure)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        ws = [max(G.MIN_KEPT, int(c * mid)) for c in sizes]
        lo, hi = (mid, hi) if widths_ratio(structure, ws, scope, full=full) <= p else (lo, mid)
    return [max(G.MIN_KEPT, int(c * lo)) for c in sizes]


def round_widths(structure: G.Structure, widths: Sequence[int], multiple: int, p: float,
                 scope: str = "prunable", warn: bool = True) -> list[int]:
    """Round kept widths to multiples of ``multiple`` (hardware-friendly) within the budget ``p``.

    Each width goes to the nearest multiple (at least ``multiple``, at most the
    group's size, which is kept even when it is not a multiple). While the MAC
    ratio exceeds ``p``, the group whose step down saves the most MACs loses one
    multiple.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple = {multiple!r} must be a positive integer.")
    sizes = list(structure.widths)
    if len(widths) != len(sizes):
        raise ValueError(f"widths has {len(widths)} entries; the model has {len(sizes)} groups.")
    out = [c if w >= c else min(c, max(multiple, int(round(w / multiple)) * multiple))
           for w, c in zip(widths, sizes)]
    full = flops.count(structure)
    while (now := widths_ratio(structure, out, scope, full=full)) > p:
        best, saved = None, 0.0
        for k, w in enumerate(out):
            down = (w - 1) // multiple * multiple if w % multiple else w - multiple
            if down < max(G.MIN_KEPT, min(multiple, sizes[k])):
                continue
            trial = out[:k] + [down] + out[k + 1:]
            gain = now - widths_ratio(structure, trial, scope, full=full)
            if gain > saved:
                best, saved = (k, down), gain
        if best is None:  # every group is at its smallest multiple
            if warn:
                logging.getLogger(__name__).warning(
                    "widths rounded to multiples of %d cannot meet the budget p = %s (ratio %.3f)",
                    multiple, p, now)
            break
        out[best[0]] = best[1]
    return out


# Kept-width multiple of sap.round_to = 0 ("auto") per JAX backend: tensor-core tiles on GPUs,
# the 128-wide MXU/lanes on TPUs; none on CPUs, where rounding measured within noise (benchmarks.md).
HARDWARE_MULTIPLE = {"gpu": 8, "cuda": 8, "rocm": 8, "tpu": 128}


def auto_round_widths(structure: G.Structure, widths: Sequence[int], p: float, backend: str,
                      scope: str = "prunable") -> tuple[int, list[int]]:
    """``(multiple, widths)`` for ``sap.round_to = 0``: the backend's multiple, or, where widths
    rounded to it cannot meet ``p`` (a 16-wide ResNet-56 stage and 128), the largest of its
    halves that can. ``multiple`` is 1 (widths unchanged) on CPUs or when none can."""
    multiple = HARDWARE_MULTIPLE.get(backend, 1)
    while multiple > 1:
        out = round_widths(structure, widths, multiple, p, scope=scope, warn=False)
        if widths_ratio(structure, out, scope) <= p:
            return multiple, out
        multiple //= 2
    return 1, list(widths)


def resize_arch(arch: Sequence[Any], widths: Sequence[int], norms: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Change each group's kept count to ``widths``: drop the lowest-norm kept channels, or add
    the highest-norm dropped ones. Channels that stay keep their keep/drop decision."""
    out = []
    for v, w, n in zip(arch, widths, norms):
        v = np.asarray(v, np.float32).copy()
        n = np.asarray(n, np.float64)
        k = int(v.sum())
        if w < k:
            kept = np.flatnonzero(v == 1)
            v[kept[np.argsort(n[kept], kind="stable")[:k - w]]] = 0.0
        elif w > k:
            dropped = np.flatnonzero(v == 0)
            v[dropped[np.argsort(-n[dropped], kind="stable")[:w - k]]] = 1.0
        out.append(v)
    return out
