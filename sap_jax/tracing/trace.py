"""Channel groups of any Flax NNX CNN, found by tracing its forward pass.

:func:`structure` returns the same :class:`~sap_jax.structure.groups.Structure` the built-in backbones
write by hand (``describe()``), derived from the jaxpr of the model's pure forward
(``nnx.split`` the model, ``jax.make_jaxpr`` over its state). Every array in the jaxpr gets an
annotation:

* an **activation** carries, along its channel axis, a label per position: which *channel
  space* (one per conv or linear output, the model input, ...) and which channel of it sits
  there. Concatenation, padding and flattening rearrange labels; elementwise ops between two
  activations tie their spaces together position by position (union-find);
* a **parameter-derived** value remembers which parameter axes its axes came from, so a BN
  scale or a conv kernel meeting an activation becomes a per-channel slice of that parameter;
* anything else is a constant.

A space becomes one channel group. It is *coupled* when an addition (a residual stream) tied
it to a space another layer produced, and *fixed* when pruning it could not be done
exactly: it is the input or the output, a grouped (non-depthwise) convolution mixes it, an
op reduces over it (LayerNorm over channels, softmax), it is only partly used, or a layer
named in ``ignore`` produces it. By default only uncoupled, unfixed groups are prunable (as
the paper prunes inner widths); ``prune="all"`` adds the coupled ones.

:func:`gated_call` runs the model with one keep vector per group without changing its code:
a small jaxpr interpreter multiplies the input of every convolution and linear layer that
reads a group's channels by that group's vector, exactly where the built-in backbones call
``gate``. :func:`extract` slices every tensor a group owns and returns a genuinely smaller
copy of the module with its size attributes updated.

An op the tracer does not know stops with :class:`TraceError`, naming the op and the layer
that produced the channels reaching it, and how to leave that layer's channels alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from sap_jax.structure import groups as G
from sap_jax.structure.codec import path_str

PRUNE = ("inner", "all")
_DEPTHWISE = "sap_depthwise"  # set on a depthwise nnx.Conv that surgery resized
_NORM_TYPES = (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
_NORM_ROLES = {"scale": "bn_scale", "bias": "bn_bias", "mean": "bn_mean", "var": "bn_var"}


class TraceError(ValueError):
    """The tracer met something it cannot follow; the message says what to do."""


# --------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------

@dataclasses.dataclass
class _Act:
    """An activation: ``sid[p], cidx[p]`` = space and channel at position p of ``axis``."""
    axis: int
    sid: np.ndarray
    cidx: np.ndarray


@dataclasses.dataclass
class _Par:
    """Derived from parameters only: ``items`` = ((param path, param axis of each axis), ...)."""
    items: tuple[tuple[G.Path, tuple[int | None, ...]], ...]


@dataclasses.dataclass
class _Const:
    """Anything else; ``vary`` = axes along which it may differ."""
    vary: frozenset[int]


_UNARY = {
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "square", "integer_pow", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "not", "convert_element_type", "reduce_precision", "copy",
    "copy_p", "stop_gradient", "real", "imag", "conj", "sharding_constraint", "pvary",
    "optimization_barrier", "mesh_cast", "reshard", "bitcast_convert_type"}
_ADDITIVE = {"add", "sub", "add_any", "max", "min", "select_n", "clamp"}
_NARY = _ADDITIVE | {"mul", "div", "pow", "atan2", "rem", "nextafter", "and", "or", "xor", "eq",
                     "ne", "gt", "ge", "lt", "le", "igamma", "igammac"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "argmax", "argmin", "reduce_xor"}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_NO_ACT = {"iota", "platform_index", "random_bits", "random_seed", "random_wrap", "random_unwrap",
           "random_split", "random_fold_in", "threefry2x32", "rng_bit_generator"}


@dataclasses.dataclass
class _Record:
    """One per-channel use of a parameter: ``kind`` in out/in/depthwise/param."""
    kind: str
    path: G.Path
    axis: int
    ndim: int
    sid: np.ndarray
    cidx: np.ndarray


@dataclasses.dataclass
class _LayerRec:
    """A conv, linear or normalisation layer seen in the forward, before groups are numbered."""
    kind: str  # conv | dense
    path: G.Path  # module path
    ins: tuple[np.ndarray, np.ndarray] | int = 0
    out: tuple[np.ndarray, np.ndarray] | int = 0
    kernel: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    stride: int = 1
    groups: int = 1
    depthwise: bool = False
    tokens: int = 1
    padding: Any = None  # ((pad_h, pad_w), in_hw) when not the usual convention


class _Analysis:
    """Labels every array of a closed jaxpr (see the module docstring)."""

    def __init__(self, leaf_ndims: dict[G.Path, int], ignore: Sequence[str] = (),
                 strict: bool = True, depthwise: Sequence[G.Path] = ()):
        self.leaf_ndims = dict(leaf_ndims)
        self.depthwise = set(depthwise)  # convs known to be depthwise (even at one channel)
        # (param path, param axis) pairs whose entries a reduction or product mixed (weight
        # standardisation, spectral norm): a channel there cannot be cut on its own.
        self.mixed: set[tuple[G.Path, int]] = set()
        self.ignore = set(ignore)  # producers whose spaces are fixed from the start
        self.strict = strict  # raise on an unknown op (else: its channels are fixed)
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []  # who produced the space, for messages
        self.fixed: dict[int, str] = {}
        self.coupled: set[int] = set()
        self.records: list[_Record] = []
        self.layers: list[_LayerRec] = []
        self.consumers: dict[tuple[int, ...], tuple[int, _Act]] = {}  # eqn key -> (operand, labels)

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
        self.records.append(_Record(kind, path, axis, self.leaf_ndims[path], sid, cidx))

    def fix_ids(self, ids, reason: str) -> None:
        for i in set(int(s) for s in np.asarray(ids).ravel() if s >= 0):
            self.fixed.setdefault(self.find(i), reason)

    def fix(self, ann: Any, reason: str) -> None:
        if isinstance(ann, _Act):
            self.fix_ids(ann.sid, reason)

    def act(self, size: int, name: str, axis: int, fixed: str | None = None) -> _Act:
        s = self.new_space(size, name, fixed or ("ignored" if name in self.ignore else None))
        return _Act(axis, np.full(size, s), np.arange(size))

    # ---- walking ----------------------------------------------------------------
    def run(self, jaxpr: jcore.Jaxpr, ins: Sequence[Any], key: tuple[int, ...] = ()) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return _Const(frozenset())
            return env.get(v, _Const(frozenset(_vary_all(v.aval))))

        for v, a in zip(jaxpr.invars, ins):
            env[v] = a
        for i, eqn in enumerate(jaxpr.eqns):
            outs = self.eqn(eqn, [read(v) for v in eqn.invars], key + (i,))
            for v, a in zip(eqn.outvars, outs):
                env[v] = a
        return [read(v) for v in jaxpr.outvars]

    def producer_name(self, anns: Sequence[Any]) -> str:
        for a in anns:
            if isinstance(a, _Act):
                return self.name[int(a.sid[a.sid >= 0][0])] if (a.sid >= 0).any() else "?"
        return "?"

    def eqn(self, eqn, ins: list[Any], key: tuple[int, ...]) -> list[Any]:
        name = eqn.primitive.name
        outs = eqn.outvars
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        acts = [a for a in ins if isinstance(a, _Act)]
        if name in _CALLS:  # nested jit, custom derivatives (activations), remat: look inside
            sub = eqn.params[_CALLS[name]]
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            n = len(closed.jaxpr.invars)
            return self.run(closed.jaxpr, ins[len(ins) - n:], key)
        if name == "cond":
            results = [self.run(b.jaxpr, ins[1:], key + (j,)) for j, b in enumerate(eqn.params["branches"])]
            merged = []
            for anns in zip(*results):
                first = anns[0]
                if all(isinstance(a, _Act) for a in anns) and all(
                        a.axis == first.axis and np.array_equal(a.cidx, first.cidx) for a in anns):
                    for a in anns[1:]:
                        for s, t in zip(first.sid, a.sid):
                            if s >= 0 and t >= 0:
                                self.union(int(s), int(t), False)
                    merged.append(first)
                else:
                    for a in anns:
                        self.fix(a, "differs between the branches of a cond")
                    merged.append(anns[0] if not any(isinstance(a, _Act) for a in anns)
                                  else _Const(frozenset(_vary_all(outs[len(merged)].aval))))
            return merged
        if not acts:
            return self._no_act(name, eqn, ins, shapes)
        if name in _UNARY:
            return [ins[0]] * len(outs) if name != "optimization_barrier" else list(ins)
        if name in _NARY:
            return [self._elementwise(name, ins, shapes)]
        handler = getattr(self, "_" + name, None)
        if handler is None and name in _REDUCE:
            handler = self._reduce
        if handler is None and name in _WINDOW:
            handler = self._window
        if handler is None and name in _CUMULATIVE:
            handler = self._cumulative
        if handler is None and (not self.strict or all(
                self.find(int(t)) in self.fixed for a in acts for t in a.sid if t >= 0)):
            return [self._mixed(acts, f"passed through the op '{name}'", eqn)] * len(outs)
        if handler is None:
            raise TraceError(
                f"the tracer does not know the op '{name}', which receives the channels produced "
                f"by {self.producer_name(ins)}. Leave that layer's channels unpruned with "
                f"ignore=['{self.producer_name(ins)}'] (config: model_ignore), or report the op.")
        return handler(eqn, ins, shapes, key)

    def _no_act(self, name, eqn, ins, shapes) -> list[Any]:
        outs = eqn.outvars
        pars = [a for a in ins if isinstance(a, _Par)]
        if name in ("conv_general_dilated", "dot_general") and any(
                isinstance(a, _Par) for a in ins) and not all(isinstance(a, _Par) for a in ins):
            # A layer fed by values the tracer lost track of: still a layer (MACs), its
            # input channels fixed.
            i = next(j for j, a in enumerate(ins) if not isinstance(a, _Par))
            if name == "conv_general_dilated":
                axis = eqn.params["dimension_numbers"].lhs_spec[1]
            else:
                (lc, rc), _ = eqn.params["dimension_numbers"]
                axis = (lc if i == 0 else rc)[0] if (lc if i == 0 else rc) else len(shapes[i]) - 1
            ins = list(ins)
            ins[i] = self.act(shapes[i][axis], "a value the tracer does not follow", axis,
                              fixed="computed by ops the tracer does not follow")
            return getattr(self, "_" + name)(eqn, ins, shapes, ())
        for a in pars:  # a reduction or product over parameter axes mixes their entries
            if name in _REDUCE or name in _CUMULATIVE or name in (
                    "dot_general", "conv_general_dilated", "sort", "top_k"):
                axes = (eqn.params.get("axes") or (eqn.params.get("axis"),)
                        if name not in ("dot_general", "conv_general_dilated") else None)
                for path, ax in a.items:
                    mixed = range(len(ax)) if axes is None else [d for d in axes if d is not None]
                    self.mixed.update((path, ax[d]) for d in mixed if d < len(ax) and ax[d] is not None)
        if pars and name in _UNARY:
            return [ins[0]] * len(outs)
        if pars and name in _NARY and all(isinstance(a, (_Par, _Const)) for a in ins):
            items = tuple(it for a in pars for it in a.items)
            return [_Par(items)]
        if pars and name in ("broadcast_in_dim", "reshape", "squeeze", "transpose",
                             "expand_dims") and len(ins) >= 1 and isinstance(ins[0], _Par):
            return [_Par(tuple((p, _map_axes(name, eqn, shapes[0], ax)) for p, ax in ins[0].items))]
        if name == "broadcast_in_dim" and isinstance(ins[0], _Const):
            bd = eqn.params["broadcast_dimensions"]
            return [_Const(frozenset(bd[a] for a in ins[0].vary))]
        if name in _NARY or name in _UNARY:
            return [_Const(frozenset(a for x in ins if isinstance(x, _Const) for a in x.vary))]
        return [_Const(frozenset(_vary_all(v.aval))) for v in outs]

    # ---- elementwise --------------------------------------------------------------
    def _elementwise(self, name, ins, shapes) -> _Act:
        acts = [a for a in ins if isinstance(a, _Act)]
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
                    self.union(int(s), int(t), coupled=name in _ADDITIVE)
                elif s >= 0 or t >= 0:  # a channel meets a padded constant one (shortcut "A")
                    self.fix_ids([s, t], f"meets zero padding in '{name}'")
        for a, shape in zip(ins, shapes):
            if isinstance(a, _Par):
                for path, axes in a.items:
                    if base.axis < len(axes) and axes[base.axis] is not None:
                        self.record("param", path, axes[base.axis], base.sid, base.cidx)
            elif isinstance(a, _Const) and base.axis in a.vary and len(shape) > base.axis \
                    and shape[base.axis] > 1:
                self.fix(base, f"combined by '{name}' with a value that differs per channel "
                               "and is not a parameter")
        return base

    # ---- layout ------------------------------------------------------------------
    def _broadcast_in_dim(self, eqn, ins, shapes, key):
        a, bd = ins[0], eqn.params["broadcast_dimensions"]
        return [_Act(bd[a.axis], a.sid, a.cidx)]

    def _squeeze(self, eqn, ins, shapes, key):
        a, dims = ins[0], eqn.params["dimensions"]
        return [_Act(a.axis - sum(d < a.axis for d in dims), a.sid, a.cidx)]

    def _transpose(self, eqn, ins, shapes, key):
        a, perm = ins[0], eqn.params["permutation"]
        return [_Act(list(perm).index(a.axis), a.sid, a.cidx)]

    def _reshape(self, eqn, ins, shapes, key):
        a, old, new = ins[0], shapes[0], tuple(eqn.params["new_sizes"])
        grp = _reshape_groups(old, new)
        if len(a.sid) == 1:  # one channel: ambiguous, as any size-1 axis is
            inner = int(np.prod(old[a.axis + 1:]))
            outer = int(np.prod(old[:a.axis]))
            kept = [j for j in range(len(new)) if new[j] == 1 and int(np.prod(new[j + 1:])) == inner
                    and int(np.prod(new[:j])) == outer]
            if kept:  # a size-1 axis with the same elements after it: the channel axis survives
                return [_Act(kept[0], a.sid, a.cidx)]
            # Flattened: it goes with the axes it is merged with.
            after = [k for k in range(a.axis + 1, len(old)) if old[k] > 1]
            before = [k for k in range(a.axis) if old[k] > 1]
            k = after[0] if after else (before[-1] if before else None)
            for (i0, i1), (j0, j1) in grp:
                if k is not None and i0 <= k < i1 and j1 > j0:
                    j = j0 + int(np.argmax(new[j0:j1]))
                    return [_Act(j, np.repeat(a.sid, new[j]), np.repeat(a.cidx, new[j]))]
        for (i0, i1), (j0, j1) in grp:
            if i0 <= a.axis < i1:
                sub_old, sub_new = old[i0:i1], new[j0:j1]
                shape = [1] * len(sub_old)
                shape[a.axis - i0] = len(a.sid)
                sid = np.broadcast_to(a.sid.reshape(shape), sub_old).reshape(sub_new)
                cidx = np.broadcast_to(a.cidx.reshape(shape), sub_old).reshape(sub_new)
                varying = [d for d in range(len(sub_new)) if sub_new[d] > 1 and not (
                    _constant_along(sid, d) and _constant_along(cidx, d))]
                if len(varying) == 1:
                    d = varying[0]
                    idx = tuple(slice(None) if k == d else 0 for k in range(len(sub_new)))
                    return [_Act(j0 + d, sid[idx].copy(), cidx[idx].copy())]
                if not varying and len(sub_new):
                    d = int(np.argmax(sub_new)) if max(sub_new) > 1 else 0
                    idx = tuple(slice(None) if k == d else 0 for k in range(len(sub_new)))
                    return [_Act(j0 + d, sid[idx].copy(), cidx[idx].copy())]
        self.fix(a, "reshaped so that channels spread over several axes")
        return [_Const(frozenset(_vary_all(eqn.outvars[0].aval)))]

    def _concatenate(self, eqn, ins, shapes, key):
        dim = eqn.params["dimension"]
        acts = [a for a in ins if isinstance(a, _Act)]
        if all(isinstance(a, _Act) and a.axis == dim for a in ins):
            return [_Act(dim, np.concatenate([a.sid for a in ins]),
                         np.concatenate([a.cidx for a in ins]))]
        if any(isinstance(a, _Act) and a.axis == dim for a in ins):
            parts = [(a.sid, a.cidx) if isinstance(a, _Act) else
                     (np.full(s[dim], -1), np.zeros(s[dim], int)) for a, s in zip(ins, shapes)]
            return [_Act(dim, np.concatenate([p[0] for p in parts]),
                         np.concatenate([p[1] for p in parts]))]
        # Along another axis: the pieces must carry the same channels.
        return [self._elementwise("concatenate", [a for a in ins], shapes) if len(acts) == len(ins)
                else self._mixed(acts, "concatenated with a constant", eqn)]

    def _mixed(self, acts, reason, eqn):
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
        return _Const(frozenset(_vary_all(out)))

    def _pad(self, eqn, ins, shapes, key):
        a, cfg = ins[0], eqn.params["padding_config"]
        lo, hi, interior = cfg[a.axis]
        if (lo, hi, interior) == (0, 0, 0):
            return [a]
        n = len(a.sid)
        sid, cidx = np.full(n + max(n - 1, 0) * interior, -1), np.zeros(n + max(n - 1, 0) * interior, int)
        sid[::interior + 1], cidx[::interior + 1] = a.sid, a.cidx
        sid = np.concatenate([np.full(max(lo, 0), -1), sid, np.full(max(hi, 0), -1)])
        cidx = np.concatenate([np.zeros(max(lo, 0), int), cidx, np.zeros(max(hi, 0), int)])
        sid, cidx = sid[max(-lo, 0):len(sid) - max(-hi, 0)], cidx[max(-lo, 0):len(cidx) - max(-hi, 0)]
        return [self._check_partial(a, _Act(a.axis, sid, cidx), "cropped by 'pad'")]

    def _slice(self, eqn, ins, shapes, key):
        a = ins[0]
        start, limit = eqn.params["start_indices"][a.axis], eqn.params["limit_indices"][a.axis]
        step = (eqn.params["strides"] or [1] * len(shapes[0]))[a.axis]
        out = _Act(a.axis, a.sid[start:limit:step], a.cidx[start:limit:step])
        return [self._check_partial(a, out, "partly selected by 'slice'")]

    def _split(self, eqn, ins, shapes, key):
        a, axis, sizes = ins[0], eqn.params["axis"], eqn.params["sizes"]
        if axis != a.axis:
            return [a] * len(sizes)
        bounds = np.cumsum([0, *sizes])
        return [self._check_partial(a, _Act(a.axis, a.sid[b0:b1], a.cidx[b0:b1]), "split")
                for b0, b1 in zip(bounds[:-1], bounds[1:])]

    def _check_partial(self, before: _Act, after: _Act, reason: str) -> _Act:
        for s in set(after.sid[after.sid >= 0].tolist()):
            if (before.sid == s).sum() != (after.sid == s).sum():
                self.fix_ids([s], f"channels {reason}")
        return after

    def _rev(self, eqn, ins, shapes, key):
        a = ins[0]
        if a.axis in eqn.params["dimensions"]:
            return [_Act(a.axis, a.sid[::-1].copy(), a.cidx[::-1].copy())]
        return [a]

    def _reduce(self, eqn, ins, shapes, key):
        a, axes = ins[0], tuple(eqn.params["axes"])
        if a.axis in axes:
            self.fix(a, f"reduced over by '{eqn.primitive.name}' (e.g. a LayerNorm or softmax "
                        "over channels)")
            return [_Const(frozenset(_vary_all(v.aval))) for v in eqn.outvars]
        return [_Act(a.axis - sum(d < a.axis for d in axes), a.sid, a.cidx)] * len(eqn.outvars)

    def _window(self, eqn, ins, shapes, key):
        a = next(x for x in ins if isinstance(x, _Act))
        if eqn.params["window_dimensions"][a.axis] != 1 or eqn.params["window_strides"][a.axis] != 1:
            return [self._mixed([a], f"pooled across channels by '{eqn.primitive.name}'", eqn)]
        return [a] * len(eqn.outvars)

    def _cumulative(self, eqn, ins, shapes, key):
        a = ins[0]
        if eqn.params["axis"] == a.axis:
            return [self._mixed([a], f"accumulated over by '{eqn.primitive.name}'", eqn)]
        return [a]

    def _select_and_gather_add(self, eqn, ins, shapes, key):
        return [self._mixed([a for a in ins if isinstance(a, _Act)], "gathered", eqn)]

    _gather = _scatter = _scatter_add = _dynamic_slice = _dynamic_update_slice = \
        _sort = _top_k = _select_and_gather_add

    def _while(self, eqn, ins, shapes, key):
        acts = [a for a in ins if isinstance(a, _Act)]
        if all(self.find(int(t)) in self.fixed for a in acts for t in a.sid if t >= 0):
            return [self._mixed(acts, f"passed through a loop ('{eqn.primitive.name}')", eqn)
                    ] * len(eqn.outvars)
        raise TraceError(
            f"the tracer cannot follow channels through a loop ('{eqn.primitive.name}'; e.g. "
            f"nnx.scan over layers), which receives the channels produced by "
            f"{self.producer_name(ins)}. Unroll the loop, or leave those channels unpruned "
            f"with ignore=['{self.producer_name(ins)}'].")

    _scan = _while

    # ---- layers ------------------------------------------------------------------
    def _conv_general_dilated(self, eqn, ins, shapes, key):
        x, w = ins
        dn = eqn.params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        out_shape = eqn.outvars[0].aval.shape
        cin, cout = shapes[0][lhs_spec[1]], out_shape[out_spec[1]]
        g = eqn.params["feature_group_count"]
        if not isinstance(x, _Act) or x.axis != lhs_spec[1] or not isinstance(w, _Par) \
                or len(w.items) != 1 or eqn.params["batch_group_count"] != 1:
            reason = "convolved with a kernel that is not a parameter" if isinstance(x, _Act) \
                else "convolved over a non-channel axis"
            return [self._mixed([a for a in ins if isinstance(a, _Act)], reason, eqn)]
        path, axes = w.items[0]
        module = path[:-1] or path  # a bare parameter on the model: name it by itself
        kernel = tuple(int(shapes[1][d]) for d in rhs_spec[2:4])
        out_hw = tuple(int(out_shape[d]) for d in out_spec[2:4])
        stride = int(eqn.params["window_strides"][0])
        in_hw = tuple(int(shapes[0][d]) for d in lhs_spec[2:4])
        pad = tuple(tuple(int(p) for p in q) for q in eqn.params["padding"])
        usual = all(p == (k // 2, k // 2) for p, k in zip(pad, kernel)) and in_hw == tuple(
            o * stride for o in out_hw)
        rec = _LayerRec("conv", module, kernel=kernel, out_hw=out_hw, stride=stride, groups=g,
                        ins=(x.sid, x.cidx), padding=None if usual else (pad, in_hw))
        self.layers.append(rec)
        self.consumers[key] = (0, x)
        ndim = self.leaf_ndims[path]
        if (g == cin > 1 and cout == cin) or (module in self.depthwise and cout == cin):
            out = _Act(out_spec[1], x.sid, x.cidx)
            rec.depthwise = True
            self.record("depthwise", path, axes[rhs_spec[0]], x.sid, x.cidx)
        elif g == 1:
            self.record("in", path, axes[rhs_spec[1]], x.sid, x.cidx)
            out = self.act(cout, ".".join(module), out_spec[1])
            self.record("out", path, axes[rhs_spec[0]], out.sid, out.cidx)
        else:
            self.fix(x, f"mixed by the grouped convolution {'.'.join(module)} "
                        f"(feature_group_count={g})")
            rec.depthwise = g == cin
            out = self.act(cout, ".".join(module), out_spec[1],
                           fixed=f"produced by the grouped convolution {'.'.join(module)}")
        rec.out = (out.sid, out.cidx)
        return [out]

    def _dot_general(self, eqn, ins, shapes, key):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        acts = [i for i, a in enumerate(ins) if isinstance(a, _Act)]
        if len(acts) != 1 or not isinstance(ins[1 - acts[0]], _Par) or len(ins[1 - acts[0]].items) != 1:
            return [self._mixed([ins[i] for i in acts], "multiplied with another activation "
                                "(e.g. attention) or a computed matrix", eqn)]
        ai = acts[0]
        x, w = ins[ai], ins[1 - ai]
        xc, wc = (lc, rc) if ai == 0 else (rc, lc)
        xb, wb = (lb, rb) if ai == 0 else (rb, lb)
        path, axes = w.items[0]
        out_shape = eqn.outvars[0].aval.shape
        x_free = [d for d in range(len(shapes[ai])) if d not in xc and d not in xb]
        w_free = [d for d in range(len(shapes[1 - ai])) if d not in wc and d not in wb]
        # Output axes: batch, then the lhs's free axes, then the rhs's.
        first, second = (x_free, w_free) if ai == 0 else (w_free, x_free)
        pos = {("l", d): len(xb) + i for i, d in enumerate(first)}
        pos.update({("r", d): len(xb) + len(first) + i for i, d in enumerate(second)})
        x_free_pos = {d: pos[("l" if ai == 0 else "r", d)] for d in x_free}
        w_free_pos = {d: pos[("r" if ai == 0 else "l", d)] for d in w_free}
        if x.axis in xb:
            return [self._mixed([x], "used as a batch axis of a matrix product", eqn)]
        if x.axis in x_free:  # a product along another axis (token mixing): channels pass
            return [_Act(x_free_pos[x.axis], x.sid, x.cidx)]
        wd = wc[list(xc).index(x.axis)]
        module = path[:-1] or path  # a bare parameter on the model: name it by itself
        self.consumers[key] = (ai, x)
        self.record("in", path, axes[wd], x.sid, x.cidx)
        big = [d for d in w_free if axes[d] is not None]  # the kernel's output axis
        rows = int(np.prod([shapes[ai][d] for d in x_free[1:]])) if len(x_free) > 1 else 1
        rec = _LayerRec("dense", module, ins=(x.sid, x.cidx), tokens=rows)
        self.layers.append(rec)
        if len(big) != 1:
            rec.out = int(np.prod([shapes[1 - ai][d] for d in w_free]))
            return [_Const(frozenset(_vary_all(eqn.outvars[0].aval)))]
        d = big[0]
        out = self.act(shapes[1 - ai][d], ".".join(module), w_free_pos[d])
        self.record("out", path, axes[d], out.sid, out.cidx)
        rec.out = (out.sid, out.cidx)
        assert out_shape[w_free_pos[d]] == len(out.sid)
        return [out]


def _vary_all(aval) -> list[int]:
    return [i for i, s in enumerate(getattr(aval, "shape", ())) if s > 1]


def _constant_along(a: np.ndarray, d: int) -> bool:
    return bool((a == np.take(a, [0], axis=d)).all())


def _reshape_groups(old, new):
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


def _map_axes(name, eqn, in_shape, axes):
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
    for (i0, i1), (j0, j1) in _reshape_groups(tuple(in_shape), tuple(out_shape)):
        bi = [i for i in range(i0, i1) if in_shape[i] > 1]
        bj = [j for j in range(j0, j1) if out_shape[j] > 1]
        if len(bi) == 1 and len(bj) == 1:
            res[bj[0]] = axes[bi[0]]
    return tuple(res)


# --------------------------------------------------------------------------
# From the analysis to a Structure
# --------------------------------------------------------------------------

def _fit_positions(pos: np.ndarray, ch: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
    """``(offset, stride, repeats, period)`` with position = offset + i*stride + r*period of
    channel i's r-th copy, or None when the channels do not sit on such a grid."""
    counts = np.bincount(ch, minlength=size)
    if counts.size != size or counts.min() != counts.max() or counts.min() == 0:
        return None
    reps = int(counts[0])
    grid = np.stack([np.sort(pos[ch == i]) for i in range(size)], axis=1)  # (reps, size)
    offset = int(grid[0, 0])
    stride = int(grid[0, 1] - grid[0, 0]) if size > 1 else 1
    period = int(grid[1, 0] - grid[0, 0]) if reps > 1 else 0
    want = offset + np.arange(size)[None, :] * stride + np.arange(reps)[:, None] * period
    return (offset, stride, reps, period) if np.array_equal(grid, want) else None


