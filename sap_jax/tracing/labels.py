"""What the tracer writes on every array of a jaxpr, the op names it sorts primitives by, and
the shape helpers the rules share.

Every array gets one of three labels:

* :class:`Act`, an **activation**: along its channel axis, a label per position saying which
  *channel space* (one per conv or linear output, the model input, ...) and which channel of
  it sits there;
* :class:`Par`, **parameter-derived**: which parameter axes its axes came from, so a BN scale
  or a conv kernel meeting an activation becomes a per-channel slice of that parameter;
* :class:`Const`, anything else.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sap_jax.structure import groups as G

#: The values of ``prune``: inner widths only (the paper), or coupled groups too.
PRUNE = ("inner", "all")


class TraceError(ValueError):
    """The tracer met something it cannot follow; the message says what to do."""


@dataclasses.dataclass
class Act:
    """An activation: ``sid[p], cidx[p]`` = space and channel at position p of ``axis``
    (``sid`` -1: a position no space owns, e.g. zero padding)."""
    axis: int
    sid: np.ndarray
    cidx: np.ndarray


@dataclasses.dataclass
class Par:
    """Derived from parameters only: ``items`` = ((param path, param axis of each axis), ...)."""
    items: tuple[tuple[G.Path, tuple[int | None, ...]], ...]


@dataclasses.dataclass
class Const:
    """Anything else; ``vary`` = axes along which it may differ."""
    vary: frozenset[int]


# Primitive families, by how labels flow through them (the rules in rules.py use them).
UNARY = {
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "square", "integer_pow", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "not", "convert_element_type", "reduce_precision", "copy",
    "copy_p", "stop_gradient", "real", "imag", "conj", "sharding_constraint", "pvary",
    "optimization_barrier", "mesh_cast", "reshard", "bitcast_convert_type"}
#: Elementwise ops whose result has both operands' channels in it: a residual stream.
ADDITIVE = {"add", "sub", "add_any", "max", "min", "select_n", "clamp"}
NARY = ADDITIVE | {"mul", "div", "pow", "atan2", "rem", "nextafter", "and", "or", "xor", "eq",
                   "ne", "gt", "ge", "lt", "le", "igamma", "igammac"}
REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
          "argmax", "argmin", "reduce_xor"}
WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
#: Ops that call a sub-jaxpr, and the parameter holding it: the tracer looks inside.
CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
         "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


def vary_all(aval) -> list[int]:
    """The axes of ``aval`` along which a value may differ (every axis longer than 1)."""
    return [i for i, s in enumerate(getattr(aval, "shape", ())) if s > 1]


def constant_along(a: np.ndarray, d: int) -> bool:
    return bool((a == np.take(a, [0], axis=d)).all())


def reshape_groups(old, new):
    """Pairs of axis ranges ``((i0, i1), (j0, j1))`` of ``old`` and ``new`` with equal products."""
    out, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        i0, j0, po, pn = i, j, 1, 1
        if i < len(old):
            po *= old[i]
            i += 1
        if j < len(new):
            pn *= new[j]
            j += 1
        while po != pn:
            if po < pn and i < len(old):
                po *= old[i]
                i += 1
            elif j < len(new):
                pn *= new[j]
                j += 1
            else:
                break
        # Absorb trailing size-1 axes on both sides into this group.
        while i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            i += 1
        while j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            j += 1
        out.append(((i0, i), (j0, j)))
    return out


def map_axes(name, eqn, in_shape, axes):
    """Parameter axes of each output axis of a layout op applied to a parameter."""
    out_shape = eqn.outvars[0].aval.shape
    if name == "broadcast_in_dim":
        res: list[int | None] = [None] * len(out_shape)
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            if in_shape[i] == out_shape[d]:
                res[d] = axes[i]
        return tuple(res)
    if name == "transpose":
        return tuple(axes[p] for p in eqn.params["permutation"])
    if name == "squeeze":
        return tuple(a for i, a in enumerate(axes) if i not in eqn.params["dimensions"])
    res = [None] * len(out_shape)  # reshape / expand_dims: match the single non-1 axis per group
    for (i0, i1), (j0, j1) in reshape_groups(tuple(in_shape), tuple(out_shape)):
        bi = [i for i in range(i0, i1) if in_shape[i] > 1]
        bj = [j for j in range(j0, j1) if out_shape[j] > 1]
        if len(bi) == 1 and len(bj) == 1:
            res[bj[0]] = axes[bi[0]]
    return tuple(res)
