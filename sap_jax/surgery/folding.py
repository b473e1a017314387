"""Folding batch norm into the convolution before it, for deployment: :func:`fold_bn`.

In eval mode a BatchNorm is a per-channel affine map, ``(y - mean) * scale / sqrt(var + eps) +
bias``. When its input is exactly a convolution's output, the map can be moved into the conv:
the kernel's output channel ``c`` is scaled by ``s_c = scale_c / sqrt(var_c + eps)`` and the conv
gets the bias ``(b_c - mean_c) * s_c + bias_c`` (``b``: the conv's own bias, 0 without one). The
BatchNorm becomes :class:`FoldedBatchNorm`, the identity; the forward then skips one pass over
every such activation.

Which BatchNorms follow a conv is read from the jaxpr of the model's eval-mode forward, as the
tracer reads channel groups (:mod:`sap_jax.tracing`), not from attribute names: a
``conv_general_dilated`` whose kernel is an ``nnx.Conv``'s, whose output (after that conv's own
bias add, if it has one) nothing but one ``nnx.BatchNorm``'s normalisation reads (the
subtraction of its running mean). A BN after an addition, a concatenation or an activation
(pre-activation blocks), a conv whose output something else reads too, a conv or a BN called
twice, or a BN computing in another dtype than its conv: left as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from sap_jax import models as M
from sap_jax.structure import groups as G
from sap_jax.structure.codec import path_str
from sap_jax.tracing.build import module_getter
from sap_jax.tracing.labels import CALLS

#: Ops that only re-lay out or re-type one array: a parameter read through them is still that
#: parameter (a BN's mean reshaped to broadcast, a kernel cast to the compute dtype).
_LAYOUT = {"reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "expand_dims",
           "copy", "copy_p"}
#: The arrays of an nnx.BatchNorm.
_BN_ARRAYS = ("scale", "bias", "mean", "var")


class FoldedBatchNorm(nnx.Module):
    """What :func:`fold_bn` leaves in place of a BatchNorm folded into the conv before it: the
    identity. It accepts (and ignores) BatchNorm's call arguments (``use_running_average``,
    ``mask``), and keeps those of the BatchNorm's arrays that code outside the BatchNorm reads
    (the built-in blocks read ``bn.scale`` as a runtime anchor), unchanged."""

    def __init__(self, num_features: int, kept: dict[str, nnx.Variable] | None = None):
        self.num_features = num_features
        for name, var in (kept or {}).items():
            setattr(self, name, var)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        del args, kwargs
        return x


# --------------------------------------------------------------- the forward as a graph

@dataclasses.dataclass(eq=False)
class _Eqn:
    """One primitive of the forward, nested calls inlined; operands and results as value ids
    (None: a literal)."""
    name: str
    params: Any
    ins: tuple[int | None, ...]
    outs: tuple[int, ...]


@dataclasses.dataclass
class _Graph:
    uses: dict[int, list[_Eqn]] = dataclasses.field(default_factory=dict)
    origin: dict[int, int] = dataclasses.field(default_factory=dict)  # value -> state leaf
    eqns: list[_Eqn] = dataclasses.field(default_factory=list)
    n: int = 0

    def new(self) -> int:
        self.n += 1
        self.uses[self.n] = []
        return self.n

    def terminal(self, v: int) -> list[_Eqn]:
        """The ops that read ``v``, looking through layout ops."""
        out = []
        for e in self.uses[v]:
            out += self.terminal(e.outs[0]) if e.name in _LAYOUT else [e]
        return out


def _walk(jaxpr: jcore.Jaxpr, args: Sequence[int | None], g: _Graph) -> list[int | None]:
    env: dict[Any, int | None] = {}

    def read(v):
        return None if isinstance(v, jcore.Literal) else env[v]

    for v in jaxpr.constvars:
        env[v] = g.new()
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in CALLS:  # inlined: the values inside are the values outside
            sub = eqn.params[CALLS[name]]
            inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
            outs = _walk(inner, ins[len(ins) - len(inner.invars):], g)
        else:  # anything else (cond and loops included) is one opaque reader of its operands
            outs = [g.new() for _ in eqn.outvars]
            e = _Eqn(name, eqn.params, tuple(ins), tuple(outs))
            g.eqns.append(e)
            for i in dict.fromkeys(ins):
                if i is not None:
                    g.uses[i].append(e)
            if name in _LAYOUT and ins and ins[0] in g.origin:
                g.origin[outs[0]] = g.origin[ins[0]]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _forward_graph(model: nnx.Module, x: jax.ShapeDtypeStruct
                   ) -> tuple[_Graph, tuple[G.Path, ...]]:
    """The eval-mode forward of ``model`` on ``x`` as a graph, and the path of every state
    leaf (leaf ``i`` is value ``i + 1``)."""
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = tuple(path_str(p) for p, _ in flat)

    def pure(leaves, x):
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        m.eval()
        return m(x)

    avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for _, a in flat]
    closed = jax.make_jaxpr(pure)(avals, x)
    g = _Graph()
    leaves = [g.new() for _ in paths]
    g.origin.update({v: v for v in leaves})
    out = _walk(closed.jaxpr, [*leaves, g.new()], g)
    output = _Eqn("output", {}, tuple(out), ())
    for v in out:
        if v is not None:
            g.uses[v].append(output)
    return g, paths


def _sample(model: nnx.Module, sample: Any) -> jax.ShapeDtypeStruct:
    if sample is None or isinstance(sample, int):
        if not isinstance(model, M.PrunableModel):
            raise ValueError(f"fold_bn: give a {type(model).__name__} a sample input (a batch "
                             "or its shape, e.g. (1, 32, 32, 3)).")
        size = model.total_stride if sample is None else sample
        hw = model.check_image_size(size)
        return jax.ShapeDtypeStruct((1, *hw, model.in_channels), jnp.float32)
    if isinstance(sample, (tuple, list)) and all(isinstance(s, int) for s in sample):
        return jax.ShapeDtypeStruct(tuple(sample), jnp.float32)
    if hasattr(sample, "shape") and hasattr(sample, "dtype"):
        return jax.ShapeDtypeStruct(tuple(sample.shape), sample.dtype)
    return jax.ShapeDtypeStruct(np.shape(sample), jnp.float32)


# --------------------------------------------------------------- finding the pairs

def conv_bn_pairs(model: nnx.Module, sample: Any = None) -> list[tuple[str, str]]:
    """``[(conv path, BatchNorm path), ...]`` (dotted, e.g. ``"stages.0.0.conv1"``) of every
    BatchNorm :func:`fold_bn` folds into the conv before it, in forward order.

    ``sample``: as for :func:`fold_bn`.
    """
    return [(".".join(c), ".".join(b)) for c, b in _pairs(model, _sample(model, sample))]


def _pairs(model: nnx.Module, x: jax.ShapeDtypeStruct) -> list[tuple[G.Path, G.Path]]:
    g, paths = _forward_graph(model, x)
    leaf_of = {p: i + 1 for i, p in enumerate(paths)}
    path_of = {i + 1: p for i, p in enumerate(paths)}
    get = module_getter(model)

    def leaf(v: int | None) -> G.Path | None:
        return None if v is None or v not in g.origin else path_of[g.origin[v]]

    def only_reader(v: int, name: str) -> _Eqn | None:
        us = g.uses[v]
        return us[0] if len(us) == 1 and us[0].name == name else None

    pairs = []
    for e in g.eqns:
        if e.name != "conv_general_dilated":
            continue
        kp = leaf(e.ins[1])
        conv = get(kp[:-1]) if kp else None
        if not isinstance(conv, nnx.Conv) or kp[-1] != "kernel" \
                or g.terminal(leaf_of[kp]) != [e]:
            continue  # not an nnx.Conv's kernel, or its kernel is read elsewhere too
        dims = e.params["dimension_numbers"]
        ndim = len(dims.out_spec)
        if dims.out_spec[1] != ndim - 1:
            continue  # channels not last
        y = e.outs[0]
        if conv.use_bias and conv.bias is not None:  # the conv's own bias add
            add = only_reader(y, "add")
            bp = kp[:-1] + ("bias",)
            if add is None or bp not in leaf_of or g.terminal(leaf_of[bp]) != [add] or \
                    {leaf(v) for v in add.ins if v != y} != {bp}:
                continue
            y = add.outs[0]
        sub = only_reader(y, "sub")
        if sub is None or sub.ins[0] != y:
            continue
        mp = leaf(sub.ins[1])
        bn = get(mp[:-1]) if mp else None
        if not isinstance(bn, nnx.BatchNorm) or mp[-1] != "mean" \
                or type(bn).__call__ is not nnx.BatchNorm.__call__:
            continue  # not a BatchNorm, or one with its own arithmetic
        vp = mp[:-1] + ("var",)
        # One eval-mode call: the running mean and variance are read once each (a train-mode
        # call, or a second call, would read them again).
        if g.terminal(leaf_of[mp]) != [sub] or vp not in leaf_of \
                or len(g.terminal(leaf_of[vp])) != 1:
            continue
        if bn.axis not in (-1, ndim - 1) or bn.num_features != conv.out_features \
                or bn.dtype != conv.dtype:
            continue
        pairs.append((kp[:-1], mp[:-1]))
    return pairs


# --------------------------------------------------------------- folding

def _set(model: nnx.Module, path: G.Path, value: nnx.Module) -> None:
    parent = module_getter(model)(path[:-1])
    key = path[-1]
    if isinstance(parent, nnx.Module) and hasattr(parent, key):
        setattr(parent, key, value)
    else:
        parent[int(key) if isinstance(parent, (list, nnx.List)) else key] = value


def _fold_one(conv: nnx.Conv, bn: nnx.BatchNorm) -> None:
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    c = bn.num_features
    scale = f64(bn.scale) if bn.scale is not None else np.ones(c)
    shift = f64(bn.bias) if bn.bias is not None else np.zeros(c)
    s = scale / np.sqrt(f64(bn.var) + bn.epsilon)
    b = f64(conv.bias) if conv.use_bias and conv.bias is not None else np.zeros(c)
    kernel = conv.kernel[...]
    conv.kernel.set_value(jnp.asarray(np.asarray(kernel, np.float64) * s, kernel.dtype))
    bias = (b - f64(bn.mean)) * s + shift
    if conv.use_bias and conv.bias is not None:
        conv.bias.set_value(jnp.asarray(bias, conv.bias[...].dtype))
    else:
        conv.bias = nnx.Param(jnp.asarray(bias, conv.param_dtype))
        conv.use_bias = True


def _identity(bn: nnx.Module, keep: Any) -> FoldedBatchNorm:
    """The identity in place of ``bn``, with those of its arrays ``keep(name)`` says."""
    return FoldedBatchNorm(bn.num_features, {
        n: getattr(bn, n) for n in _BN_ARRAYS
        if isinstance(getattr(bn, n, None), nnx.Variable) and keep(n)})


def fold_bn(model: nnx.Module, sample: Any = None) -> nnx.Module:
    """A copy of ``model`` with every BatchNorm that directly follows a conv folded into it.

    The folded model is for **inference only**: it is returned in eval mode and computes what
    ``model`` computes in eval mode (with the BatchNorms' running statistics), up to float
    rounding. Training it, gating it (``model(x, arch)``), its ``structure()``, extracting from
    it or saving it are meaningless: those describe the unfolded model (keep that one).

    Args:
      model: any NNX module mapping a batch of NHWC images to its outputs: a built-in
        :class:`~sap_jax.models.PrunableModel`, a pruned one, a
        :class:`~sap_jax.models.TracedModel` or any other module. It is not changed.
      sample: how the forward is traced: an input batch or its shape (``(1, 32, 32, 3)``), or
        for a PrunableModel an image size (its smallest valid size when omitted; which
        BatchNorms follow a conv does not depend on it).

    Returns:
      A new model of the same class in which each folded BatchNorm is a
      :class:`FoldedBatchNorm` (the identity) and its conv has the scaled kernel and a bias
      (:func:`conv_bn_pairs` lists them). BatchNorms that do not directly follow a conv stay.
    """
    x = _sample(model, sample)
    if isinstance(model, M.PrunableModel) and not isinstance(model, M.TracedModel):
        # A built-in backbone caches its structure per class and config, which the folded
        # model shares: fill it from the unfolded model first.
        model.structure(tuple(x.shape[1:3]))
    pairs = _pairs(model, x)
    folded = nnx.clone(model)
    get = module_getter(folded)
    for cp, bp in pairs:
        bn = get(bp)
        _fold_one(get(cp), bn)
        _set(folded, bp, _identity(bn, lambda name: True))
    if pairs:
        # Keep only the arrays of the folded BatchNorms that the folded forward still reads.
        g, paths = _forward_graph(folded, x)
        read = {p for i, p in enumerate(paths) if g.uses[i + 1]}
        for _, bp in pairs:
            _set(folded, bp, _identity(get(bp), lambda name, bp=bp: bp + (name,) in read))
    folded.eval()
    return folded


def folded_batch_norms(model: nnx.Module) -> list[str]:
    """The paths of the BatchNorms :func:`fold_bn` folded in ``model`` (empty if none)."""
    return [".".join(G.as_path(p)) for p, m in nnx.iter_graph(model)
            if isinstance(m, FoldedBatchNorm)]


__all__ = ["fold_bn", "conv_bn_pairs", "folded_batch_norms", "FoldedBatchNorm"]
