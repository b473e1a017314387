"""Per-op costs read from a compiled program's HLO text, for roofline estimates of step time.

XLA's ``cost_analysis()`` gives one total per program, and on TPU its ``optimal_seconds`` can
be negative (seen for a ResNet-50 train step). A roofline over totals (``max(flops / peak,
bytes / bandwidth)``) credits a step with overlapping the work of ops that run one after the
other. Here each top-level op of the entry computation (a fusion, a convolution, a copy, a
collective) is one unit: its FLOPs are those of the convolutions and dot products it contains
(2 per multiply-add; elementwise work is left to its bytes), its bytes are its operands' and
results' sizes. :func:`roofline_s` sums ``max(flops / peak, bytes / bandwidth)`` over the ops,
so a memory-bound op and a compute-bound one each cost their own bound.

Limits, said where they are used:

- bytes count every operand and result once, whatever memory space the compiler placed it in
  (on-chip buffers included, so memory time is an upper bound). With ``padded=True`` an array
  counts at the size of its tiled layout, as the compiler wrote it (``{3,0,2,1:T(8,128)}``: the
  most minor dimension padded to 128, the next to 8); else at its logical size;
- FLOPs are logical, or with ``mxu`` (the matrix unit's width: 128, or 256 on v6e) each
  convolution's and dot's contracted feature dimension and output feature dimension are
  rounded up to it: an MXU pass over 40 input channels costs what one over 128 does. Grouped
  and depthwise convolutions stay logical (a handful of channels per group is vector-unit
  work, bound by its bytes). Other padding (the M dimension, the compiler's own choice of
  tiles) is not modelled;
- ops inside ``while``/``conditional`` bodies and top-level ``call``s are not counted (our steps
  have none; :attr:`Program.has_control_flow` flags a program with loops or branches);
- collectives wrapped in async computations or fusions are not found.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

#: Bytes per element of each HLO element type.
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
#: Collective ops (an async pair counts once, at its ``-start``).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
#: Ops that move or compute nothing.
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
        "partition-id", "replica-id", "opt-barrier"}

_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\](?:\{([^}]*)\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*?)\s([a-z][a-z0-9-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of an HLO shape (a tuple's elements in order): ``[(dtype, dims), ...]``."""
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in _ARRAY.finditer(text)]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tiled(dims: tuple[int, ...], layout: str | None) -> tuple[int, ...]:
    """``dims`` padded as the layout's first tile pads them (``"3,0,2,1:T(8,128)(2,1)"``: the
    most minor dimension to 128, the second most minor to 8); unchanged without a tile."""
    if not layout or ":" not in layout or not dims:
        return dims
    order, _, rest = layout.partition(":")
    tile = re.match(r"T\(([0-9,]+)\)", rest)
    if not tile:
        return dims
    minor_to_major = [int(d) for d in order.split(",") if d.strip()]
    sizes = [int(t) for t in tile.group(1).split(",")]
    out = list(dims)
    for axis, size in zip(minor_to_major, reversed(sizes)):
        out[axis] = _round_up(out[axis], size)
    return tuple(out)


def nbytes(text: str, padded: bool = False) -> float:
    """Bytes of every array in an HLO shape; ``padded``: at its tiled layout's size."""
    total = 0.0
    for m in _ARRAY.finditer(text):
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        total += DTYPE_BYTES[m.group(1)] * math.prod(_tiled(dims, m.group(3)) if padded else dims)
    return total


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result's HLO shape text
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r"=(\{[^}]*\}|[^\s,]+)", self.attrs)
        return m.group(1) if m else None


def _split_operands(rest: str) -> tuple[str, str]:
    """``"a, b), attrs"`` -> ``("a, b", "attrs")``, honouring nested brackets."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return rest[:i], rest[i + 1:]
    return rest, ""


@dataclasses.dataclass
class Program:
    """The computations of an HLO module: ``{name: [Instr, ...]}`` and the entry's name."""

    computations: dict[str, list[Instr]]
    entry: str

    @property
    def has_control_flow(self) -> bool:
        return any(i.opcode in ("while", "conditional") for i in self.computations[self.entry])

    def shapes_of(self, computation: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.computations[computation]}