def _role(kind: str, path: G.Path, module_of: Callable[[G.Path], Any]) -> str:
    if kind != "param":
        return kind
    mod = module_of(path[:-1])
    if isinstance(mod, _NORM_TYPES):
        return _NORM_ROLES.get(path[-1], "channel")
    if isinstance(mod, (nnx.Conv, nnx.ConvTranspose, nnx.Linear)) and path[-1] == "bias":
        return "bias"
    return "channel"


def _module_getter(model: nnx.Module) -> Callable[[G.Path], Any]:
    def get(path: G.Path) -> Any:
        node = model
        for k in path:
            try:
                node = getattr(node, k) if isinstance(k, str) and hasattr(node, k) else node[int(k)]
            except (TypeError, ValueError, IndexError, KeyError, AttributeError):
                return None
        return node
    return get


def _tie_shared(an: _Analysis) -> None:
    """One tensor axis is one set of channels: a module called twice (weight sharing) ties the
    spaces its calls read or write, channel by channel; parameters whose entries a reduction
    mixed along that axis (weight standardisation) fix them."""
    by_axis: dict[tuple[G.Path, int], list[_Record]] = {}
    for r in an.records:
        by_axis.setdefault((r.path, r.axis), []).append(r)
    for key, recs in by_axis.items():
        if key in an.mixed:
            for r in recs:
                an.fix_ids(r.sid, f"its parameter {'/'.join(key[0])} is normalised across "
                                  "channels (e.g. weight standardisation)")
            continue
        first = recs[0]
        for r in recs[1:]:
            if len(r.sid) != len(first.sid) or not np.array_equal(r.cidx, first.cidx):
                an.fix_ids(np.concatenate([first.sid, r.sid]),
                           f"{'/'.join(key[0])} is used twice with different channel layouts")
                continue
            for a, b in zip(first.sid, r.sid):
                if a >= 0 and b >= 0:
                    an.union(int(a), int(b), coupled=False)


