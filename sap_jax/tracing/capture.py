"""Capturing a model's forward as a jaxpr, and the public :func:`trace` / :func:`structure`.

The model is ``nnx.split`` into a graph and its state; ``jax.make_jaxpr`` of the pure forward
``(leaves, x) -> (outputs, new leaves)`` is labelled by the rules once and cached per model
graph and input (shapes, dtypes and shardings), so the gated forward of a jitted step pays
for it once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sap_jax.structure import groups as G
from sap_jax.structure import linen
from sap_jax.structure.codec import path_str
from sap_jax.structure.slicing import DEPTHWISE_MARK
from sap_jax.tracing import rules
from sap_jax.tracing.analysis import Analysis
from sap_jax.tracing.build import build, module_getter
from sap_jax.tracing.labels import PRUNE, Const, Par, vary_all


@dataclasses.dataclass(frozen=True)
class Program:
    closed: Any  # jcore.ClosedJaxpr of (leaves, x) -> (outputs..., new leaves...)
    out_tree: Any
    treedef: Any
    leaf_paths: tuple[G.Path, ...]
    analysis: Analysis


def _leaf_paths(state) -> tuple[G.Path, ...]:
    return tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])


@functools.lru_cache(maxsize=32)
def _program_cached(graphdef, treedef, leaf_avals, x_aval, mode: str | None,
                    leaf_paths: tuple[G.Path, ...], ignore: tuple[str, ...],
                    depthwise: tuple[G.Path, ...], method: str) -> Program:
    def pure(leaves, x):
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        if mode == "eval":
            m.eval()
        with linen.stored_widths():  # a cut Linen model (via nnx.bridge) runs as it is stored
            y = getattr(m, method)(x)
        return y, jax.tree.leaves(nnx.state(m))

    closed, out_shape = jax.make_jaxpr(pure, return_shape=True)(list(leaf_avals), x_aval)
    # Tracing for a structure (eval mode) is strict; the gated forward only needs its labels.
    an = Analysis({p: len(a.shape) for p, a in zip(leaf_paths, leaf_avals)}, ignore,
                  strict=mode == "eval", depthwise=depthwise, images=x_aval.shape[0])
    ins = [Par(((p, tuple(range(len(a.shape)))),)) if jnp.issubdtype(a.dtype, jnp.floating)
           else Const(frozenset(vary_all(a))) for p, a in zip(leaf_paths, leaf_avals)]
    ins.append(an.act(x_aval.shape[-1], "the model input", len(x_aval.shape) - 1,
                      fixed="the model input"))
    outs = rules.run(an, closed.jaxpr, ins)
    n_y = len(jax.tree.leaves(out_shape[0]))
    for a in outs[:n_y]:
        an.fix(a, "the model output")
    return Program(closed, jax.tree.structure(out_shape), treedef, leaf_paths, an)


def _aval(a: Any) -> Any:
    """An array's abstract value, sharding included; a ShapedArray for a shape-only stand-in."""
    if isinstance(a, jax.Array):
        return jax.typeof(a)
    return jax.core.ShapedArray(tuple(np.shape(a)), a.dtype)


def program(model: nnx.Module, x_aval, mode: str | None, ignore: Sequence[str] = (),
            method: str = "__call__") -> tuple[Program, list[Any]]:
    """The labelled jaxpr of ``model``'s forward on ``x_aval`` (``mode`` "eval": in eval mode
    and strict; None: the model's current mode), and the model's state leaves to run it on.
    ``method`` names the forward (``model.method(x)``)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    # jax.typeof keeps a traced array's sharding: the jaxpr then binds to values placed on a
    # mesh (the trainer's).
    avals = tuple(_aval(a) for a in leaves)
    depthwise = tuple(sorted(G.as_path(p) for p, m in nnx.iter_graph(model)
                             if isinstance(m, nnx.Conv) and getattr(m, DEPTHWISE_MARK, False)))
    return (_program_cached(graphdef, treedef, avals, _aval(x_aval), mode, _leaf_paths(state),
                            tuple(sorted(n.replace("/", ".") for n in ignore)), depthwise,
                            method), leaves)


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
      ``(structure, status)``: a :class:`~sap_jax.structure.groups.Structure` whose group names
      are the producing layers' paths, and ``{layer: "prunable" or the reason it is not}``.
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
    prog, _ = program(model, x, "eval", ignore)
    return build(prog.analysis, module_getter(model), prune=prune, ignore=list(ignore),
                 input_hw=x.shape[1:3], in_channels=x.shape[3], prefix=G.as_path(prefix))


def structure(model: nnx.Module, sample: Any, **kwargs: Any) -> G.Structure:
    """Just the :class:`~sap_jax.structure.groups.Structure` of :func:`trace`."""
    return trace(model, sample, **kwargs)[0]
