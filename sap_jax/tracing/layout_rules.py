"""The rules of the layout ops (registered in ``rules.RULES``): they move, join, pad or cut
the channel labels of an activation without computing anything across channels. A channel
axis flattened with others keeps its labels, repeated (NHWC: channel ``i`` at ``p * C + i``).
"""

from __future__ import annotations

import numpy as np

from sap_jax.tracing.labels import Act, Const, constant_along, reshape_groups, vary_all


def broadcast_in_dim_rule(an, eqn, ins, shapes, key):
    a, bd = ins[0], eqn.params["broadcast_dimensions"]
    return [Act(bd[a.axis], a.sid, a.cidx)]


def squeeze_rule(an, eqn, ins, shapes, key):
    a, dims = ins[0], eqn.params["dimensions"]
    return [Act(a.axis - sum(d < a.axis for d in dims), a.sid, a.cidx)]


def transpose_rule(an, eqn, ins, shapes, key):
    a, perm = ins[0], eqn.params["permutation"]
    return [Act(list(perm).index(a.axis), a.sid, a.cidx)]


def reshape_rule(an, eqn, ins, shapes, key):
    """The channel axis survives, or is flattened with others (labels repeat: NHWC channel
    ``i`` at ``p * C + i``); spread over several axes, its channels are fixed."""
    a, old, new = ins[0], shapes[0], tuple(eqn.params["new_sizes"])
    grp = reshape_groups(old, new)
    if len(a.sid) == 1:  # one channel: ambiguous, as any size-1 axis is
        inner = int(np.prod(old[a.axis + 1:]))
        outer = int(np.prod(old[:a.axis]))
        kept = [j for j in range(len(new)) if new[j] == 1 and int(np.prod(new[j + 1:])) == inner
                and int(np.prod(new[:j])) == outer]
        if kept:  # a size-1 axis with the same elements after it: the channel axis survives
            return [Act(kept[0], a.sid, a.cidx)]
        # Flattened: it goes with the axes it is merged with.
        after = [k for k in range(a.axis + 1, len(old)) if old[k] > 1]
        before = [k for k in range(a.axis) if old[k] > 1]
        k = after[0] if after else (before[-1] if before else None)
        for (i0, i1), (j0, j1) in grp:
            if k is not None and i0 <= k < i1 and j1 > j0:
                j = j0 + int(np.argmax(new[j0:j1]))
                return [Act(j, np.repeat(a.sid, new[j]), np.repeat(a.cidx, new[j]))]
    for (i0, i1), (j0, j1) in grp:
        if i0 <= a.axis < i1:
            sub_old, sub_new = old[i0:i1], new[j0:j1]
            shape = [1] * len(sub_old)
            shape[a.axis - i0] = len(a.sid)
            sid = np.broadcast_to(a.sid.reshape(shape), sub_old).reshape(sub_new)
            cidx = np.broadcast_to(a.cidx.reshape(shape), sub_old).reshape(sub_new)
            varying = [d for d in range(len(sub_new)) if sub_new[d] > 1 and not (
                constant_along(sid, d) and constant_along(cidx, d))]
            if len(varying) == 1:
                d = varying[0]
                idx = tuple(slice(None) if k == d else 0 for k in range(len(sub_new)))
                return [Act(j0 + d, sid[idx].copy(), cidx[idx].copy())]
            if not varying and len(sub_new):
                d = int(np.argmax(sub_new)) if max(sub_new) > 1 else 0
                idx = tuple(slice(None) if k == d else 0 for k in range(len(sub_new)))
                return [Act(j0 + d, sid[idx].copy(), cidx[idx].copy())]
    an.fix(a, "reshaped so that channels spread over several axes")
    return [Const(frozenset(vary_all(eqn.outvars[0].aval)))]


def concatenate_rule(an, eqn, ins, shapes, key):
    """Along the channel axis the label arrays join (a constant piece: unowned positions)."""
    dim = eqn.params["dimension"]
    acts = [a for a in ins if isinstance(a, Act)]
    if all(isinstance(a, Act) and a.axis == dim for a in ins):
        return [Act(dim, np.concatenate([a.sid for a in ins]),
                    np.concatenate([a.cidx for a in ins]))]
    if any(isinstance(a, Act) and a.axis == dim for a in ins):
        parts = [(a.sid, a.cidx) if isinstance(a, Act) else
                 (np.full(s[dim], -1), np.zeros(s[dim], int)) for a, s in zip(ins, shapes)]
        return [Act(dim, np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]))]
    # Along another axis: the pieces must carry the same channels.
    return [an.elementwise("concatenate", [a for a in ins], shapes) if len(acts) == len(ins)
            else an.mixed(acts, "concatenated with a constant", eqn)]


def pad_rule(an, eqn, ins, shapes, key):
    a, cfg = ins[0], eqn.params["padding_config"]
    lo, hi, interior = cfg[a.axis]
    if (lo, hi, interior) == (0, 0, 0):
        return [a]
    n = len(a.sid)
    m = n + max(n - 1, 0) * interior
    sid, cidx = np.full(m, -1), np.zeros(m, int)
    sid[::interior + 1], cidx[::interior + 1] = a.sid, a.cidx
    sid = np.concatenate([np.full(max(lo, 0), -1), sid, np.full(max(hi, 0), -1)])
    cidx = np.concatenate([np.zeros(max(lo, 0), int), cidx, np.zeros(max(hi, 0), int)])
    sid = sid[max(-lo, 0):len(sid) - max(-hi, 0)]
    cidx = cidx[max(-lo, 0):len(cidx) - max(-hi, 0)]
    return [an.check_partial(a, Act(a.axis, sid, cidx), "cropped by 'pad'")]


def slice_rule(an, eqn, ins, shapes, key):
    a = ins[0]
    start, limit = eqn.params["start_indices"][a.axis], eqn.params["limit_indices"][a.axis]
    step = (eqn.params["strides"] or [1] * len(shapes[0]))[a.axis]
    out = Act(a.axis, a.sid[start:limit:step], a.cidx[start:limit:step])
    return [an.check_partial(a, out, "partly selected by 'slice'")]


def split_rule(an, eqn, ins, shapes, key):
    a, axis, sizes = ins[0], eqn.params["axis"], eqn.params["sizes"]
    if axis != a.axis:
        return [a] * len(sizes)
    bounds = np.cumsum([0, *sizes])
    return [an.check_partial(a, Act(a.axis, a.sid[b0:b1], a.cidx[b0:b1]), "split")
            for b0, b1 in zip(bounds[:-1], bounds[1:])]


def rev_rule(an, eqn, ins, shapes, key):
    a = ins[0]
    if a.axis in eqn.params["dimensions"]:
        return [Act(a.axis, a.sid[::-1].copy(), a.cidx[::-1].copy())]
    return [a]