def _build(an: _Analysis, module_of, *, prune: str, ignore: Sequence[str], input_hw, in_channels,
           prefix: G.Path = ()) -> tuple[G.Structure, dict[str, str]]:
    _tie_shared(an)
    find = np.vectorize(lambda s: an.find(int(s)) if s >= 0 else -1, otypes=[int])
    rec_roots = [find(r.sid) for r in an.records]
    producers: dict[int, list[int]] = {}
    for i, r in enumerate(an.records):
        if r.kind == "out":
            producers.setdefault(int(rec_roots[i][0]), []).append(i)
    layer_names = {".".join(r.path[:-1] or r.path) for r in an.records if r.kind == "out"}
    for name in ignore:
        if name.replace("/", ".") not in layer_names:
            raise TraceError(f"ignore names {name!r}, which is not a convolution or linear layer of "
                             f"the model; layers: {', '.join(sorted(layer_names))}.")
    ignored = {n.replace("/", ".") for n in ignore}
    status: dict[str, str] = {}
    chosen: list[tuple[int, list[G.Slice]]] = []
    for root, recs in producers.items():
        name = ".".join(an.records[recs[0]].path[:-1] or an.records[recs[0]].path)
        if root in an.fixed or name in ignored:
            status[name] = an.fixed.get(root, "ignored")
            continue
        if root in an.coupled and prune != "all":
            status[name] = "coupled (a residual stream); prunable with prune='all'"
            continue
        slices, size = [], an.size[root]
        for r, roots in zip(an.records, rec_roots):
            mask = roots == root
            if not mask.any():
                continue
            fit = _fit_positions(np.flatnonzero(mask), r.cidx[mask], size)
            if fit is None:
                slices = None
                status[name] = f"its channels are laid out irregularly in {'/'.join(r.path)}"
                break
            axis = r.axis - r.ndim if r.ndim > 1 else 0
            offset, stride, reps, period = fit
            sl = G.Slice(prefix + r.path, axis, _role(r.kind, r.path, module_of), offset, stride,
                         reps, period)
            if sl not in slices:
                slices.append(sl)
        if slices is not None:
            chosen.append((root, slices))
            status[name] = "prunable"
    group_of = {root: k for k, (root, _) in enumerate(chosen)}

    def dim(lab) -> G.Dim:
        if isinstance(lab, int):
            return lab
        roots = find(lab[0])
        terms, fixed = {}, 0
        for r in roots:
            if int(r) in group_of:
                terms[int(r)] = terms.get(int(r), 0) + 1
            else:
                fixed += 1
        parts = [(G.GroupRef(group_of[r]), n // an.size[r]) for r, n in terms.items()]
        if not parts:
            return fixed
        if fixed == 0 and len(parts) == 1 and parts[0][1] == 1:
            return parts[0][0]
        return G.DimSum(tuple(parts) + (((fixed, 1),) if fixed else ()))

    layers: list[G.Layer] = []
    for lr in an.layers:
        path = prefix + lr.path
        bias = module_of(lr.path + ("bias",)) is not None and not isinstance(
            module_of(lr.path), _NORM_TYPES)
        if lr.kind == "conv":
            pad, in_hw = lr.padding or (None, None)
            layers.append(G.ConvLayer(path, dim(lr.ins), dim(lr.out), lr.kernel, lr.out_hw,
                                      lr.stride, lr.depthwise, bias,
                                      1 if lr.depthwise else lr.groups, pad, in_hw))
        elif lr.kind == "dense":
            layers.append(G.DenseLayer(path, dim(lr.ins), dim(lr.out), bias, lr.tokens))
    seen = {lr.path for lr in an.layers}
    for r, roots in zip(an.records, rec_roots):
        if r.kind != "param" or r.path[:-1] in seen and not isinstance(module_of(r.path[:-1]), _NORM_TYPES):
            continue
        mod = module_of(r.path[:-1])
        if isinstance(mod, _NORM_TYPES):
            if r.path[:-1] in seen:
                continue
            seen.add(r.path[:-1])
            names = tuple(n for n in ("scale", "bias", "mean", "var") if module_of(r.path[:-1] + (n,)) is not None)
            layers.append(G.NormLayer(prefix + r.path[:-1], dim((r.sid, r.cidx)), names))
        elif r.path not in seen:
            seen.add(r.path)
            layers.append(G.ScaleLayer(prefix + r.path, dim((r.sid, r.cidx))))
    s = G.Structure(tuple(an.name[r] for r, _ in chosen), tuple(an.size[r] for r, _ in chosen),
                    tuple(layers), tuple(input_hw), int(in_channels),
                    tuple(tuple(sl) for _, sl in chosen))
    return s, status


# --------------------------------------------------------------------------
# Tracing a model
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Program:
    closed: Any  # jcore.ClosedJaxpr of (leaves, x) -> (outputs..., new leaves...)
    out_tree: Any
    treedef: Any
    leaf_paths: tuple[G.Path, ...]
    analysis: _Analysis


def _leaf_paths(state) -> tuple[G.Path, ...]:
    return tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])


