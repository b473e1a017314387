"""The rules of the ops that are layers (registered in ``rules.RULES``): a convolution or a
matrix product with a parameter kernel opens a new channel space for its output, records the
kernel slices each channel owns and the layer itself (for MACs), and marks the operand the
gated forward multiplies by the gate of its channels.
"""

from __future__ import annotations

import numpy as np

from sap_jax.tracing.analysis import Analysis, LayerRec
from sap_jax.tracing.labels import Act, Const, Par, vary_all


def conv_rule(an: Analysis, eqn, ins, shapes, key):
    """``conv_general_dilated``: plain (in/out slices), depthwise (channels pass, a
    ``depthwise`` slice) or grouped (input and output fixed). A transposed conv
    (``nnx.ConvTranspose``) is one with an input dilation; strides, dilations and padding
    are recorded for the MAC count."""
    x, w = ins
    dn = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    out_shape = eqn.outvars[0].aval.shape
    cin, cout = shapes[0][lhs_spec[1]], out_shape[out_spec[1]]
    g = eqn.params["feature_group_count"]
    if not isinstance(x, Act) or x.axis != lhs_spec[1] or not isinstance(w, Par) \
            or len(w.items) != 1 or eqn.params["batch_group_count"] != 1:
        reason = "convolved with a kernel that is not a parameter" if isinstance(x, Act) \
            else "convolved over a non-channel axis"
        return [an.mixed([a for a in ins if isinstance(a, Act)], reason, eqn)]
    path, axes = w.items[0]
    module = path[:-1] or path  # a bare parameter on the model: name it by itself
    kernel = tuple(int(shapes[1][d]) for d in rhs_spec[2:4])
    out_hw = tuple(int(out_shape[d]) for d in out_spec[2:4])
    in_hw = tuple(int(shapes[0][d]) for d in lhs_spec[2:4])
    stride, dilation, lhs_dilation = (tuple(int(v) for v in eqn.params[k]) for k in (
        "window_strides", "rhs_dilation", "lhs_dilation"))
    pad = tuple(tuple(int(p) for p in q) for q in eqn.params["padding"])
    # The described convention (ConvLayer): "same" padding k // 2, no dilation; else the
    # padding and input size are kept for the MAC count.
    usual = all(p == (k // 2, k // 2) for p, k in zip(pad, kernel)) and in_hw == tuple(
        o * s for o, s in zip(out_hw, stride)) and dilation == lhs_dilation == (1, 1)
    rec = LayerRec("conv", module, kernel=kernel, out_hw=out_hw, stride=stride,
                   dilation=dilation, lhs_dilation=lhs_dilation, groups=g,
                   ins=(x.sid, x.cidx), padding=None if usual else (pad, in_hw))
    an.layers.append(rec)
    an.consumers[key] = (0, x)
    if (g == cin > 1 and cout == cin) or (module in an.depthwise and cout == cin):
        out = Act(out_spec[1], x.sid, x.cidx)
        rec.depthwise = True
        an.record("depthwise", path, axes[rhs_spec[0]], x.sid, x.cidx)
    elif g == 1:
        an.record("in", path, axes[rhs_spec[1]], x.sid, x.cidx)
        out = an.act(cout, ".".join(module), out_spec[1])
        an.record("out", path, axes[rhs_spec[0]], out.sid, out.cidx)
    else:
        an.fix(x, f"mixed by the grouped convolution {'.'.join(module)} "
                  f"(feature_group_count={g})")
        rec.depthwise = g == cin
        out = an.act(cout, ".".join(module), out_spec[1],
                     fixed=f"produced by the grouped convolution {'.'.join(module)}")
    rec.out = (out.sid, out.cidx)
    return [out]


def _free_axes(eqn, shapes) -> list[list[int]]:
    """Each ``dot_general`` operand's axes that are neither contracted nor batched."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return [[d for d in range(len(shapes[i])) if d not in (lc, rc)[i] and d not in (lb, rb)[i]]
            for i in (0, 1)]


def _free_axis_position(eqn, operand: int, axis: int, shapes) -> int | None:
    """Where ``dot_general`` puts axis ``axis`` of operand ``operand`` in its output when that
    axis is neither contracted nor batched (output: batch axes, lhs free, rhs free); else None."""
    (_, (lb, _)) = eqn.params["dimension_numbers"]
    free = _free_axes(eqn, shapes)
    if axis not in free[operand]:
        return None
    return len(lb) + (len(free[0]) if operand == 1 else 0) + free[operand].index(axis)


def _count_product(an: Analysis, eqn, ins, shapes, passing: Act | None = None) -> None:
    """A matrix product that is not a parameter layer (attention's QKᵀ and AV, a bilinear
    resize's interpolation matrix) still costs MACs: output elements times the contracted
    size, per image. When an activation's channels pass through it (``passing``), the count
    is per channel of theirs, so it follows their kept width."""
    (lc, _), _ = eqn.params["dimension_numbers"]
    macs = int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([shapes[0][d] for d in lc]))
    macs //= an.images
    n = sum(r.kind == "product" for r in an.layers)
    rec = LayerRec("product", (*an.producer_name(ins).split("."), f"product{n}"))
    if passing is None:
        rec.out, rec.tokens = 1, macs
    else:
        rec.out, rec.tokens = (passing.sid, passing.cidx), macs // len(passing.sid)
    an.layers.append(rec)


def _batched_pair(an: Analysis, eqn, ins, shapes) -> Act | None:
    """Two activations multiplied with their channel axes batched together (attention's QKᵀ
    and AV with heads as channels): channel i of the output reads only channel i of each, so
    their spaces are tied (one head is one unit across q, k and v) and the channels pass at
    the batch position. None when the product is laid out otherwise."""
    (_, (lb, rb)) = eqn.params["dimension_numbers"]
    x, y = ins
    if x.axis not in lb or y.axis not in rb or list(lb).index(x.axis) != list(rb).index(y.axis):
        return None
    an.elementwise(eqn.primitive.name, [Act(0, x.sid, x.cidx), Act(0, y.sid, y.cidx)], [])
    return Act(list(lb).index(x.axis), x.sid, x.cidx)


def dot_general_rule(an: Analysis, eqn, ins, shapes, key):
    """``dot_general``: a linear layer when one operand is an activation contracted over its
    channels and the other a parameter; along another axis (token mixing) channels pass.

    A kernel with several output axes (``nnx.LinearGeneral``'s heads x head_dim) gives its
    outermost one the channels: a unit is one head, the axes after it come along whole. An
    input contracted over several axes (attention's output projection over heads x head_dim)
    is read per channel of its channel axis likewise."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    acts = [i for i, a in enumerate(ins) if isinstance(a, Act)]
    ai = acts[0]
    x, w = ins[ai], ins[1 - ai]
    if len(acts) == 2:
        out = _batched_pair(an, eqn, ins, shapes)
        _count_product(an, eqn, ins, shapes, out)
        if out is not None:
            return [out]
        return [an.mixed([ins[i] for i in acts], "multiplied with another activation along "
                         "other axes than a shared batch axis", eqn)]
    if not isinstance(w, Par) or len(w.items) != 1:
        # A computed matrix along other axes (a bilinear resize): the channels pass.
        axis = _free_axis_position(eqn, ai, x.axis, shapes)
        _count_product(an, eqn, ins, shapes, x if axis is not None else None)
        if axis is not None:
            return [Act(axis, x.sid, x.cidx)]
        return [an.mixed([x], "multiplied with a computed matrix", eqn)]
    xc, wc = (lc, rc) if ai == 0 else (rc, lc)
    xb = lb if ai == 0 else rb
    path, axes = w.items[0]
    if x.axis in xb:
        return [an.mixed([x], "used as a batch axis of a matrix product", eqn)]
    axis = _free_axis_position(eqn, ai, x.axis, shapes)
    if axis is not None:  # a product along another axis (token mixing): channels pass
        return [Act(axis, x.sid, x.cidx)]
    module = path[:-1] or path  # a bare parameter on the model: name it by itself
    name = ".".join(module)
    free = _free_axes(eqn, shapes)
    x_free, w_free = free[ai], free[1 - ai]
    rows = int(np.prod([shapes[ai][d] for d in x_free[1:]])) if len(x_free) > 1 else 1
    # Contracted over the channel axis (and maybe others, e.g. head_dim): each channel owns
    # the kernel's slice along the matching axis, and ``inner`` of the layer's inputs.
    inner = int(np.prod([shapes[ai][d] for d in xc if d != x.axis]))
    an.consumers[key] = (ai, x)
    an.record("in", path, axes[wc[list(xc).index(x.axis)]], x.sid, x.cidx)
    rec = LayerRec("dense", module, ins=(np.repeat(x.sid, inner), np.repeat(x.cidx, inner)),
                   tokens=rows)
    an.layers.append(rec)
    big = [d for d in w_free if axes[d] is not None]  # the kernel's output axes
    if not big:  # a kernel whose output axes the tracer lost (stored flat and reshaped)
        rec.out = int(np.prod([shapes[1 - ai][d] for d in w_free]))
        if not w_free:
            return [Const(frozenset(vary_all(eqn.outvars[0].aval)))]
        d = w_free[-1]  # fixed labels, so that the layers after it are still seen
        return [an.act(shapes[1 - ai][d], name, _free_axis_position(eqn, 1 - ai, d, shapes),
                       fixed=f"produced by {name} along a kernel axis the tracer lost")]
    d = big[0]  # the outermost: an attention projection's heads
    inner = int(np.prod([shapes[1 - ai][e] for e in w_free if e != d]))
    out = an.act(shapes[1 - ai][d], name, _free_axis_position(eqn, 1 - ai, d, shapes))
    an.record("out", path, axes[d], out.sid, out.cidx)
    rec.out = (np.repeat(out.sid, inner), np.repeat(out.cidx, inner))
    return [out]
