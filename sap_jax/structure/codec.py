"""Convert between ``nnx.State`` and plain nested dicts with string keys.

The trainer keeps parameters, BN statistics and optimizer states as plain
``{str: ... : array}`` trees: they jit, shard and checkpoint (orbax) without
any NNX types, and the key paths match the channel-group paths in
:mod:`sap_jax.structure.groups` (``stages/0/1/conv1/kernel``). Inside a jitted function
:meth:`StateCodec.decode` rebuilds fresh ``nnx`` variables at the current
trace level, so a module can be merged and run (and mutate its BN statistics)
under ``jax.grad`` without trace-level errors.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

Tree = dict[str, Any]


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

    def encode(self, state: nnx.State) -> Tree:
        out: Tree = {}
        for path, leaf in zip(self.paths, jax.tree_util.tree_leaves(state)):
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        return out

    def decode(self, tree: Tree) -> nnx.State:
        leaves = []
        for path in self.paths:
            node = tree
            for k in path:
                node = node[k]
            leaves.append(node)
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
