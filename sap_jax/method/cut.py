"""The cut's arithmetic: from the architecture a search chose to the one that is cut.

:func:`final_arch` applies a :class:`CutPolicy` to a chosen architecture ``v`` (K 0/1
vectors): trim it to the budget p by channel norm if it is over p and the policy enforces
the budget, round kept widths to hardware-friendly multiples, and resize ``v`` to those
widths. Pure NumPy on host values; docs/method.md §4 ("The cut") says why each step exists.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sap_jax.structure import flops
from sap_jax.structure import groups as G

Arch = G.Arch  # K vectors of shape (C_k,), 1 = keep, 0 = drop


@dataclasses.dataclass(frozen=True)
class CutPolicy:
    """How a chosen architecture becomes the one that is cut.

    p: the budget, a fraction of the MACs over ``scope`` ("prunable" or "total"); with a
      latency ``table``, of the whole forward's estimated time (scope "total", the default then:
      layers timed one at a time do not add up to the model's time, so "prunable" is refused).
    enforce_budget: trim an architecture over p by channel norm (lowest first) until it meets p.
    round_to: kept-width multiple; 1 = none, 0 = automatic: with a latency ``table``, the
      widths where its latency steps up (:func:`table_steps`), else the backend's multiple
      (``HARDWARE_MULTIPLE``, :func:`auto_round_widths`).
    backend: the JAX backend, for ``round_to = 0`` without a table.
    table: a latency table: p bounds the estimated latency, not the MACs (``None``: MACs).
    """

    p: float
    scope: str | None = None  # None: "total" with a latency table, else "prunable"
    enforce_budget: bool = True
    round_to: int = 1
    backend: str = "cpu"
    table: Any = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 < self.p <= 1:
            raise ValueError(f"budget p = {self.p!r} must lie in (0, 1] (the fraction of the "
                             "dense model's MACs to keep, or of its estimated forward time with "
                             "a latency budget).")
        object.__setattr__(self, "scope", budget_scope(self.scope, self.table))
        if self.scope not in flops.SCOPES:
            raise ValueError(f"budget scope = {self.scope!r}; use one of {flops.SCOPES}.")
        if (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                or self.round_to < 0):
            raise ValueError(f"round_to = {self.round_to!r} must be an integer >= 0.")


@dataclasses.dataclass
class CutReport:
    """What :func:`final_arch` did."""

    chosen_ratio: float  # budget ratio (MACs or latency, over the policy's scope) of the one given
    trimmed_channels: int  # channels dropped to meet p (enforce_budget)
    kept: list[int]  # kept width per group after trimming, before rounding
    round_to: int  # the multiple applied (1 = none, 0 = a latency table's steps)
    widths: list[int]  # kept width per group of the result


def final_arch(structure: G.Structure, chosen: Arch, norms: Callable[[], Sequence[np.ndarray]],
               policy: CutPolicy) -> tuple[list[np.ndarray], CutReport]:
    """The architecture to cut, from ``chosen``, and what changed.

    ``norms()`` gives one score per channel (K vectors); it is called only when trimming or
    rounding needs it. The result is ``chosen`` itself (as float32 arrays) when nothing changes.
    """
    arch = [np.asarray(v, np.float32) for v in chosen]
    table = policy.table
    ratio = widths_ratio(structure, [int(np.sum(v)) for v in arch], policy.scope, table=table)
    scores = None
    if policy.enforce_budget and ratio > policy.p:
        scores = norms()
        arch = trim_to_budget(scores, structure, policy.p, scope=policy.scope, start=arch,
                              table=table)
    kept = [int(np.sum(v)) for v in arch]
    trimmed = sum(int(np.sum(v)) for v in chosen) - sum(kept)
    # Rounding stays within p, or within the chosen ratio when that is over p and kept so.
    budget = policy.p if policy.enforce_budget else max(policy.p, ratio)
    if policy.round_to == 0 and table is not None:
        multiple = 0  # the table's own steps
        widths = snap_widths(structure, kept, table_steps(structure, table, policy.backend),
                             budget, scope=policy.scope, table=table)
    elif policy.round_to == 0:
        multiple, widths = auto_round_widths(structure, kept, budget, policy.backend,
                                             scope=policy.scope)
    else:
        multiple = policy.round_to
        widths = (round_widths(structure, kept, multiple, budget, scope=policy.scope, table=table)
                  if multiple > 1 else kept)
    if widths != kept:
        arch = resize_arch(arch, widths, norms() if scores is None else scores)
    return arch, CutReport(ratio, trimmed, kept, multiple, list(widths))


def trim_to_budget(norms: Sequence[np.ndarray], structure: G.Structure, p: float, *,
                   scope: str = "prunable", start: Arch | None = None,
                   table: Any = None) -> list[np.ndarray]:
    """Drop channels in increasing order of norm (across all groups) while the MAC ratio (with
    a latency ``table``: the estimated latency ratio) over ``scope`` exceeds ``p``; a group never
    drops below one channel. ``start`` (default: keep all) is the architecture to trim: only its
    kept channels are candidates, so one already within ``p`` comes back unchanged. Returns K
    float32 0/1 vectors."""
    if not 0 < p <= 1:
        raise ValueError(f"budget p = {p} must lie in (0, 1].")
    sizes = list(structure.widths)
    if len(norms) != len(sizes) or any(np.shape(n) != (c,) for n, c in zip(norms, sizes)):
        raise ValueError(f"norms must be {len(sizes)} vectors of sizes {sizes}.")
    ratio = _ratio_fn(structure, scope, table)
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
                 full: flops.Counts | None = None, table: Any = None) -> float:
    """MACs of the model at ``widths`` over the dense model's, on ``scope`` ("prunable" or
    "total"); with a latency ``table``, its estimated latency over the dense model's instead.

    ``full``: the dense model's counts, if already known (callers that loop pass it once)."""
    if table is not None:
        return float(table.ratio(structure, list(widths), budget_scope(scope, table)))
    full = flops.count(structure) if full is None else full
    c = flops.count(structure, list(widths))
    return (c.prunable_macs / full.prunable_macs if scope == "prunable" else c.macs / full.macs)