def parse(text: str) -> Program:
    """Parse an HLO module's text (``compiled.as_text()``)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            ops, attrs = _split_operands(m.group(4))
            comps[current].append(Instr(m.group(1), m.group(2), m.group(3),
                                        re.findall(r"%([\w.\-]+)", ops), attrs))
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return Program(comps, entry)


def _dims(shape_text: str) -> tuple[int, ...]:
    arrays = shapes(shape_text)
    return arrays[0][1] if arrays else ()


def _conv_flops(ins: Instr, known: dict[str, str], mxu: int = 0) -> float:
    """2 x output elements x (kernel window x input features per group); ``mxu``: the input
    and output features rounded up to it.

    Every tap of the window counts (padding included, as the MXU computes it) up to the input's
    own extent in that dimension: the compiler also writes convolutions with the roles swapped
    (a 1x1 kernel as the input, an activation-sized window over it, almost all padding), where
    only the taps that can meet the input are work. Taps on the zeros a transposed convolution's
    ``lhs_dilate`` inserts are not counted."""
    labels = ins.attr("dim_labels") or ""
    if "->" not in labels or len(ins.operands) < 2:
        return 0.0
    lhs_labels, rhs_labels = labels.split("->")[0].split("_")
    if int(ins.attr("feature_group_count") or 1) > 1:
        mxu = 0  # grouped and depthwise convs: a few channels per group, not an MXU pass
    lhs = _dims(known.get(ins.operands[0], ""))
    rhs = _dims(known.get(ins.operands[1], ""))
    if len(rhs) != len(rhs_labels) or len(lhs) != len(lhs_labels):
        return 0.0
    per_output = 1
    for d, c in zip(rhs, rhs_labels):
        if c == "i":
            per_output *= _round_up(d, mxu) if mxu else d
        elif c.isdigit():
            per_output *= min(d, lhs[lhs_labels.index(c)]) if c in lhs_labels else d
    dilate = re.search(r"lhs_dilate=([0-9x]+)", ins.attrs)
    skipped = math.prod(int(d) for d in dilate.group(1).split("x")) if dilate else 1
    out = list(_dims(ins.shape))
    out_labels = labels.split("->")[1]
    if mxu and "f" in out_labels and len(out) == len(out_labels):
        f = out_labels.index("f")
        out[f] = _round_up(out[f], mxu)
    return 2.0 * math.prod(out) * per_output / skipped


def _dot_flops(ins: Instr, known: dict[str, str], mxu: int = 0) -> float:
    """2 x output elements x contracted size; ``mxu``: the contracted size and the output's
    minor (feature) dimension rounded up to it."""
    contracting = ins.attr("lhs_contracting_dims") or "{}"
    idx = [int(d) for d in re.findall(r"\d+", contracting)]
    lhs = _dims(known.get(ins.operands[0], "")) if ins.operands else ()
    k = math.prod(lhs[d] for d in idx if d < len(lhs))
    out = list(_dims(ins.shape))
    if mxu:
        k = _round_up(k, mxu)
        if out:
            out[-1] = _round_up(out[-1], mxu)
    return 2.0 * math.prod(out) * k


def _own_flops(ins: Instr, known: dict[str, str], mxu: int) -> float:
    """The FLOPs of ``ins`` itself: a convolution's or a dot's, else 0."""
    if ins.opcode == "convolution":
        return _conv_flops(ins, known, mxu)
    if ins.opcode == "dot":
        return _dot_flops(ins, known, mxu)
    return 0.0


def flops(program: Program, computation: str, _seen: tuple[str, ...] = (), *,
          mxu: int = 0) -> float:
    """FLOPs of the convolutions and dot products of ``computation`` and what it calls
    (``mxu``: feature dimensions rounded up to the matrix unit's width)."""
    known = program.shapes_of(computation)
    total = 0.0
    for ins in program.computations[computation]:
        total += _own_flops(ins, known, mxu)
        for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", ins.attrs):
            if callee in program.computations and callee not in _seen:
                total += flops(program, callee, _seen + (computation,), mxu=mxu)
    return total


@dataclasses.dataclass
class OpCost:
    name: str
    opcode: str
    flops: float
    bytes: float

    @property
    def collective(self) -> bool:
        return self.opcode.removesuffix("-start") in COLLECTIVES


def op_costs(program: Program, *, mxu: int = 0, padded: bool = False) -> list[OpCost]:
    """One :class:`OpCost` per top-level op of the entry computation that does work; ``mxu``
    and ``padded``: FLOPs and bytes with the hardware's padding (module docstring)."""
    known = program.shapes_of(program.entry)
    out = []
    for ins in program.computations[program.entry]:
        if ins.opcode in FREE or ins.opcode.endswith("-done"):
            continue
        f = _own_flops(ins, known, mxu) if ins.opcode in ("convolution", "dot") else sum(
            flops(program, c, mxu=mxu) for c in re.findall(r"calls=%([\w.\-]+)", ins.attrs)
            if c in program.computations)
        b = nbytes(ins.shape, padded) + sum(nbytes(known.get(o, ""), padded)
                                            for o in ins.operands)
        out.append(OpCost(ins.name, ins.opcode, f, b))
    return out


def collectives(program: Program) -> dict[str, dict[str, float]]:
    """``{op: {"count": n, "bytes": b}}`` of the entry's collectives; ``b`` sums each one's
    full-size buffer: the result (of an async ``-start``, its last element), the operands for a
    reduce-scatter (whose result is one shard)."""
    count: Counter = Counter()
    size: Counter = Counter()
    known = program.shapes_of(program.entry)
    for ins in program.computations[program.entry]:
        op = ins.opcode.removesuffix("-start")
        if op in COLLECTIVES and not ins.opcode.endswith("-done"):
            count[op] += 1
            if op == "reduce-scatter":
                size[op] += sum(nbytes(known.get(o, "")) for o in ins.operands)
            elif ins.opcode.endswith("-start") and len(shapes(ins.shape)) > 1:
                t, d = shapes(ins.shape)[-1]
                size[op] += DTYPE_BYTES[t] * math.prod(d)
            else:
                size[op] += nbytes(ins.shape)
    return {op: {"count": count[op], "bytes": size[op]} for op in sorted(count)}


def roofline_s(costs: list[OpCost], peak_flops: float, bandwidth: float) -> float:
    """Sum over ops of ``max(flops / peak_flops, bytes / bandwidth)`` (collectives excluded:
    their time is the interconnect's)."""
    return sum(max(c.flops / peak_flops, c.bytes / bandwidth) for c in costs if not c.collective)
