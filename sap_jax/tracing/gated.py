"""The gated forward of any module: :func:`gated_call` runs the model with one keep vector per
group without changing its code.

A small jaxpr interpreter replays the captured forward and multiplies the input of every
convolution and linear layer that reads a group's channels by that group's vector. It is the
one gating mechanism: the built-in backbones are gated by it too (their hand-gated forward
survives only as a test oracle, tests/support/hand_written.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from sap_jax.structure import groups as G
from sap_jax.tracing.analysis import Analysis
from sap_jax.tracing.capture import program
from sap_jax.tracing.labels import CALLS


def _gates(an: Analysis, s: G.Structure, arch: G.Arch, prefix: G.Path
           ) -> dict[tuple[int, ...], tuple[int, int, jax.Array]]:
    """``{eqn key: (operand, axis, gate vector)}`` for every layer that reads a group's
    channels."""
    out_paths = {sl.path[len(prefix):]: k for k, g in enumerate(s.groups) for sl in g.slices
                 if sl.role == "out"}
    group_of: dict[int, int] = {}
    for r in an.records:
        if r.kind == "out" and r.path in out_paths:
            group_of[an.find(int(r.sid[0]))] = out_paths[r.path]
    offsets = np.cumsum([1, *s.widths])
    # One gather from [1, arch...]: position 0 (a 1) serves fixed channels, so any mix of
    # groups and fixed channels along the axis works.
    flat = jnp.concatenate([jnp.ones((1,), jnp.float32)]
                           + [jnp.asarray(v, jnp.float32) for v in arch])
    gates = {}
    for key, (operand, lab) in an.consumers.items():
        ks = np.array([group_of.get(an.find(int(t)), -1) if t >= 0 else -1 for t in lab.sid])
        if (ks < 0).all():
            continue
        idx = np.where(ks >= 0, offsets[np.maximum(ks, 0)] + lab.cidx, 0)
        gates[key] = (operand, lab.axis, flat[idx])
    return gates


def _eval(jaxpr: jcore.Jaxpr, consts, args, gates, prefixes, key=()) -> list[Any]:
    """Evaluate ``jaxpr``, gating the operands ``gates`` names; ``prefixes``: the keys of the
    nested calls that hold a gated equation (the others are bound whole)."""
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
        if k in prefixes and name in CALLS:
            sub = eqn.params[CALLS[name]]
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            n = len(closed.jaxpr.invars)
            outs = _eval(closed.jaxpr, closed.consts, vals[len(vals) - n:], gates, prefixes, k)
        elif k in prefixes and name == "cond":
            fns = [functools.partial(
                lambda b, kb, *a: _eval(b.jaxpr, b.consts, a, gates, prefixes, kb), b, k + (j,))
                for j, b in enumerate(eqn.params["branches"])]
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
               prefix: Sequence[str] = (), method: str = "__call__") -> Any:
    """``model(x)`` with the channels of group k multiplied by ``arch[k]`` where layers read them.

    Runs in the model's current mode (``model.train()`` updates its BatchNorm statistics, as
    a normal call would) and works under ``jax.jit``/``jax.grad``: ``arch`` is an ordinary
    input, so a new architecture never recompiles, and its gradient is the straight-through
    gradient of multiplying by ``arch[k]``. ``s`` is the model's
    :func:`~sap_jax.tracing.structure`; ``method`` names the forward to gate
    (``model.method(x)``, e.g. a backbone's feature extractor while its head runs outside).
    """
    G.check_arch(arch, s.widths, s.group_names)
    prog, leaves = program(model, x, None, method=method)
    prefix = G.as_path(prefix)
    gates = _gates(prog.analysis, s, arch, prefix)
    prefixes = {k[:n] for k in gates for n in range(1, len(k))}
    outs = _eval(prog.closed.jaxpr, prog.closed.consts, [*leaves, x], gates, prefixes)
    y, new_leaves = jax.tree.unflatten(prog.out_tree, outs)
    nnx.update(model, jax.tree.unflatten(prog.treedef, new_leaves))
    return y