@functools.lru_cache(maxsize=32)
def _program_cached(graphdef, treedef, leaf_avals, x_aval, mode: str | None,
                    leaf_paths: tuple[G.Path, ...], ignore: tuple[str, ...],
                    depthwise: tuple[G.Path, ...]) -> _Program:
    def pure(leaves, x):
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        if mode == "eval":
            m.eval()
        y = m(x)
        return y, jax.tree.leaves(nnx.state(m))

    closed, out_shape = jax.make_jaxpr(pure, return_shape=True)(list(leaf_avals), x_aval)
    # Tracing for a structure (eval mode) is strict; the gated forward only needs its labels.
    an = _Analysis({p: len(a.shape) for p, a in zip(leaf_paths, leaf_avals)}, ignore,
                   strict=mode == "eval", depthwise=depthwise)
    ins = [_Par(((p, tuple(range(len(a.shape)))),)) if jnp.issubdtype(a.dtype, jnp.floating)
           else _Const(frozenset(_vary_all(a))) for p, a in zip(leaf_paths, leaf_avals)]
    ins.append(an.act(x_aval.shape[-1], "the model input", len(x_aval.shape) - 1,
                      fixed="the model input"))
    outs = an.run(closed.jaxpr, ins)
    n_y = len(jax.tree.leaves(out_shape[0]))
    for a in outs[:n_y]:
        an.fix(a, "the model output")
    return _Program(closed, jax.tree.structure(out_shape), treedef, leaf_paths, an)


