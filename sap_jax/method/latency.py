"""What each layer of a model costs on this backend, measured: the per-layer side of speed.

A model's :class:`~sap_jax.structure.groups.Structure` lists every conv and linear layer with
its channel dimensions as functions of the group widths. :func:`layer_forward` builds one
layer alone (a jitted conv or matrix product on a random input of the layer's own shape) at
given widths, and :func:`layer_times` times every layer of a model at several width vectors,
interleaved round by round so load drift hits every variant alike. Comparing the dense and a
pruned width vector shows which layers lose or gain time when pruned
(``benchmarks/pruned_speedup.py --layers``). Norms, activations and additions are not timed
on their own: XLA fuses them into the layers' epilogues, and whole-model timings
(:func:`sap_jax.runtime.speed.compare`) include them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sap_jax.runtime import speed
from sap_jax.structure import flops
from sap_jax.structure import groups as G


def layer_forward(layer: G.ConvLayer | G.DenseLayer, widths: Sequence[int], batch: int, *,
                  dtype: Any = jnp.float32, seed: int = 0,
                  device: jax.Device | None = None) -> Callable[[], jax.Array]:
    """A compiled, ready-to-call forward of ``layer`` alone at group ``widths`` on one fixed
    random batch of ``batch`` images (the layer's own input shape), in ``dtype``."""
    device = device or jax.local_devices()[0]
    rng = np.random.default_rng(seed)
    if not isinstance(layer, (G.ConvLayer, G.DenseLayer)):
        raise TypeError(f"only conv and linear layers are timed alone, not {type(layer).__name__}.")
    cin = int(G.dim_value(layer.in_ch, widths))
    cout = int(G.dim_value(layer.out_ch, widths))
    if isinstance(layer, G.ConvLayer):
        fgc = cin if layer.depthwise else layer.groups
        x = rng.normal(size=(batch, *layer.input_hw, cin))
        w = rng.normal(size=(*layer.kernel, cin // fgc, cout)) / np.sqrt(cin)

        def fwd(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (layer.stride, layer.stride), layer.pads, feature_group_count=fgc,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        x = rng.normal(size=(batch * layer.tokens, cin))
        w = rng.normal(size=(cin, cout)) / np.sqrt(cin)

        def fwd(x, w):
            return x @ w
    args = [jax.device_put(jnp.asarray(a, dtype), device) for a in (x, w)]
    compiled = jax.jit(fwd)
    return lambda: compiled(*args)


def timed_layers(structure: G.Structure) -> list[G.ConvLayer | G.DenseLayer]:
    """The layers :func:`layer_times` measures: every conv and linear layer, in forward order."""
    return [x for x in structure.layers if isinstance(x, (G.ConvLayer, G.DenseLayer))]


def layer_times(structure: G.Structure, width_sets: Sequence[Sequence[int]], batch: int, *,
                reps: int = 10, dtype: Any = jnp.float32,
                device: jax.Device | None = None) -> list[dict[str, Any]]:
    """Per conv/linear layer of ``structure``: the median milliseconds of its forward at each
    of ``width_sets`` (one width per group, e.g. the dense and a pruned model's), JSON-ready.

    Returns one row per layer: ``path``, ``kind``, ``prunable`` (whether a group sets one of
    its channel dimensions), ``macs`` (per image, at each width set), ``ms`` (median per
    width set) and ``iqr_ms`` (25th and 75th percentiles per width set).
    """
    if reps < 1:
        raise ValueError(f"reps = {reps} must be >= 1.")
    for ws in width_sets:
        _check_widths(ws, structure)
    rows = []
    for layer in timed_layers(structure):
        fns = [layer_forward(layer, ws, batch, dtype=dtype, device=device) for ws in width_sets]
        times = speed.time_interleaved(fns, reps)
        rows.append({
            "path": ".".join(layer.path), "kind": type(layer).__name__,
            "prunable": G.is_prunable(layer),
            "macs": [int(flops.layer_macs(layer, ws)) for ws in width_sets],
            "ms": [1e3 * statistics.median(t) for t in times],
            "iqr_ms": [[1e3 * q for q in speed.spread(t)] for t in times],
        })
    return rows


def _check_widths(widths: Sequence[int], structure: G.Structure) -> None:
    if len(widths) != len(structure.widths) or any(
            not 1 <= int(w) <= c for w, c in zip(widths, structure.widths)):
        raise ValueError(f"widths {list(widths)} do not fit the groups {list(structure.widths)}: "
                         "one width per group, each from 1 to the group's size.")
