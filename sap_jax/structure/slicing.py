"""Slicing any NNX module down to the channels an architecture keeps.

A module's arrays are viewed flat, by :data:`~sap_jax.structure.groups.Path`
(:func:`flat_arrays`); :func:`slice_arrays` removes the dropped channels of every group from
the tensors its slices name; :func:`set_arrays` puts arrays of any shapes back and updates the
standard layers' size attributes (:func:`resize_modules`). Nothing here needs to know how the
structure was found (described by hand or traced).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sap_jax.structure import codec
from sap_jax.structure import groups as G

#: Set on a depthwise ``nnx.Conv`` that was resized: cut to one channel it would look like a
#: plain 1 -> 1 conv, so the tracer reads this mark to keep treating it as depthwise.
DEPTHWISE_MARK = "sap_depthwise"
#: Normalisation layers: their per-channel arrays follow the channels they normalise.
NORM_TYPES = (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)


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
                                 f"of {'/'.join(sl.path)} axis {axis}: the structure is "
                                 "inconsistent.")
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
            depthwise = getattr(node, DEPTHWISE_MARK, False) or (
                node.feature_group_count == node.in_features > 1 and k[-2] == 1
                and node.out_features == node.in_features)
            node.out_features = int(k[-1])
            node.in_features = int(k[-1]) if depthwise else int(k[-2]) * node.feature_group_count
            if depthwise:  # remembered: at one channel it would look like a plain conv
                node.feature_group_count = int(k[-1])
                setattr(node, DEPTHWISE_MARK, True)
            node.kernel_shape = tuple(k)
        elif isinstance(node, nnx.ConvTranspose):
            k = node.kernel.shape  # (*window, in, out); (*window, out, in) if transpose_kernel
            cin, cout = (k[-1], k[-2]) if node.transpose_kernel else (k[-2], k[-1])
            node.in_features, node.out_features = int(cin), int(cout)
            node.kernel_shape = tuple(k)
        elif isinstance(node, nnx.Linear):
            node.in_features, node.out_features = (int(d) for d in node.kernel.shape)
        elif isinstance(node, nnx.LinearGeneral):  # kernel: (*batch, *in_features, *out)
            k, nb, ni = node.kernel.shape, len(node.batch_axis), len(node.in_features)
            node.in_features = tuple(int(d) for d in k[nb:nb + ni])
            node.out_features = tuple(int(d) for d in k[nb + ni:])
        elif isinstance(node, NORM_TYPES):
            sized = [v for v in (getattr(node, n, None) for n in ("scale", "bias", "mean"))
                     if isinstance(v, nnx.Variable)]
            if sized:  # a norm without any per-channel array has nothing to resize
                node.num_features = int(sized[0].shape[0])
    for _, node in nnx.iter_graph(model):  # after its projections
        if isinstance(node, nnx.MultiHeadAttention):
            _resize_attention(node)


def _resize_attention(node: nnx.MultiHeadAttention) -> None:
    """Its head counts from its (already resized) projections: q, k, v are
    ``(..., heads, head_dim)``, so pruned heads shrink ``num_heads`` and ``qkv_features``."""
    node.num_heads = int(node.query.out_features[0])
    node.num_kv_heads = int(node.key.out_features[0])
    node.qkv_features = node.num_heads * node.head_dim
    node.in_features = int(node.query.in_features[-1])
    node.in_kv_features = int(node.key.in_features[-1])
    node.out_features = int(node.out.out_features[-1])


def flat_arrays(model: nnx.Module) -> dict[G.Path, Any]:
    """Every array of ``model`` by its :data:`~sap_jax.structure.groups.Path` (random keys as
    their data, see :mod:`sap_jax.structure.codec`)."""
    return {G.as_path(k): codec.plain(v) for k, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def set_arrays(model: nnx.Module, flat: dict[G.Path, Any]) -> None:
    """Replace the arrays of ``model`` by ``flat`` (any shapes), then fix size attributes."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and G.as_path(path) in flat:
            var.set_value(codec.like(var.get_value(), flat[G.as_path(path)]))
    resize_modules(model)
