"""Convert between ``nnx.State`` and plain nested dicts with string keys.

The trainer keeps parameters, BN statistics and optimizer states as plain
``{str: ... : array}`` trees: they jit, shard and checkpoint (orbax) without
any NNX types, and the key paths match the channel-group paths in
:mod:`sap_jax.structure.groups` (``stages/0/1/conv1/kernel``). Inside a jitted function
:meth:`StateCodec.decode` rebuilds fresh ``nnx`` variables at the current
trace level, so a module can be merged and run (and mutate its BN statistics)
under ``jax.grad`` without trace-level errors.

A stored random key (``nnx.Dropout(rate, rngs=...)``, a drop-path, every ``nnx.bridge.ToNNX``
module) is a typed key array that NumPy, ``make_array_from_callback`` and checkpoints refuse:
the plain trees hold its raw ``uint32`` key data instead (:func:`plain`), and decoding wraps
it back as a key of the same implementation (:func:`like`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Tree = dict[str, Any]

_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def is_key(x: Any) -> bool:
    """Whether ``x`` (an array or an abstract one) holds typed random keys."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def plain(x: Any) -> Any:
    """``x``, or a typed key array's raw ``uint32`` data (shape ``x.shape + (2,)`` or more)."""
    if not is_key(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, x)
    return jax.random.key_data(x)


@functools.cache
def _impl_name(dtype: Any) -> str:
    for name in _KEY_IMPLS:  # the public way from a key dtype back to its implementation
        if jax.eval_shape(lambda n=name: jax.random.key(0, impl=n)).dtype == dtype:
            return name
    raise ValueError(f"unknown random key type {dtype}; known: {', '.join(_KEY_IMPLS)}.")


def like(template: Any, value: Any) -> Any:
    """``value`` as an array of ``template``'s dtype: key data wrapped back into keys when
    ``template`` holds keys (``template`` may be abstract)."""
    if is_key(template):
        return jax.random.wrap_key_data(jnp.asarray(value), impl=_impl_name(template.dtype))
    return jnp.asarray(value, template.dtype)


def key_str(k) -> str | None:
    """One pytree path entry as a string (``None`` for the ``.value`` of an nnx Variable)."""
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name == "value" else k.name
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    return str(k)


def path_str(path) -> tuple[str, ...]:
    return tuple(s for s in (key_str(k) for k in path) if s is not None)


class StateCodec:
    """Remembers the layout of one ``nnx.State`` (e.g. a model's params) to encode/decode it."""

    def __init__(self, state: nnx.State):
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.paths = [path_str(p) for p, _ in leaves]
        # Random keys travel as their data; the template (dtype) wraps them back.
        self.keys = {i: jax.ShapeDtypeStruct(np.shape(v), v.dtype)
                     for i, (_, v) in enumerate(leaves) if is_key(v)}

    def encode(self, state: nnx.State) -> Tree:
        out: Tree = {}
        for path, leaf in zip(self.paths, jax.tree_util.tree_leaves(state)):
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = plain(leaf)
        return out

    def decode(self, tree: Tree) -> nnx.State:
        leaves = []
        for i, path in enumerate(self.paths):
            node = tree
            for k in path:
                node = node[k]
            leaves.append(like(self.keys[i], node) if i in self.keys else node)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class ModuleCodec:
    """Split a module into (params, rest) plain trees and merge it back."""

    def __init__(self, module: nnx.Module):
        self.graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        self.params = StateCodec(params)
        self.rest = StateCodec(rest)

    def split(self, module: nnx.Module) -> tuple[Tree, Tree]:
        _, params, rest = nnx.split(module, nnx.Param, ...)
        return self.params.encode(params), self.rest.encode(rest)

    def merge(self, params: Tree, rest: Tree) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params.decode(params), self.rest.decode(rest))

    def rest_of(self, module: nnx.Module) -> Tree:
        """The non-parameter state (BN statistics, fixed inputs) of a merged module."""
        return self.rest.encode(nnx.state(module, nnx.Not(nnx.Param)))
