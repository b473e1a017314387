"""Norm-based channel selection: the classic baselines SAP is compared with.

* Group lasso on every channel, then a cut by group norms to a MAC budget
  (``norms.channel_norms(kind="group_l2")`` + ``arch_by_norm(p=...)``).
* L1-norm filter pruning (Li et al., 2017): keep, in each group, the channels
  whose producing filters have the largest L1 norm, to given widths
  (``norms.channel_norms(kind="l1")`` + ``arch_by_norm(widths=...)``).

Both read the same channel-group description as the penalty and the surgery. The cut's own
arithmetic (trimming to p, rounding widths) lives in :mod:`sap_jax.method.cut`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sap_jax.method.cut import trim_to_budget, widths_ratio
from sap_jax.structure import flops
from sap_jax.structure import groups as G

#: The channel scores (:func:`sap_jax.structure.norms.channel_norms` kinds) a baseline may
#: choose by (sap.norm): ``group_l2``, the sum over the group's kernel tensors of each channel
#: slice's L2 norm (what a group lasso shrinks); ``l1``, the L1 norm of its producing filters.
NORMS = ("group_l2", "l1")


def arch_by_norm(norms: Sequence[np.ndarray], structure: G.Structure, *,
                 widths: Sequence[int] | None = None, p: float | None = None,
                 scope: str = "prunable", start: Sequence[Any] | None = None,
                 table: Any = None) -> list[np.ndarray]:
    """Keep the highest-norm channels: per group to ``widths``, or globally to a budget.

    With ``p``, channels are dropped in increasing order of norm (across all
    groups) while the MAC ratio (with a latency ``table``, the estimated latency
    ratio) over ``scope`` exceeds ``p``; a group never
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
        if (len(widths) != len(sizes)
                or any(not G.MIN_KEPT <= w <= c for w, c in zip(widths, sizes))):
            raise ValueError(f"widths {widths} must give one count in [1, C_k] per group; "
                             f"the groups have {sizes} channels.")
        out = []
        for n, w in zip(norms, widths):
            v = np.zeros(len(n), np.float32)
            v[np.argsort(-np.asarray(n), kind="stable")[:w]] = 1.0
            out.append(v)
        return out
    return trim_to_budget(norms, structure, p, scope=scope, start=start, table=table)


def uniform_widths(structure: G.Structure, p: float, scope: str = "prunable", *,
                   fill: bool = False) -> list[int]:
    """The widest uniform keep fraction (the same in every group) whose MAC ratio is <= ``p``.

    Rounded down per group, that can land well under ``p`` on small models (ResNet-20 at
    p = 0.3: 0.275). ``fill`` then adds channels one at a time, to the group furthest below
    its share (lowest kept fraction first), while the ratio stays <= ``p``: as uniform as
    the widths can be at the budget, for a comparison at equal MACs."""
    return _at_budget(structure, p, scope, [1.0] * structure.num_groups, fill)


def random_widths(structure: G.Structure, p: float, seed: int, scope: str = "prunable",
                  low: float = 0.25) -> list[int]:
    """Random per-group widths at the budget: each group's keep fraction is a common scale
    times its own draw from U(``low``, 1) (seeded), the scale the largest whose MAC ratio is
    <= ``p``; capped at the group's size, at least one channel; then filled channel by channel
    up to ``p`` in proportion to the draw (as :func:`uniform_widths` with ``fill``). A baseline
    that spends the budget as the generator does, but without looking at the data."""
    if not 0 < low <= 1:
        raise ValueError(f"low = {low} must lie in (0, 1].")
    draw = np.random.default_rng([seed, 29]).uniform(low, 1.0, structure.num_groups)
    return _at_budget(structure, p, scope, list(draw), fill=True)


def _at_budget(structure: G.Structure, p: float, scope: str, share: Sequence[float],
               fill: bool) -> list[int]:
    """Widths ``C_k * min(1, scale * share_k)`` (rounded down, at least one channel) at the
    largest scale whose MAC ratio over ``scope`` is <= ``p``; with ``fill``, then channels added
    one at a time, each to the group furthest below its share (lowest ``w_k / (C_k * share_k)``
    first), while the ratio stays <= ``p``."""
    if not 0 < p <= 1:
        raise ValueError(f"budget p = {p} must lie in (0, 1].")
    sizes, full = list(structure.widths), flops.count(structure)

    def at(scale: float) -> list[int]:
        return [min(c, max(G.MIN_KEPT, int(c * min(1.0, scale * u)))) for c, u in zip(sizes, share)]

    def fits(ws: list[int]) -> bool:
        return widths_ratio(structure, ws, scope, full=full) <= p

    lo, hi = 0.0, 1.0 / min(share)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(at(mid)) else (lo, mid)
    ws = at(lo)
    while fill:
        for k in sorted(range(len(ws)), key=lambda k: (ws[k] / (sizes[k] * share[k]), k)):
            more = ws[:k] + [ws[k] + 1] + ws[k + 1:]
            if ws[k] < sizes[k] and fits(more):
                ws = more
                break
        else:
            fill = False
    return ws
