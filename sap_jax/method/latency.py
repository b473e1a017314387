"""What each layer of a model costs on this backend, measured: the per-layer side of speed.

A model's :class:`~sap_jax.structure.groups.Structure` lists every conv and linear layer with
its channel dimensions as functions of the group widths. :func:`layer_forward` builds one
layer alone (a jitted conv or matrix product on a random input of the layer's own shape) at
given widths, and :func:`layer_times` times every layer of a model at several width vectors,
interleaved round by round so load drift hits every variant alike. Comparing the dense and a
pruned width vector shows which layers lose or gain time when pruned
(``benchmarks/pruned_speedup.py --layers``). Norms, activations and additions are not timed
on their own: XLA fuses them into the layers' epilogues, and whole-model timings
(:func:`sap_jax.runtime.speed.compare`) include them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sap_jax.method import cut
from sap_jax.runtime import host_memory, parallel, speed
from sap_jax.structure import flops
from sap_jax.structure import groups as G


def layer_forward(layer: G.ConvLayer | G.DenseLayer, widths: Sequence[int], batch: int, *,
                  dtype: Any = jnp.float32, seed: int = 0,
                  device: jax.Device | None = None) -> Callable[[], jax.Array]:
    """A compiled, ready-to-call forward of ``layer`` alone at group ``widths`` on one fixed
    random batch of ``batch`` images (the layer's own input shape), in ``dtype``."""
    return _op(layer, int(G.dim_value(layer.in_ch, widths)), int(G.dim_value(layer.out_ch, widths)),
               batch, dtype=dtype, seed=seed, device=device, train=False)


def timed_layers(structure: G.Structure) -> list[G.ConvLayer | G.DenseLayer]:
    """The layers :func:`layer_times` measures: every conv and linear layer, in forward order."""
    return [x for x in structure.layers if isinstance(x, (G.ConvLayer, G.DenseLayer))]


def layer_times(structure: G.Structure, width_sets: Sequence[Sequence[int]], batch: int, *,
                reps: int = 10, dtype: Any = jnp.float32,
                device: jax.Device | None = None) -> list[dict[str, Any]]:
    """Per conv/linear layer of ``structure``: the median milliseconds of its forward at each
    of ``width_sets`` (one width per group, e.g. the dense and a pruned model's), JSON-ready.

    Returns one row per layer: ``path``, ``kind``, ``prunable`` (whether a group sets one of
    its channel dimensions), ``macs`` (per image, at each width set), ``ms`` (median per
    width set) and ``iqr_ms`` (25th and 75th percentiles per width set).
    """
    if reps < 1:
        raise ValueError(f"reps = {reps} must be >= 1.")
    for ws in width_sets:
        _check_widths(ws, structure)
    rows = []
    for layer in timed_layers(structure):
        fns = [layer_forward(layer, ws, batch, dtype=dtype, device=device) for ws in width_sets]
        times = speed.time_interleaved(fns, reps)
        rows.append({
            "path": ".".join(layer.path), "kind": type(layer).__name__,
            "prunable": G.is_prunable(layer),
            "macs": [int(flops.layer_macs(layer, ws)) for ws in width_sets],
            "ms": [1e3 * statistics.median(t) for t in times],
            "iqr_ms": [[1e3 * q for q in speed.spread(t)] for t in times],
        })
    return rows


def _check_widths(widths: Sequence[int], structure: G.Structure) -> None:
    if len(widths) != len(structure.widths) or any(
            not 1 <= int(w) <= c for w, c in zip(widths, structure.widths)):
        raise ValueError(f"widths {list(widths)} do not fit the groups {list(structure.widths)}: "
                         "one width per group, each from 1 to the group's size.")


# -- latency tables ----------------------------------------------------------------------------
#
# A table holds, for every distinct conv/linear layer shape of a model, its measured time over a
# grid of input and output channel counts (each count a function of the group widths: the grid
# runs from the count at one channel per group to the dense one). A model's latency at any widths
# is then estimated from the sum of its layers' times, interpolated in that grid, and mapped to
# the whole forward through a calibration curve measured on the whole model (LatencyTable).
# The estimate is differentiable in the widths: the generator's resource loss reads it.

FORMAT = "sap_jax.latency_table/1"
#: Where rounding looks for the widths at which latency steps up
#: (:meth:`LatencyTable.step_widths`), a rise smaller than this fraction of what the group's
#: whole width range costs is treated as noise.
STEP_TOLERANCE = 0.05


#: Widths of the whole-model timings that calibrate a table are rounded up to the device's
#: multiple (``cut.HARDWARE_MULTIPLE``; this one where it has none listed): the widths a cut ends
#: on (``budget.round_to = 0``), whose time inside the model the estimate must match. Odd
#: widths run slower inside a model than their layers alone say: on the 2-core CPU, ResNet-56 at
#: (6, 12, 24) took 0.91 of dense, a curve through (1, 1, 1), (4, 8, 16) and (8, 16, 32)
#: estimated 0.74.
CALIBRATION_MULTIPLE = 8
#: The least slope of a table's calibration curve, as a fraction of its average slope (the dense
#: model's time over its layers' summed time).
MIN_SLOPE = 0.1


def calibration_widths(structure: G.Structure, fraction: float,
                       multiple: int = CALIBRATION_MULTIPLE) -> list[int]:
    """Each group at ``fraction`` of its width (at least one channel), rounded up to a multiple
    of ``multiple`` and at most the group's width."""
    m = max(1, int(multiple))
    return [min(c, -(-max(G.MIN_KEPT, int(fraction * c)) // m) * m) for c in structure.widths]


def calibration_curve(pairs: Sequence[Sequence[float]]) -> list[list[float]]:
    """``[[x, y], ...]`` (the layers' summed time, the whole model's) as the curve the estimate
    reads: sorted by x, each y the least at that or any larger x (a model measured slower at
    smaller widths, odd ones, is priced like the wider one), points with an x no larger than the
    one before dropped (they would make a vertical segment). Then, from the widest point down,
    each y is lowered where needed so that every segment rises by at least
    :data:`MIN_SLOPE` of the average slope: where narrower widths measured no faster (noise),
    the generator still feels a pull towards p, and no two widths tie."""
    pts = sorted((float(x), float(y)) for x, y in pairs if x > 0)
    out: list[list[float]] = []
    for i, (x, _) in enumerate(pts):
        y = min(v for _, v in pts[i:])
        if out and x <= out[-1][0]:
            continue
        out.append([x, y])
    if out:
        slope = MIN_SLOPE * out[-1][1] / out[-1][0]
        for i in range(len(out) - 2, -1, -1):
            out[i][1] = min(out[i][1], out[i + 1][1] - slope * (out[i + 1][0] - out[i][0]))
    return out


def _piecewise(x: Any, curve: Sequence[Sequence[float]], xp: Any = np) -> Any:
    """``curve`` (from :func:`calibration_curve`) at ``x``: straight lines between its points;
    above the last, its last segment extended, so the slope (the gradient the generator feels)
    is not cut to zero at the dense end; below the first (widths narrower than any timed), the
    line from the origin to the first point, so no estimate is negative."""
    xs = xp.asarray([0.0] + [c[0] for c in curve])
    ys = xp.asarray([0.0] + [c[1] for c in curve])
    i = xp.clip(xp.searchsorted(xs, x, side="right") - 1, 0, len(curve) - 1)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def grid(lo: int, hi: int, points: int) -> list[int]:
    """Channel counts a table measures between ``lo`` and ``hi`` (both included): every count
    when there are at most ``points``, else ``lo``, ``hi`` and the multiples of the smallest power
    of two that keeps the grid within ``points`` (hardware steps at powers of two)."""
    if points < 2:
        raise ValueError(f"points = {points} must be >= 2.")
    step = 1
    while len(out := sorted({lo, hi, *range((lo // step + 1) * step, hi, step)})) > points:
        step *= 2
    return out


def _dim_grid(d: G.Dim, structure: G.Structure, points: int) -> list[int]:
    lo = int(G.dim_value(d, [G.MIN_KEPT] * structure.num_groups))
    return grid(lo, int(G.dim_value(d, structure.widths)), points)


def _layer_shape(layer: G.ConvLayer | G.DenseLayer) -> dict[str, Any]:
    """What, besides the channel counts, sets a layer's time (JSON-ready)."""
    if isinstance(layer, G.DenseLayer):
        return {"kind": "dense", "tokens": layer.tokens}
    def plain(v):  # a non-square (h, w) as JSON reads it back
        return list(v) if isinstance(v, tuple) else v

    shape = {"kind": "conv", "kernel": list(layer.kernel), "stride": plain(layer.stride),
             "pads": [list(p) for p in layer.pads], "input_hw": list(layer.input_hw),
             "depthwise": layer.depthwise, "groups": layer.groups}
    # Dilations only where set: tables built before they were recorded still match.
    shape.update({k: plain(getattr(layer, k)) for k in ("dilation", "lhs_dilation")
                  if getattr(layer, k) != 1})
    return shape


def _layer_fn(layer: G.ConvLayer | G.DenseLayer, cin: int, cout: int, batch: int, *,
              train: bool) -> tuple[Callable, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(f, (input shape, kernel shape))``: ``layer`` alone with ``cin`` input and ``cout``
    output channels, its forward or (``train``) its forward and the gradients to its input and
    kernel."""
    if isinstance(layer, G.ConvLayer):
        fgc = cin if layer.depthwise else layer.groups
        shapes = ((batch, *layer.input_hw, cin), (*layer.kernel, cin // fgc, cout))

        def fwd(x, w):
            return jax.lax.conv_general_dilated(
                x, w, layer.strides, layer.pads, lhs_dilation=layer.lhs_dilations,
                rhs_dilation=layer.dilations, feature_group_count=fgc,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif isinstance(layer, G.DenseLayer):
        shapes = ((batch * layer.tokens, cin), (cin, cout))

        def fwd(x, w):
            return x @ w
    else:
        raise TypeError(f"only conv and linear layers are timed alone, not {type(layer).__name__}.")
    f = jax.grad(lambda x, w: jnp.sum(fwd(x, w).astype(jnp.float32)), (0, 1)) if train else fwd
    return f, shapes


def _op(layer: G.ConvLayer | G.DenseLayer, cin: int, cout: int, batch: int, *, dtype: Any,
        seed: int, device: jax.Device | None, train: bool) -> Callable[[], Any]:
    """A compiled call of :func:`_layer_fn` on one fixed random batch (drawn on the device: no
    host copy of a large input)."""
    device = device or jax.local_devices()[0]
    f, shapes = _layer_fn(layer, cin, cout, batch, train=train)
    kx, kw = jax.random.split(jax.random.key(seed))
    with jax.default_device(device):
        x = jax.random.normal(kx, shapes[0], dtype)
        w = (jax.random.normal(kw, shapes[1], jnp.float32) / np.sqrt(cin)).astype(dtype)
    compiled = jax.jit(f)
    return lambda: compiled(x, w)


#: ``estimate(f, abstract_args) -> milliseconds``: a compiled program's time from the compiler
#: (a device that is not there), instead of timing calls.
Estimator = Callable[[Callable, tuple], float]


@dataclasses.dataclass
class Entry:
    """One distinct layer shape of a table: its times over a grid of channel counts.

    ``diagonal`` (a depthwise conv): input and output counts are one, ``cin`` is ``cout``, and
    the times are a vector over ``cout``; else matrices ``(len(cin), len(cout))``. Times are
    median milliseconds per call; ``*_iqr_ms`` hold the 25th and 75th percentiles on a last axis.
    """

    shape: dict[str, Any]
    cin: list[int]
    cout: list[int]
    diagonal: bool
    forward_ms: np.ndarray
    forward_iqr_ms: np.ndarray
    train_ms: np.ndarray | None = None
    train_iqr_ms: np.ndarray | None = None
    _envelopes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, init=False,
                                                         repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {"shape": self.shape, "cin": self.cin, "cout": self.cout, "diagonal": self.diagonal}
        for k in ("forward_ms", "forward_iqr_ms", "train_ms", "train_iqr_ms"):
            a = getattr(self, k)
            out[k] = None if a is None else np.asarray(a).tolist()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        arr = lambda k: None if d.get(k) is None else np.asarray(d[k], np.float64)  # noqa: E731
        return cls(d["shape"], list(d["cin"]), list(d["cout"]), bool(d["diagonal"]),
                   arr("forward_ms"), arr("forward_iqr_ms"), arr("train_ms"), arr("train_iqr_ms"))

    def envelope(self, which: str = "forward") -> np.ndarray:
        """The times made non-decreasing in every channel count: each point's time is the least
        time measured at that point or any wider one. A wider layer is never estimated faster
        than a narrower one; where the hardware disagrees (an odd width slower than the next
        even one), the cut's rounding picks the wider width (:meth:`LatencyTable.step_widths`)."""
        if which not in self._envelopes:  # read at every estimate: computed once
            z = np.asarray(getattr(self, f"{which}_ms"), np.float64)
            for axis in range(z.ndim):
                z = np.flip(np.minimum.accumulate(np.flip(z, axis), axis=axis), axis)
            self._envelopes[which] = z
        return self._envelopes[which]


def _bracket(points: Sequence[int], x: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Indices of the grid points around ``x`` and its fraction of the way between them (linear
    extrapolation outside the grid, so a relaxed width below one channel keeps a gradient)."""
    if len(points) == 1:
        return 0, 0, 0.0 * x
    g = np.asarray(points, np.float64)
    i = xp.clip(xp.searchsorted(xp.asarray(g), x, side="right") - 1, 0, len(points) - 2)
    lo, hi = xp.asarray(g)[i], xp.asarray(g)[i + 1]
    return i, i + 1, (x - lo) / (hi - lo)


def interpolate(entry: Entry, cin: Any, cout: Any, *, xp: Any = np, which: str = "forward",
                monotone: bool = True) -> Any:
    """The layer's time (ms) at channel counts ``cin``, ``cout`` (real numbers allowed): linear
    between grid points along each count (bilinear on a 2-D grid), on the monotone envelope
    (``monotone=False``: on the times as measured). ``xp`` is ``numpy`` (host) or ``jax.numpy``
    (traced, differentiable)."""
    z = xp.asarray(entry.envelope(which) if monotone else getattr(entry, f"{which}_ms"))
    j0, j1, u = _bracket(entry.cout, cout, xp)
    if entry.diagonal:
        return (1 - u) * z[j0] + u * z[j1]
    i0, i1, t = _bracket(entry.cin, cin, xp)
    return ((1 - t) * (1 - u) * z[i0, j0] + t * (1 - u) * z[i1, j0]
            + (1 - t) * u * z[i0, j1] + t * u * z[i1, j1])


@dataclasses.dataclass
class LatencyTable:
    """Measured per-layer times of one model on one device, and the latency model they give.

    Build one with :func:`build_table` (or ``python -m sap_jax.latency``); save and load it as
    JSON (:meth:`save`, :meth:`load`). ``layers`` maps each conv/linear layer (by path, in
    forward order) to its :class:`Entry`; ``model_ms`` is the dense model's measured forward.
    The whole forward is estimated from the sum of the layers' own times through
    ``calibration``: the whole model measured at one channel per group, at the device's
    multiple, at a quarter, at half and at every width (:func:`calibration_widths`), against
    that sum at the same widths, joined by straight lines (read from its monotone envelope).
    Layers timed alone do not cost what they cost inside the model (fused norms and
    activations, caches, per-call costs that weigh most at small widths), and part of the
    forward does not shrink with the widths; one straight line through dense and half width
    misjudged ResNet-50 at a quarter width by 0.10 of dense on a CPU.
    ``check`` compares, at three eighths of every width (not a calibration point), the measured
    whole-model time with the estimate. Tables without ``calibration`` (built before it)
    estimate ``layer_scale`` times the sum plus ``fixed_ms`` (new tables keep the line through
    half and dense width there, for older readers).
    """

    device: dict[str, Any]
    versions: dict[str, str]
    created: str
    model: dict[str, Any]  # class, group names, dense widths, image size
    batch: int
    dtype: str
    reps: int
    points: int
    layers: list[dict[str, Any]]  # {"path": "a.b", "entry": index}
    entries: list[Entry]
    model_ms: float | None = None
    layer_scale: float = 1.0
    fixed_ms: float = 0.0
    # [[sum of the layers' own ms, the whole model's ms], ...] at increasing widths
    calibration: list[list[float]] | None = None
    # what it was read from: {name: {"widths", "layers_ms", "model_ms"}}
    calibration_points: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    build_seconds: float | None = None

    # -- files ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["entries"] = [e.to_json() for e in self.entries]
        return {"format": FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyTable:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a sap_jax latency table (format {d.get('format')!r}, expected "
                             f"{FORMAT!r}); build one with python -m sap_jax.latency.")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["entries"] = [Entry.from_json(e) for e in d["entries"]]
        return cls(**kw)

    def save(self, path: Any) -> None:

        parallel.write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Any) -> LatencyTable:

        p = parallel.path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"latency table {path} does not exist; build one with python -m "
                             "sap_jax.latency --config=... --out=PATH.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"latency table {path} is not valid JSON ({e}).") from None
        return cls.from_json(d)

    # -- matching a model ------------------------------------------------------------------------

    def check_matches(self, structure: G.Structure) -> None:
        """Raise ``ValueError`` unless this table was built for ``structure``'s groups and layers
        (same group sizes, image size and layer shapes): a table of another model, input size or
        preset would estimate nonsense."""
        want = (list(structure.group_names), list(structure.widths), list(structure.input_hw))
        have = (self.model.get("group_names"), self.model.get("widths"),
                self.model.get("input_hw"))
        problems = []
        if have != want:
            problems.append(f"it describes groups {have[1]} at input {have[2]}, the model has "
                            f"{want[1]} at {want[2]}")
        else:
            layers = timed_layers(structure)
            if [x["path"] for x in self.layers] != [".".join(x.path) for x in layers]:
                problems.append("its layers are not the model's")
            else:
                for row, layer in zip(self.layers, layers):
                    e = self.entries[row["entry"]]
                    if e.shape != _layer_shape(layer):
                        problems.append(f"layer {row['path']} has another shape")
                        break
        if problems:
            raise ValueError(f"latency table built for {self.model.get('class')} does not match "
                             f"this model: {problems[0]}. Build one for this config (python -m "
                             "sap_jax.latency), or leave budget.latency_table empty.")

    # -- the latency model -------------------------------------------------------------------------

    def layer_ms(self, structure: G.Structure, widths: Sequence[Any], *, xp: Any = np,
                 which: str = "forward", monotone: bool = True) -> list[Any]:
        """Each timed layer's estimated milliseconds at group ``widths`` (``which``: "forward"
        or "train", the forward plus backward)."""
        out = []
        for row, layer in zip(self.layers, timed_layers(structure)):
            e = self.entries[row["entry"]]
            out.append(interpolate(e, G.dim_value(layer.in_ch, widths),
                                   G.dim_value(layer.out_ch, widths), xp=xp, which=which,
                                   monotone=monotone))
        return out

    def estimate_ms(self, structure: G.Structure, widths: Sequence[Any], scope: str = "total", *,
                    xp: Any = np, which: str = "forward", monotone: bool = True) -> Any:
        """Estimated milliseconds of the model at ``widths``: over the layers a group sets
        (``"prunable"``: their own times) or the whole forward (``"total"``: every layer's, scaled
        and offset as fitted on the whole model; ``which = "train"``: the layers' sum)."""
        if scope not in flops.SCOPES:
            raise ValueError(f"scope must be one of {flops.SCOPES}, got {scope!r}.")
        times = self.layer_ms(structure, widths, xp=xp, which=which, monotone=monotone)
        if scope == "prunable":
            return sum(t for t, layer in zip(times, timed_layers(structure))
                       if G.is_prunable(layer))
        if which != "forward":
            return sum(times)
        if self.calibration:
            return _piecewise(sum(times), self.calibration, xp)
        return self.layer_scale * sum(times) + self.fixed_ms

    def ratio(self, structure: G.Structure, widths: Sequence[Any], scope: str = "total", *,
              xp: Any = np) -> Any:
        """Estimated forward latency at ``widths`` over the dense model's, on ``scope``."""
        full = self.estimate_ms(structure, list(structure.widths), scope)
        return self.estimate_ms(structure, widths, scope, xp=xp) / full

    def step_widths(self, structure: G.Structure, tolerance: float = STEP_TOLERANCE,
                    fill: int = 0) -> list[list[int]]:
        """Per group, the widths worth keeping: the grid points after which the next wider point
        is measurably slower (by more than ``tolerance`` of the time between the group at one
        channel and at full width), and the group's full size. Other widths cost as much as a
        wider one, so the cut rounds up to these. Read along one group at a time, with the
        others dense; a group whose width only enters concatenated or flattened channels gets
        every width (no rounding).

        ``fill`` > 0 also lists its multiples below a group's first grid point above one
        channel: the grid measured nothing there (a 512-wide group at 9 points: 1, then 64), so
        without them the cut's only way down from the first point is one channel."""
        out = []
        dense = list(structure.widths)
        for k, c in enumerate(structure.widths):
            points = grid(G.MIN_KEPT, c, self.points)
            if not any(G.GroupRef(k) in (x.in_ch, x.out_ch) for x in timed_layers(structure)):
                out.append(list(range(G.MIN_KEPT, c + 1)))
                continue
            f = [self.estimate_ms(structure, dense[:k] + [g] + dense[k + 1:], "total",
                                  monotone=False) for g in points]
            span = max(f[-1] - f[0], 0.0)
            keep = [g for i, g in enumerate(points)
                    if i == len(points) - 1 or min(f[i + 1:]) - f[i] > tolerance * span]
            if fill > 0 and len(points) > 1:
                keep = sorted({*keep, *range(fill, points[1], fill)})
            out.append(keep)
        return out

    def monotone_violations(self, which: str = "forward") -> list[dict[str, Any]]:
        """Grid points measured slower than a wider point of the same layer beyond the noise
        (the wider point's 75th percentile is below this one's 25th): odd widths that cost more
        than even ones. The estimate uses the monotone envelope, so these only inform."""
        out = []
        for idx, e in enumerate(self.entries):
            z, iqr = getattr(e, f"{which}_ms"), getattr(e, f"{which}_iqr_ms")
            if z is None:
                continue
            env = e.envelope(which)
            for pos in zip(*np.nonzero(env < z)):
                wider = [q for q in np.ndindex(z.shape)
                         if all(a >= b for a, b in zip(q, pos)) and q != pos
                         and iqr[q][1] < iqr[pos][0]]
                if wider:
                    cin = e.cout[pos[0]] if e.diagonal else e.cin[pos[0]]
                    cout = e.cout[pos[-1]]
                    out.append({"entry": idx, "cin": cin, "cout": cout, "ms": float(z[pos]),
                                "wider_ms": float(min(z[q] for q in wider))})
        return out


def _measure(layer: G.ConvLayer | G.DenseLayer, cin: list[int], cout: list[int], diagonal: bool,
             batch: int, *, dtype: Any, reps: int, device: jax.Device | None,
             train: bool, estimate: Estimator | None = None) -> Entry:
    """Time ``layer`` at every grid point, one point at a time (a large layer's inputs at every
    point would not fit in memory together); with ``estimate``, ask it instead (no spread)."""
    points = [(c, c) for c in cout] if diagonal else [(a, b) for a in cin for b in cout]
    shape = (len(cout),) if diagonal else (len(cin), len(cout))
    out: dict[str, Any] = {}
    for which in ("forward", "train") if train else ("forward",):
        med, iqr = [], []
        for a, b in points:
            if estimate is not None:
                f, shapes = _layer_fn(layer, a, b, batch, train=which == "train")
                ms = estimate(f, tuple(jax.ShapeDtypeStruct(x, dtype) for x in shapes))
                med.append(ms)
                iqr.append([ms, ms])
                continue
            fn = _op(layer, a, b, batch, dtype=dtype, seed=0, device=device,
                     train=which == "train")
            (t,) = speed.time_interleaved([fn], reps)
            med.append(1e3 * statistics.median(t))
            iqr.append([1e3 * q for q in speed.spread(t)])
        out[f"{which}_ms"] = np.reshape(med, shape)
        out[f"{which}_iqr_ms"] = np.reshape(iqr, (*shape, 2))
    return Entry(_layer_shape(layer), cin, cout, diagonal, **out)


def _versions() -> dict[str, str]:
    import flax
    import jaxlib

    from sap_jax.runtime.version import VERSION
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "sap_jax": VERSION}


def _estimate_forward(model: Any, image_size: int, batch: int, dtype: Any,
                      estimate: Estimator) -> float:
    """The whole eval-mode forward of ``model`` on ``batch`` images, from ``estimate``."""
    fwd, state = speed.eval_forward(model)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return estimate(fwd, (abstract, jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                                         jnp.dtype(dtype))))


def build_table(model: Any, image_size: int, batch: int, *, dtype: Any = jnp.float32,
                points: int = 9, reps: int = 10, train: bool = True,
                device: jax.Device | None = None, check: bool = True,
                log: Callable[[str], None] | None = None, estimate: Estimator | None = None,
                device_info: dict[str, Any] | None = None) -> LatencyTable:
    """Measure a :class:`LatencyTable` of ``model`` (a ``PrunableModel``, with real arrays) at
    ``batch`` images of ``image_size`` in ``dtype`` on ``device`` (default: the first local one).

    Every distinct conv/linear layer shape is timed once (the blocks of a stage share theirs) at
    every point of a grid of at most ``points`` channel counts per prunable dimension: the
    forward and, with ``train``, the forward plus backward, each the median of ``reps`` calls
    after a warm-up call. The whole model's forward is timed too, at one channel per group, the
    device's multiple, a quarter, half and every width (:func:`calibration_widths`), for its
    ``calibration``; with ``check`` also at three eighths, to record how close the estimate
    comes (``check``). The table's device records its platform, kind and the process's
    ``host_memory`` status (the times depend on it on the CPU).

    ``estimate`` (with ``device_info``, what the table records as its device): every time comes
    from it instead of from timed calls, the layers' and the whole model's alike; a TPU slice
    that is not there (``sap_jax.runtime.tpu.estimator``).
    """


    from sap_jax import models

    t0 = time.perf_counter()
    if reps < 1:
        raise ValueError(f"reps = {reps} must be >= 1.")
    device = device or jax.local_devices()[0]
    structure = model.structure(image_size)
    entries: list[Entry] = []
    index: dict[str, int] = {}
    rows = []
    layers = timed_layers(structure)
    for n, layer in enumerate(layers):
        diagonal = isinstance(layer, G.ConvLayer) and layer.depthwise
        cout = _dim_grid(layer.out_ch, structure, points)
        cin = cout if diagonal else _dim_grid(layer.in_ch, structure, points)
        key = json.dumps([_layer_shape(layer), cin, cout])
        if key not in index:
            index[key] = len(entries)
            entries.append(_measure(layer, cin, cout, diagonal, batch, dtype=dtype, reps=reps,
                                    device=device, train=train, estimate=estimate))
            if log:
                log(f"layer {n + 1}/{len(layers)} {'.'.join(layer.path)}: "
                    f"{len(cin) * len(cout) if not diagonal else len(cout)} points, "
                    f"{time.perf_counter() - t0:.0f} s")
        rows.append({"path": ".".join(layer.path), "entry": index[key]})
    table = LatencyTable(
        device=device_info or {"platform": device.platform, "kind": device.device_kind,
                               "host_memory": host_memory.status()},
        versions=_versions(), created=datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"),
        model={"class": type(model).__name__, "group_names": list(structure.group_names),
               "widths": list(structure.widths), "input_hw": list(structure.input_hw)},
        batch=batch, dtype=jnp.dtype(dtype).name, reps=reps, points=points, layers=rows,
        entries=entries)
    # The whole model at one channel per group (the least any widths cost), at the device's
    # multiple, a quarter, half and every width (the estimate's calibration), and with ``check``
    # at three eighths (to test it where it was not fitted). Equal widths are timed once.
    platform = (device_info or {}).get("platform") or device.platform
    m = cut.HARDWARE_MULTIPLE.get(platform, CALIBRATION_MULTIPLE)
    sizes = {"one": [G.MIN_KEPT] * structure.num_groups,
             "multiple": calibration_widths(structure, 0.0, m),
             "quarter": calibration_widths(structure, 1 / 4, m),
             "half": calibration_widths(structure, 1 / 2, m), "dense": list(structure.widths)}
    if check:
        sizes["check"] = calibration_widths(structure, 3 / 8, m)
    distinct = {tuple(w): name for name, w in reversed(list(sizes.items()))}
    variants = {name: model if name == "dense" else models.from_config(
        type(model).__name__, {**model.config(), "widths": list(ws)})
        for ws, name in distinct.items()}
    rounds = None  # each variant's seconds per interleaved round (measured, not estimated)
    if estimate is not None:
        measured = {name: _estimate_forward(m, image_size, batch, dtype, estimate)
                    for name, m in variants.items()}
    else:
        fns = [speed.forward_fn(v, image_size, batch, dtype=dtype, device=device)
               for v in variants.values()]
        rounds = dict(zip(variants, speed.time_interleaved(fns, reps)))
        measured = {name: 1e3 * statistics.median(t) for name, t in rounds.items()}
    measured = {name: measured[distinct[tuple(w)]] for name, w in sizes.items()}
    table.model_ms = measured["dense"]
    alone = {k: float(sum(table.layer_ms(structure, w))) for k, w in sizes.items()}
    fitted = ("one", "multiple", "quarter", "half", "dense")
    table.calibration = calibration_curve([(alone[k], measured[k]) for k in fitted])
    table.calibration_points = {k: {"widths": sizes[k], "layers_ms": alone[k],
                                    "model_ms": measured[k]} for k in fitted}
    # For readers of tables before the curve (format 1): the line through half and dense width.
    # Where noise makes that line fall (a tiny model), the proportional one through dense instead:
    # an older reader must never estimate less time for more channels.
    slope = ((measured["dense"] - measured["half"]) / (alone["dense"] - alone["half"])
             if alone["dense"] > alone["half"] else 0.0)
    if slope > 0:
        table.layer_scale = slope
        table.fixed_ms = measured["dense"] - slope * alone["dense"]
    elif alone["dense"] > 0:
        table.layer_scale, table.fixed_ms = measured["dense"] / alone["dense"], 0.0
    if check:
        w = sizes["check"]
        # Paired like speed.compare's speed-up: the median of the rounds' own ratios.
        ratio = (measured["check"] / measured["dense"] if rounds is None else statistics.median(
            c / d for c, d in zip(rounds[distinct[tuple(w)]],
                                  rounds[distinct[tuple(sizes["dense"])]])))
        table.check = {"widths": w, "measured_ms": measured["check"],
                       "measured_ratio": ratio,
                       "estimated_ratio": float(table.ratio(structure, w, "total"))}
    table.build_seconds = time.perf_counter() - t0
    return table
