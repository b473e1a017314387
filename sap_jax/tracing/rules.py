"""How each primitive moves channel labels: one rule per primitive (or family), in ``RULES``.

A rule is ``rule(an, eqn, ins, shapes, key) -> [label of each output]``: ``an`` the
:class:`~sap_jax.tracing.analysis.Analysis` it updates, ``ins`` the labels of the operands,
``shapes`` their shapes, ``key`` the equation's index path (nested jaxprs included), by which
the gated forward finds the layers again. Rules run when an activation reaches the op; ops
that only see parameters and constants go through :func:`no_act`, except those in
``LOOKS_INSIDE``, whose rules follow their sub-jaxprs whatever reaches them.

"How is op X handled": grep ``RULES`` below. An op missing from it raises :class:`TraceError`
when unfixed channels reach it (see :func:`apply`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from sap_jax.tracing import layer_rules, layout_rules
from sap_jax.tracing.analysis import Analysis
from sap_jax.tracing.labels import (
    CALLS,
    CUMULATIVE,
    NARY,
    REDUCE,
    UNARY,
    WINDOW,
    Act,
    Const,
    Par,
    TraceError,
    map_axes,
    vary_all,
)

Rule = Callable[[Analysis, Any, list[Any], list[tuple[int, ...]], tuple[int, ...]], list[Any]]


# ---- walking ----------------------------------------------------------------------

def run(an: Analysis, jaxpr: jcore.Jaxpr, ins: Sequence[Any], key: tuple[int, ...] = ()
        ) -> list[Any]:
    """Label every array of ``jaxpr`` given its inputs' labels; the outputs' labels."""
    env: dict[Any, Any] = {}

    def read(v):
        if isinstance(v, jcore.Literal):
            return Const(frozenset())
        return env.get(v, Const(frozenset(vary_all(v.aval))))

    for v, a in zip(jaxpr.invars, ins):
        env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
        outs = apply(an, eqn, [read(v) for v in eqn.invars], key + (i,))
        for v, a in zip(eqn.outvars, outs):
            env[v] = a
    return [read(v) for v in jaxpr.outvars]


def apply(an: Analysis, eqn, ins: list[Any], key: tuple[int, ...]) -> list[Any]:
    """The labels of ``eqn``'s outputs: its rule's, or an unknown op's (fixed or an error)."""
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    acts = [a for a in ins if isinstance(a, Act)]
    if not acts and name not in LOOKS_INSIDE:
        return no_act(an, eqn, ins, shapes)
    rule = RULES.get(name)
    if rule is not None:
        return rule(an, eqn, ins, shapes, key)
    # Unknown: harmless where nothing prunable reaches it (or when only labels are wanted).
    if not an.strict or an.all_fixed(acts):
        return [an.mixed(acts, f"passed through the op '{name}'", eqn)] * len(eqn.outvars)
    raise TraceError(
        f"the tracer does not know the op '{name}', which receives the channels produced "
        f"by {an.producer_name(ins)}. Leave that layer's channels unpruned with "
        f"ignore=['{an.producer_name(ins)}'] (config: model_ignore), or report the op.")