def budget_scope(scope: str | None, table: Any) -> str | None:
    """The scope a budget is read over: ``scope``, or by default "total" with a latency
    ``table`` (the whole forward) and "prunable" without. With a table, "prunable" is refused:
    the prunable layers' times measured one at a time do not add up to the model's (on XLA:CPU
    a 3x3 conv cut to one output channel costs about what the dense one does), so a budget on
    their sum can cut far deeper than p says."""
    if scope is None:
        return "prunable" if table is None else "total"
    if table is not None and scope == "prunable":
        raise ValueError("a latency budget bounds the whole forward: scope must be \"total\" "
                         "with a latency table, got \"prunable\".")
    return scope


def _ratio_fn(structure: G.Structure, scope: str, table: Any) -> Callable[[Sequence[int]], float]:
    """``widths -> ratio`` under the budget's metric, with the dense counts computed once."""
    if table is not None:
        scope = budget_scope(scope, table)
        dense = table.estimate_ms(structure, list(structure.widths), scope)
        return lambda w: float(table.estimate_ms(structure, list(w), scope)) / dense
    full = flops.count(structure)
    return lambda w: widths_ratio(structure, w, scope, full=full)


def round_widths(structure: G.Structure, widths: Sequence[int], multiple: int, p: float,
                 scope: str = "prunable", warn: bool = True, table: Any = None,
                 deeper: bool = True) -> list[int]:
    """Round kept widths to multiples of ``multiple`` (hardware-friendly) within the budget ``p``.

    Each width goes to the nearest multiple (at least ``multiple``, at most the
    group's size, which is kept even when it is not a multiple). While the MAC
    ratio (or a latency ``table``'s) exceeds ``p``, the group whose step down saves the most
    per channel loses one multiple: first down to the multiple below its width, then, if p
    still requires and ``deeper``, further (see :func:`_descend`).
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple = {multiple!r} must be a positive integer.")
    sizes = list(structure.widths)
    if len(widths) != len(sizes):
        raise ValueError(f"widths has {len(widths)} entries; the model has {len(sizes)} groups.")
    out = [c if w >= c else min(c, max(multiple, int(round(w / multiple)) * multiple))
           for w, c in zip(widths, sizes)]
    grids = [sorted({*range(min(multiple, c), c, multiple), c}) for c in sizes]
    return _descend(structure, out, grids, p, _ratio_fn(structure, scope, table),
                    f"widths rounded to multiples of {multiple}" if warn else None,
                    start=widths, deeper=deeper)


def table_steps(structure: G.Structure, table: Any, backend: str) -> list[list[int]]:
    """The widths ``round_to = 0`` snaps to with a latency ``table``: its step widths, and below
    each group's first measured width the multiples (``HARDWARE_MULTIPLE``) of the table's
    device, else of ``backend`` (the run's); every width there for a device with none."""
    platform = (table.device or {}).get("platform") or backend
    return table.step_widths(structure, fill=HARDWARE_MULTIPLE.get(platform, 1))


def snap_widths(structure: G.Structure, widths: Sequence[int], grids: Sequence[Sequence[int]],
                p: float, scope: str = "prunable", table: Any = None) -> list[int]:
    """Move each kept width up to the nearest of its group's allowed ``grids`` widths (a latency
    table's steps: a width between two steps costs as much as the upper one), then, while the
    ratio exceeds ``p``, step down the group whose next lower allowed width saves the most per
    channel: first down to the allowed width below its own, then further if p requires (see
    :func:`_descend`)."""
    if len(grids) != len(widths):
        raise ValueError(f"grids has {len(grids)} entries; the model has {len(widths)} groups.")
    out = [min([g for g in grid if g >= w], default=max(grid)) for w, grid in zip(widths, grids)]
    return _descend(structure, out, [sorted(g) for g in grids], p,
                    _ratio_fn(structure, scope, table), "widths snapped to the table's steps",
                    start=widths)


def _descend(structure: G.Structure, out: list[int], grids: Sequence[Sequence[int]], p: float,
             ratio: Callable[[Sequence[int]], float], what: str | None,
             start: Sequence[int] | None = None, deeper: bool = True) -> list[int]:
    """While ``ratio(out) > p``, move the group whose next lower width on its grid saves the most
    per channel it removes to that width; warn (``what`` is not None) when no group can step
    down and p is still missed.

    Rounding, not re-pruning: with ``start`` (the widths before rounding), a group first goes no
    lower than the grid width at or below its start, so each width ends on one of the two grid
    widths around it. Only when that cannot meet ``p`` (a start under a group's smallest grid
    width) and ``deeper`` do groups go further; without ``deeper`` the result is then over p.
    Per channel, because grids can be uneven: a latency table's steps can offer a group only
    32 -> 1, which saves more in total than any one-channel step elsewhere. Without these two
    rules a latency-budgeted ResNet-50 (p = 0.5, 2-core CPU) had 7 of its 32 groups cut to one
    channel where trimming had kept at least 15."""
    if start is not None:
        floors = [max([g for g in grid if g <= w], default=min(grid))
                  for w, grid in zip(start, grids)]
        out = _descend(structure, out, [[g for g in grid if g >= f]
                                        for grid, f in zip(grids, floors)], p, ratio,
                       None if deeper else what)
        if not deeper:
            return out
    while (now := ratio(out)) > p:
        best, saved = None, 0.0
        for k, w in enumerate(out):
            lower = [g for g in grids[k] if G.MIN_KEPT <= g < w]
            if not lower:
                continue
            trial = out[:k] + [lower[-1]] + out[k + 1:]
            gain = (now - ratio(trial)) / (w - lower[-1])
            if gain > saved:
                best, saved = (k, lower[-1]), gain
        if best is None:  # every group is at its smallest allowed width
            if what:
                logging.getLogger(__name__).warning("%s cannot meet the budget p = %s (ratio "
                                                    "%.3f)", what, p, now)
            break
        out[best[0]] = best[1]
    return out


# Kept-width multiple of budget.round_to = 0 ("auto") per JAX backend: tensor-core tiles on GPUs,
# the 128-wide MXU/lanes on TPUs, 8 on CPUs (XLA:CPU's convolutions run odd widths such as 7 or 15
# slower than 8 or 16: ResNet-56 at p = 0.48 ran 1.0-1.1x dense unrounded, 1.4x rounded to 8;
# ResNet-50 and MobileNetV2 the same either way; docs/benchmarks.md).
HARDWARE_MULTIPLE = {"gpu": 8, "cuda": 8, "rocm": 8, "tpu": 128, "cpu": 8}


def auto_round_widths(structure: G.Structure, widths: Sequence[int], p: float, backend: str,
                      scope: str = "prunable") -> tuple[int, list[int]]:
    """``(multiple, widths)`` for ``budget.round_to = 0``: widths rounded to the backend's
    multiple, or to the largest of its halves that meets ``p`` by rounding alone, each width on
    one of the two multiples around it (a 16-wide ResNet-56 stage under 128 gets 8; ResNet-20 at
    p = 0.3, whose 4-wide groups would round up to 8 only if its 64-wide stage fell from 19 to
    8, gets 4). When rounding alone meets p at no multiple, the largest that meets it by cutting
    deeper. ``multiple`` is 1 (widths unchanged) on an unknown backend or when none can."""
    top = HARDWARE_MULTIPLE.get(backend, 1)
    for deeper in (False, True):
        multiple = top
        while multiple > 1:
            out = round_widths(structure, widths, multiple, p, scope=scope, warn=False,
                               deeper=deeper)
            if widths_ratio(structure, out, scope) <= p:
                return multiple, out
            multiple //= 2
    return 1, list(widths)


def resize_arch(arch: G.Arch, widths: Sequence[int],
                norms: Sequence[np.ndarray]) -> list[np.ndarray]:
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
