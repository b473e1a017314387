"""The tracer's state while it walks a jaxpr: channel spaces, their ties, and what read them.

Each conv or linear output (and the model input) opens a *channel space*. Elementwise ops tie
spaces together position by position (union-find); a space is *coupled* when an addition tied
it (a residual stream) and *fixed*, with a reason, when pruning it could not be done exactly.
The rules (rules.py) update this state; build.py turns it into a Structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sap_jax.structure import groups as G
from sap_jax.tracing.labels import ADDITIVE, Act, Const, Par, vary_all


@dataclasses.dataclass
class Record:
    """One per-channel use of a parameter: ``kind`` in out/in/depthwise/param."""
    kind: str
    path: G.Path
    axis: int
    ndim: int
    sid: np.ndarray
    cidx: np.ndarray


@dataclasses.dataclass
class LayerRec:
    """A conv, linear or normalisation layer seen in the forward, before groups are numbered."""
    kind: str  # conv | dense | product (a computed matrix product: MACs = tokens * |out|)
    path: G.Path  # module path
    ins: tuple[np.ndarray, np.ndarray] | int = 0
    out: tuple[np.ndarray, np.ndarray] | int = 0
    kernel: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)  # the kernel's (rhs_dilation)
    lhs_dilation: tuple[int, int] = (1, 1)  # the input's (a transposed conv)
    groups: int = 1
    depthwise: bool = False
    tokens: int = 1
    padding: Any = None  # ((pad_h, pad_w), in_hw) when not the usual convention


class Analysis:
    """Channel spaces and per-channel parameter uses of one jaxpr (see the module docstring)."""

    def __init__(self, leaf_ndims: dict[G.Path, int], ignore: Sequence[str] = (),
                 strict: bool = True, depthwise: Sequence[G.Path] = (), images: int = 1):
        self.leaf_ndims = dict(leaf_ndims)
        self.images = images  # the traced batch: products count their MACs per image
        self.depthwise = set(depthwise)  # convs known to be depthwise (even at one channel)
        # (param path, param axis) pairs whose entries a reduction or product mixed (weight
        # standardisation, spectral norm): a channel there cannot be cut on its own.
        self.mixed_axes: set[tuple[G.Path, int]] = set()
        self.ignore = set(ignore)  # producers whose spaces are fixed from the start
        self.strict = strict  # raise on an unknown op (else: its channels are fixed)
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []  # who produced the space, for messages
        self.fixed: dict[int, str] = {}
        self.coupled: set[int] = set()
        self.records: list[Record] = []
        self.layers: list[LayerRec] = []
        # eqn key (its index path through nested jaxprs) -> (operand, labels): the gated
        # forward multiplies that operand by the gate of its channels.
        self.consumers: dict[tuple[int, ...], tuple[int, Act]] = {}

    # ---- spaces ---------------------------------------------------------------
    def new_space(self, size: int, name: str, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.name.append(name)
        if fixed:
            self.fixed[len(self.parent) - 1] = fixed
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, coupled: bool) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.fix_ids([ra, rb], "tied to channels of another size")
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        if hi in self.fixed and lo not in self.fixed:
            self.fixed[lo] = self.fixed[hi]
        if coupled or hi in self.coupled:
            self.coupled.add(lo)

    def record(self, kind: str, path: G.Path, axis: int | None, sid, cidx) -> None:
        """A per-channel use of parameter ``path`` along ``axis`` (None: an axis the tracer
        lost, e.g. a kernel stored flat and reshaped: those channels stay whole)."""
        if axis is None:
            self.fix_ids(sid, f"read through {'/'.join(path)} along an axis it cannot follow")
            return
        self.records.append(Record(kind, path, axis, self.leaf_ndims[path], sid, cidx))

    def fix_ids(self, ids, reason: str) -> None:
        for i in set(int(s) for s in np.asarray(ids).ravel() if s >= 0):
            self.fixed.setdefault(self.find(i), reason)

    def fix(self, ann: Any, reason: str) -> None:
        if isinstance(ann, Act):
            self.fix_ids(ann.sid, reason)

    def all_fixed(self, acts: Sequence[Act]) -> bool:
        """Whether every channel of ``acts`` is fixed already (nothing left to get wrong)."""
        return all(self.find(int(t)) in self.fixed for a in acts for t in a.sid if t >= 0)

    def act(self, size: int, name: str, axis: int, fixed: str | None = None) -> Act:
        """A new space of ``size`` channels along ``axis``, produced by ``name``."""
        s = self.new_space(size, name, fixed or ("ignored" if name in self.ignore else None))
        return Act(axis, np.full(size, s), np.arange(size))

    def producer_name(self, anns: Sequence[Any]) -> str:
        for a in anns:
            if isinstance(a, Act):
                return self.name[int(a.sid[a.sid >= 0][0])] if (a.sid >= 0).any() else "?"
        return "?"

    # ---- shared by several rules --------------------------------------------------
    def elementwise(self, name: str, ins, shapes) -> Act:
        """An elementwise op ``name`` (or a concatenation along another axis): tie the activations
        of ``ins`` position by position; parameters meeting them become per-channel slices."""
        acts = [a for a in ins if isinstance(a, Act)]
        base = acts[0]
        for a in acts[1:]:
            if a.axis != base.axis or len(a.sid) != len(base.sid):
                self.fix(a, f"combined by '{name}' with differently laid out channels")
                self.fix(base, f"combined by '{name}' with differently laid out channels")
                continue
            for s, t, ci, cj in zip(base.sid, a.sid, base.cidx, a.cidx):
                if s >= 0 and t >= 0:
                    if ci != cj:
                        self.fix_ids([s, t], f"permuted channels meet in '{name}'")
                    self.union(int(s), int(t), coupled=name in ADDITIVE)
                elif s >= 0 or t >= 0:  # a channel meets a padded constant one (shortcut "A")
                    self.fix_ids([s, t], f"meets zero padding in '{name}'")
        for a, shape in zip(ins, shapes):
            if isinstance(a, Par):
                for path, axes in a.items:
                    if base.axis < len(axes) and axes[base.axis] is not None:
                        self.record("param", path, axes[base.axis], base.sid, base.cidx)
            elif isinstance(a, Const) and base.axis in a.vary and len(shape) > base.axis \
                    and shape[base.axis] > 1:
                self.fix(base, f"combined by '{name}' with a value that differs per channel "
                           "and is not a parameter")
        return base

    def mixed(self, acts: Sequence[Act], reason: str, eqn) -> Any:
        """Fix ``acts``' channels; the output keeps a (fixed) channel axis where it still has
        the first one's, so the layers after it are still seen."""
        for a in acts:
            self.fix(a, reason)
        out = eqn.outvars[0].aval
        a = acts[0] if acts else None
        if a is not None and a.axis < len(out.shape) and out.shape[a.axis] == len(a.sid) and (
                len(out.shape) == len(eqn.invars[0].aval.shape)):
            return self.act(len(a.sid), self.name[self.find(int(a.sid[a.sid >= 0][0]))]
                            if (a.sid >= 0).any() else "?", a.axis, fixed=reason)
        return Const(frozenset(vary_all(out)))

    def check_partial(self, before: Act, after: Act, reason: str) -> Act:
        """Fix the spaces of which ``after`` holds fewer positions than ``before``."""
        for s in set(after.sid[after.sid >= 0].tolist()):
            if (before.sid == s).sum() != (after.sid == s).sum():
                self.fix_ids([s], f"channels {reason}")
        return after
