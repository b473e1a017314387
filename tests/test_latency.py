"""Per-layer timing (sap_jax.method.latency): each layer is built at the widths asked for."""

import jax.numpy as jnp
import numpy as np
import pytest

from sap_jax import models
from sap_jax.method import latency
from sap_jax.structure import flops
from sap_jax.structure import groups as G


@pytest.fixture(scope="module")
def structure():
    return models.create_abstract("mobilenet_v2_tiny").structure(32)


def test_each_layer_alone_has_the_shape_its_widths_give(structure):
    """Every conv (depthwise ones included) and the head, at dense and at pruned widths: the
    output has the layer's own spatial size and the channel count its widths give."""
    pruned = [max(1, w // 3) for w in structure.widths]
    layers = latency.timed_layers(structure)
    assert {type(x) for x in layers} == {G.ConvLayer, G.DenseLayer}
    assert any(x.depthwise for x in layers if isinstance(x, G.ConvLayer))
    for widths in (structure.widths, pruned):
        for layer in layers:
            y = latency.layer_forward(layer, widths, 2)()
            cout = int(G.dim_value(layer.out_ch, widths))
            if isinstance(layer, G.ConvLayer):
                assert y.shape == (2, *layer.out_hw, cout), layer.path
            else:
                assert y.shape == (2 * layer.tokens, cout), layer.path


def test_layer_times_rows(structure):
    pruned = [max(1, w // 2) for w in structure.widths]
    rows = latency.layer_times(structure, [structure.widths, pruned], 2, reps=2,
                               dtype=jnp.bfloat16)
    layers = latency.timed_layers(structure)
    assert [r["path"] for r in rows] == [".".join(x.path) for x in layers]
    for r, layer in zip(rows, layers):
        assert r["macs"] == [int(flops.layer_macs(layer, ws))
                             for ws in (structure.widths, pruned)]
        assert r["prunable"] == G.is_prunable(layer)
        assert len(r["ms"]) == 2 and all(t > 0 for t in r["ms"])
        assert all(lo <= hi for lo, hi in r["iqr_ms"])
    # Pruning shrinks the MACs of exactly the layers a group touches.
    assert all((r["macs"][1] < r["macs"][0]) == r["prunable"] for r in rows)


def test_widths_that_do_not_fit_are_refused(structure):
    too_wide = list(structure.widths)
    too_wide[0] += 1
    for bad in (too_wide, list(structure.widths)[:-1], [0] * len(structure.widths)):
        with pytest.raises(ValueError, match="do not fit the groups"):
            latency.layer_times(structure, [bad], 1, reps=1)
    with pytest.raises(ValueError, match="reps"):
        latency.layer_times(structure, [structure.widths], 1, reps=0)
    assert np.all(np.asarray(structure.widths) > 0)