def no_act(an: Analysis, eqn, ins, shapes) -> list[Any]:
    """An op no activation reaches: parameter arithmetic (a BN's ``rsqrt(var) * scale``) keeps
    its parameter axes; a reduction over a parameter axis marks it mixed."""
    name = eqn.primitive.name
    outs = eqn.outvars
    pars = [a for a in ins if isinstance(a, Par)]
    if name in ("conv_general_dilated", "dot_general") and any(
            isinstance(a, Par) for a in ins) and not all(isinstance(a, Par) for a in ins):
        # A layer fed by values the tracer lost track of: still a layer (MACs), its
        # input channels fixed.
        i = next(j for j, a in enumerate(ins) if not isinstance(a, Par))
        if name == "conv_general_dilated":
            axis = eqn.params["dimension_numbers"].lhs_spec[1]
        else:
            (lc, rc), _ = eqn.params["dimension_numbers"]
            axis = (lc if i == 0 else rc)[0] if (lc if i == 0 else rc) else len(shapes[i]) - 1
        ins = list(ins)
        ins[i] = an.act(shapes[i][axis], "a value the tracer does not follow", axis,
                        fixed="computed by ops the tracer does not follow")
        return RULES[name](an, eqn, ins, shapes, ())
    for a in pars:  # a reduction or product over parameter axes mixes their entries
        if name in REDUCE or name in CUMULATIVE or name in (
                "dot_general", "conv_general_dilated", "sort", "top_k"):
            axes = (eqn.params.get("axes") or (eqn.params.get("axis"),)
                    if name not in ("dot_general", "conv_general_dilated") else None)
            for path, ax in a.items:
                mixed = range(len(ax)) if axes is None else [d for d in axes if d is not None]
                an.mixed_axes.update((path, ax[d]) for d in mixed
                                     if d < len(ax) and ax[d] is not None)
    if pars and name in UNARY:
        return [ins[0]] * len(outs)
    if pars and name in NARY and all(isinstance(a, (Par, Const)) for a in ins):
        items = tuple(it for a in pars for it in a.items)
        return [Par(items)]
    if pars and name in ("broadcast_in_dim", "reshape", "squeeze", "transpose",
                         "expand_dims") and len(ins) >= 1 and isinstance(ins[0], Par):
        return [Par(tuple((p, map_axes(name, eqn, shapes[0], ax)) for p, ax in ins[0].items))]
    if name == "broadcast_in_dim" and isinstance(ins[0], Const):
        bd = eqn.params["broadcast_dimensions"]
        return [Const(frozenset(bd[a] for a in ins[0].vary))]
    if name in NARY or name in UNARY:
        return [Const(frozenset(a for x in ins if isinstance(x, Const) for a in x.vary))]
    return [Const(frozenset(vary_all(v.aval))) for v in outs]


# ---- nested jaxprs ------------------------------------------------------------------

def call_rule(an, eqn, ins, shapes, key):
    """Nested jit, custom derivatives (activations), remat: the labels flow through the body."""
    sub = eqn.params[CALLS[eqn.primitive.name]]
    closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
    n = len(closed.jaxpr.invars)
    return run(an, closed.jaxpr, ins[len(ins) - n:], key)


def cond_rule(an, eqn, ins, shapes, key):
    """Each branch is walked; an output laid out alike in all of them ties their spaces."""
    outs = eqn.outvars
    results = [run(an, b.jaxpr, ins[1:], key + (j,))
               for j, b in enumerate(eqn.params["branches"])]
    merged = []
    for anns in zip(*results):
        first = anns[0]
        if all(isinstance(a, Act) for a in anns) and all(
                a.axis == first.axis and np.array_equal(a.cidx, first.cidx) for a in anns):
            for a in anns[1:]:
                for s, t in zip(first.sid, a.sid):
                    if s >= 0 and t >= 0:
                        an.union(int(s), int(t), False)
            merged.append(first)
        else:
            for a in anns:
                an.fix(a, "differs between the branches of a cond")
            merged.append(anns[0] if not any(isinstance(a, Act) for a in anns)
                          else Const(frozenset(vary_all(outs[len(merged)].aval))))
    return merged


def loop_rule(an, eqn, ins, shapes, key):
    """``while``/``scan``: not followed; fine only when the channels are fixed anyway."""
    acts = [a for a in ins if isinstance(a, Act)]
    if an.all_fixed(acts):
        return [an.mixed(acts, f"passed through a loop ('{eqn.primitive.name}')", eqn)
                ] * len(eqn.outvars)
    raise TraceError(
        f"the tracer cannot follow channels through a loop ('{eqn.primitive.name}'; e.g. "
        f"nnx.scan over layers), which receives the channels produced by "
        f"{an.producer_name(ins)}. Unroll the loop, or leave those channels unpruned "
        f"with ignore=['{an.producer_name(ins)}'].")


# ---- elementwise ------------------------------------------------------------------------

def unary_rule(an, eqn, ins, shapes, key):
    return [ins[0]] * len(eqn.outvars)


def barrier_rule(an, eqn, ins, shapes, key):
    """``optimization_barrier`` passes every operand through unchanged."""
    return list(ins)


def nary_rule(an, eqn, ins, shapes, key):
    return [an.elementwise(eqn.primitive.name, ins, shapes)]


# ---- reductions ---------------------------------------------------------------------