def _aval(a: Any) -> Any:
    """An array's abstract value, sharding included; a ShapedArray for a shape-only stand-in."""
    if isinstance(a, jax.Array):
        return jax.typeof(a)
    return jax.core.ShapedArray(tuple(np.shape(a)), a.dtype)


def _program(model: nnx.Module, x_aval, mode: str | None, ignore: Sequence[str] = ()
             ) -> tuple[_Program, list[Any]]:
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    # jax.typeof keeps a traced array's sharding: a jaxpr traced without it would not bind to
    # explicitly sharded values (the trainer's mesh).
    avals = tuple(_aval(a) for a in leaves)
    depthwise = tuple(sorted(G.as_path(p) for p, m in nnx.iter_graph(model)
                             if isinstance(m, nnx.Conv) and getattr(m, _DEPTHWISE, False)))
    return (_program_cached(graphdef, treedef, avals, _aval(x_aval), mode, _leaf_paths(state),
                            tuple(sorted(n.replace("/", ".") for n in ignore)), depthwise), leaves)


def _as_aval(sample: Any) -> jax.ShapeDtypeStruct:
    if isinstance(sample, (tuple, list)) and all(isinstance(s, int) for s in sample):
        return jax.ShapeDtypeStruct(tuple(sample), jnp.float32)
    return jax.ShapeDtypeStruct(tuple(np.shape(sample)), getattr(sample, "dtype", jnp.float32))


