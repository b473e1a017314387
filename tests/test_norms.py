"""Per-channel norms (sap_jax/structure/norms.py), the one definition the penalty, the baselines,
the cut and surgery read, against NumPy written from the model's layers directly."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from sap_jax import models, surgery
from sap_jax.method import penalty
from sap_jax.structure import norms


@pytest.fixture(scope="module")
def tiny():
    model = models.create("resnet_cifar_tiny", seed=3)
    randomize(model, seed=5)
    return model, model.structure(32), nnx.state(model, nnx.Param)


def _first_block(params):
    """The first basic block's tensors, as NumPy: its conv1 makes group 0's channels."""
    b = params["stages"][0][0]
    get = lambda *keys: np.asarray(b[keys[0]][keys[1]][...], np.float64)  # noqa: E731
    return (get("conv1", "kernel"), get("conv2", "kernel"), get("bn1", "scale"),
            get("bn1", "bias"))


def test_each_kind_against_numpy_on_the_first_block(tiny):
    _, s, params = tiny
    conv1, conv2, scale, bias = _first_block(params)
    out = np.sqrt((conv1 ** 2).sum((0, 1, 2)))  # producing filters, per output channel
    inp = np.sqrt((conv2 ** 2).sum((0, 1, 3)))  # consuming kernel, per input channel
    np.testing.assert_allclose(norms.channel_norms(params, s, "group_l2")[0], out + inp, rtol=1e-12)
    np.testing.assert_allclose(norms.channel_norms(params, s, "group_l2", include_bn=True)[0],
                               out + inp + np.abs(scale) + np.abs(bias), rtol=1e-12)
    np.testing.assert_allclose(norms.channel_norms(params, s, "l1")[0],
                               np.abs(conv1).sum((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(norms.channel_norms(params, s, "producer_l2")[0], out, rtol=1e-12)


def test_host_and_traced_forms_agree_and_every_reader_uses_them(tiny):
    model, s, params = tiny
    host = norms.channel_norms(params, s, "group_l2", include_bn=True)
    dev = norms.channel_norms(params, s, "group_l2", include_bn=True, xp=jnp)
    assert all(d.dtype == jnp.float32 and h.dtype == np.float64 for d, h in zip(dev, host))
    for h, d in zip(host, dev):
        np.testing.assert_allclose(np.asarray(d), h, rtol=1e-5)
    # The penalty with every channel dropped sums exactly these norms, group by group.
    zeros = [jnp.zeros(w) for w in s.widths]
    np.testing.assert_allclose(penalty.group_penalties(params, zeros, s, include_bn=True),
                               [h.sum() for h in host], rtol=1e-5)
    for a, b in zip(surgery.channel_scores(model), norms.channel_norms(params, s, "producer_l2")):
        np.testing.assert_array_equal(a, b)


def test_errors_name_the_problem(tiny):
    _, s, params = tiny
    with pytest.raises(ValueError, match="unknown channel norm 'l3'"):
        norms.channel_norms(params, s, "l3")
    with pytest.raises(ValueError, match="params lack .* e.g. stages/0/0/conv1/kernel"):
        norms.channel_norms({"head": {}}, s)