def reduce_rule(an, eqn, ins, shapes, key):
    """Over other axes the channels pass; over the channels (LayerNorm, softmax) they are fixed."""
    a, axes = ins[0], tuple(eqn.params["axes"])
    if a.axis in axes:
        an.fix(a, f"reduced over by '{eqn.primitive.name}' (e.g. a LayerNorm or softmax "
                  "over channels)")
        return [Const(frozenset(vary_all(v.aval))) for v in eqn.outvars]
    return [Act(a.axis - sum(d < a.axis for d in axes), a.sid, a.cidx)] * len(eqn.outvars)


def window_rule(an, eqn, ins, shapes, key):
    """Pooling: channels pass unless the window spans them."""
    a = next(x for x in ins if isinstance(x, Act))
    if eqn.params["window_dimensions"][a.axis] != 1 or eqn.params["window_strides"][a.axis] != 1:
        return [an.mixed([a], f"pooled across channels by '{eqn.primitive.name}'", eqn)]
    return [a] * len(eqn.outvars)


def cumulative_rule(an, eqn, ins, shapes, key):
    a = ins[0]
    if eqn.params["axis"] == a.axis:
        return [an.mixed([a], f"accumulated over by '{eqn.primitive.name}'", eqn)]
    return [a]


def _whole_channel_axis(eqn, a: Act, shape) -> int | None:
    """The output axis of a ``gather`` or ``dynamic_slice`` that takes ``a``'s channel axis
    whole and indexes only other axes (a nearest resize, ``x[:, rows]``), else None."""
    if eqn.params["slice_sizes"][a.axis] != shape[a.axis]:
        return None
    if eqn.primitive.name == "dynamic_slice":  # a full-size slice starts at 0 (clamped)
        return a.axis
    dn = eqn.params["dimension_numbers"]
    if a.axis in (*dn.collapsed_slice_dims, *dn.start_index_map, *dn.operand_batching_dims):
        return None
    # The operand axes neither collapsed nor batched are the output's offset dims, in order.
    kept = [d for d in range(len(shape))
            if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    return dn.offset_dims[kept.index(a.axis)]


def gather_rule(an, eqn, ins, shapes, key):
    """Indexing by computed positions: a ``gather`` or ``dynamic_slice`` of an activation
    that takes its channel axis whole (at positions that do not depend on an activation)
    passes the channels; otherwise the tracer cannot tell which channels go where."""
    a = ins[0]
    if eqn.primitive.name in ("gather", "dynamic_slice") and isinstance(a, Act) and not any(
            isinstance(i, Act) for i in ins[1:]):
        axis = _whole_channel_axis(eqn, a, shapes[0])
        if axis is not None:
            return [Act(axis, a.sid, a.cidx)]
    return [an.mixed([a for a in ins if isinstance(a, Act)], "gathered", eqn)]


# ---- the table --------------------------------------------------------------------------

#: Ops whose rule runs even when no activation reaches them: they walk their sub-jaxprs.
LOOKS_INSIDE = frozenset({*CALLS, "cond"})

#: Primitive name -> its rule. The one place that says how each op is handled.
RULES: dict[str, Rule] = {
    **{name: call_rule for name in CALLS},
    "cond": cond_rule,
    "while": loop_rule, "scan": loop_rule,
    **{name: unary_rule for name in UNARY},
    "optimization_barrier": barrier_rule,
    **{name: nary_rule for name in NARY},
    "broadcast_in_dim": layout_rules.broadcast_in_dim_rule,
    "squeeze": layout_rules.squeeze_rule,
    "transpose": layout_rules.transpose_rule,
    "reshape": layout_rules.reshape_rule,
    "concatenate": layout_rules.concatenate_rule,
    "pad": layout_rules.pad_rule,
    "slice": layout_rules.slice_rule,
    "split": layout_rules.split_rule,
    "rev": layout_rules.rev_rule,
    **{name: reduce_rule for name in REDUCE},
    **{name: window_rule for name in WINDOW},
    **{name: cumulative_rule for name in CUMULATIVE},
    **{name: gather_rule for name in ("gather", "scatter", "scatter_add", "dynamic_slice",
                                      "dynamic_update_slice", "sort", "top_k",
                                      "select_and_gather_add")},
    # The layers: they open channel spaces and record the parameter slices they read.
    "conv_general_dilated": layer_rules.conv_rule,
    "dot_general": layer_rules.dot_general_rule,
}