def trace(model: nnx.Module, sample: Any, *, prune: str = "inner", ignore: Sequence[str] = (),
          prefix: Sequence[str] = ()) -> tuple[G.Structure, dict[str, str]]:
    """The channel groups of ``model`` and, per layer, why its output channels are (not) pruned.

    Args:
      model: any NNX module mapping an NHWC batch to logits (it is not modified).
      sample: an input batch, or its shape such as ``(1, 32, 32, 3)``; only its shape and dtype
        are used (the jaxpr is traced abstractly, in eval mode).
      prune: ``"inner"`` (default): groups no addition ties to another layer's output;
        ``"all"``: coupled groups (residual streams) too.
      ignore: module paths (``"blocks.0.conv1"`` or ``"blocks/0/conv1"``) of layers whose output
        channels must never be pruned.
      prefix: prepended to every parameter path (the model sits inside another module).

    Returns:
      ``(structure, status)``: a :class:`~sap_jax.structure.groups.Structure` whose group names are the
      producing layers' paths, and ``{layer: "prunable" or the reason it is not}``.
    """
    if prune not in PRUNE:
        raise ValueError(f"prune must be one of {PRUNE}, got {prune!r}.")
    if isinstance(ignore, str):
        ignore = [ignore]
    x = _as_aval(sample)
    if len(x.shape) != 4:
        raise ValueError(f"sample must be one NHWC batch (4 dimensions); got shape {x.shape}.")
    # A batch of 2: with one image the batch axis is one more size-1 axis, and a width-1
    # group flattened next to it would be ambiguous.
    x = jax.ShapeDtypeStruct((max(2, x.shape[0]), *x.shape[1:]), x.dtype)
    prog, _ = _program(model, x, "eval", ignore)
    return _build(prog.analysis, _module_getter(model), prune=prune, ignore=list(ignore),
                  input_hw=x.shape[1:3], in_channels=x.shape[3], prefix=G.as_path(prefix))


def structure(model: nnx.Module, sample: Any, **kwargs: Any) -> G.Structure:
    """Just the :class:`~sap_jax.structure.groups.Structure` of :func:`trace`."""
    return trace(model, sample, **kwargs)[0]


# --------------------------------------------------------------------------
# The gated forward
# --------------------------------------------------------------------------

def _gates(an: _Analysis, s: G.Structure, arch: G.Arch, prefix: G.Path
           ) -> dict[tuple[int, ...], tuple[int, int, jax.Array]]:
    """``{eqn key: (operand, axis, gate vector)}`` for every layer that reads a group's channels."""
    out_paths = {sl.path[len(prefix):]: k for k, g in enumerate(s.groups) for sl in g.slices
                 if sl.role == "out"}
    group_of: dict[int, int] = {}
    for r in an.records:
        if r.kind == "out" and r.path in out_paths:
            group_of[an.find(int(r.sid[0]))] = out_paths[r.path]
    offsets = np.cumsum([1, *s.widths])
    flat = jnp.concatenate([jnp.ones((1,), jnp.float32)] + [jnp.asarray(v, jnp.float32) for v in arch])
    gates = {}
    for key, (operand, lab) in an.consumers.items():
        ks = np.array([group_of.get(an.find(int(t)), -1) if t >= 0 else -1 for t in lab.sid])
        if (ks < 0).all():
            continue
        idx = np.where(ks >= 0, offsets[np.maximum(ks, 0)] + lab.cidx, 0)
        gates[key] = (operand, lab.axis, flat[idx])
    return gates


def _eval(jaxpr: jcore.Jaxpr, consts, args, gates, prefixes, key=()) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, a in zip(jaxpr.constvars, consts):
        env[v] = a
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
        k = key + (i,)
        vals = [read(v) for v in eqn.invars]
        if k in gates:
            j, axis, g = gates[k]
            shape = [1] * np.ndim(vals[j])
            shape[axis] = -1
            vals[j] = vals[j] * g.reshape(shape).astype(vals[j].dtype)
        name = eqn.primitive.name
        if k in prefixes and name in _CALLS:
            sub = eqn.params[_CALLS[name]]
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            n = len(closed.jaxpr.invars)
            outs = _eval(closed.jaxpr, closed.consts, vals[len(vals) - n:], gates, prefixes, k)
        elif k in prefixes and name == "cond":
            fns = [functools.partial(lambda b, kb, *a: _eval(b.jaxpr, b.consts, a, gates, prefixes, kb),
                                     b, k + (j,)) for j, b in enumerate(eqn.params["branches"])]
            outs = jax.lax.switch(vals[0], fns, *vals[1:])
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def gated_call(model: nnx.Module, x: jax.Array, arch: G.Arch, s: G.Structure, *,
               prefix: Sequence[str] = ()) -> Any:
    """``model(x)`` with the channels of group k multiplied by ``arch[k]`` where layers read them.

    Runs in the model's current mode (``model.train()`` updates its BatchNorm statistics, as
    a normal call would) and works under ``jax.jit``/``jax.grad``: ``arch`` is an ordinary
    input, so a new architecture never recompiles, and its gradient is the straight-through
    gradient the built-in backbones' ``gate`` gives. ``s`` is the model's :func:`structure`.
    """
    G.check_arch(arch, s.widths, s.group_names)
    prog, leaves = _program(model, x, None)
    prefix = G.as_path(prefix)
    gates = _gates(prog.analysis, s, arch, prefix)
    prefixes = {k[:n] for k in gates for n in range(1, len(k))}
    outs = _eval(prog.closed.jaxpr, prog.closed.consts, [*leaves, x], gates, prefixes)
    y, new_leaves = jax.tree.unflatten(prog.out_tree, outs)
    nnx.update(model, jax.tree.unflatten(prog.treedef, new_leaves))
    return y


def gated_apply(model: nnx.Module, s: G.Structure, *, train: bool = False
                ) -> tuple[Callable[..., Any], Any]:
    """``(apply_fn, state)`` for a training loop of your own: ``apply_fn(state, x, arch)`` is
    ``model``'s gated forward, pure and jittable (eval mode, BN running statistics; with
    ``train=True`` it returns ``(logits, new_state)`` with updated BN statistics). It plugs into
    :func:`sap_jax.method.agn.agn_value_and_grad` as the built-in models' ``agn.gated_apply`` does."""
    graphdef, state = nnx.split(model)

    def apply_fn(state, x, arch):
        m = nnx.merge(graphdef, state)
        if train:
            m.train()
            y = gated_call(m, x, arch, s)
            return y, nnx.state(m)
        m.eval()
        return gated_call(m, x, arch, s)

    return apply_fn, state


# --------------------------------------------------------------------------
# Surgery on any module
# --------------------------------------------------------------------------

def slice_arrays(flat: dict[G.Path, Any], s: G.Structure, keep: Sequence[np.ndarray]
                 ) -> dict[G.Path, np.ndarray]:
    """Every array of ``flat`` (by path) with the dropped channels of every group removed.

    A tensor axis read by several groups (a concatenation, a flattened feature map) keeps
    every position no group drops; each tensor is sliced once per axis, on the host.
    """
    masks: dict[tuple[G.Path, int], np.ndarray] = {}
    owners: dict[tuple[G.Path, int], np.ndarray] = {}  # which group owns each position
    for gi, (g, k) in enumerate(zip(s.groups, keep)):
        if np.all(k):
            continue
        for sl in g.slices:
            t = flat[sl.path]
            axis = sl.axis % np.ndim(t)
            m = masks.setdefault((sl.path, axis), np.ones(np.shape(t)[axis], bool))
            owner = owners.setdefault((sl.path, axis), np.full(np.shape(t)[axis], -1))
            pos = sl.positions(g.size)
            clash = owner[pos]
            if ((clash >= 0) & (clash != gi)).any():
                raise ValueError(f"groups {int(clash[clash >= 0][0])} and {gi} both own positions "
                                 f"of {'/'.join(sl.path)} axis {axis}: the structure is inconsistent.")
            owner[pos] = gi
            m[pos] = np.broadcast_to(np.asarray(k, bool), (sl.repeats, g.size))
    out = dict(flat)
    for (path, axis), m in masks.items():
        t = out[path]  # on the host (no compile per new shape) unless abstract (nnx.eval_shape)
        out[path] = (jnp.take(t, np.flatnonzero(m), axis=axis) if isinstance(t, jax.core.Tracer)
                     else np.take(np.asarray(t), np.flatnonzero(m), axis=axis))
    return out


def resize_modules(model: nnx.Module) -> None:
    """Set the size attributes of every standard layer of ``model`` from its parameters' shapes."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            k = node.kernel.shape
            # Depthwise with one filter per channel (a depth multiplier's convs stay fixed).
            depthwise = getattr(node, _DEPTHWISE, False) or (
                node.feature_group_count == node.in_features > 1 and k[-2] == 1
                and node.out_features == node.in_features)
            node.out_features = int(k[-1])
            node.in_features = int(k[-1]) if depthwise else int(k[-2]) * node.feature_group_count
            if depthwise:  # remembered: at one channel it would look like a plain conv
                node.feature_group_count = int(k[-1])
                setattr(node, _DEPTHWISE, True)
            node.kernel_shape = tuple(k)
        elif isinstance(node, nnx.Linear):
            node.in_features, node.out_features = (int(d) for d in node.kernel.shape)
        elif isinstance(node, _NORM_TYPES):
            sized = [v for v in (getattr(node, n, None) for n in ("scale", "bias", "mean"))
                     if isinstance(v, nnx.Variable)]
            if sized:  # a norm without any per-channel array has nothing to resize
                node.num_features = int(sized[0].shape[0])


def flat_arrays(model: nnx.Module) -> dict[G.Path, Any]:
    """Every array of ``model`` by its :data:`~sap_jax.structure.groups.Path`."""
    from flax import traverse_util
    return {G.as_path(k): v for k, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def set_arrays(model: nnx.Module, flat: dict[G.Path, Any]) -> None:
    """Replace the arrays of ``model`` by ``flat`` (any shapes), then fix size attributes."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and G.as_path(path) in flat:
            var.set_value(jnp.asarray(flat[G.as_path(path)], var.get_value().dtype))
    resize_modules(model)


def extract(model: nnx.Module, arch: G.Arch, s: G.Structure) -> nnx.Module:
    """A smaller copy of ``model`` holding only the channels ``arch`` keeps (``model`` unchanged).

    ``s`` is the model's :func:`structure`; ``arch`` one binary vector per group. The minimum
    width rule applies (every group keeps at least one channel).
    """
    G.check_arch(arch, s.widths, s.group_names)
    keep = G.ensure_min_kept(arch, None, s.group_names)
    small = nnx.clone(model)
    set_arrays(small, slice_arrays(flat_arrays(model), s, keep))
    return small
