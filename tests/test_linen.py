"""Linen models through ``nnx.bridge.ToNNX`` (examples/linen_resnet.py, a ResNet in the form
published JAX vision code writes it): traced, cut to a smaller model that equals the gated
dense one, counted, saved and loaded, and trained end to end by the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from examples import linen_resnet
from sap_jax import models, surgery, tracing
from sap_jax.structure import flops, linen
from sap_jax.structure import groups as G

HW = 16
FACTORY = "examples.linen_resnet:resnet_tiny_linen"


@pytest.fixture(scope="module")
def net():
    m = randomize(linen_resnet.resnet_tiny_linen(image_size=HW, width=4), seed=3)
    m.eval()
    return m, tracing.structure(m, (1, HW, HW, 3), prune="all")


def _x(n=2):
    return jax.random.normal(jax.random.key(0), (n, HW, HW, 3))


def test_linen_layers_become_groups_norms_and_counted_parameters(net):
    m, s = net
    # stem + stage 1 (a residual stream), each block's inner width, stage 2's stream.
    assert s.widths == (4, 4, 8, 8)
    norms = [x for x in s.layers if isinstance(x, G.NormLayer)]
    assert len(norms) == 6 and all(x.names == ("scale", "bias", "mean", "var") for x in norms)
    dense = [x for x in s.layers if isinstance(x, G.DenseLayer)]
    assert len(dense) == 1 and dense[0].bias
    # Parameters counted from the structure = the Linen model's own trainable arrays.
    own = sum(int(np.size(v)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert flops.count(s).params == own


def test_cut_linen_model_equals_the_gated_dense_one(net):
    m, s = net
    x = _x()
    for seed in range(2):
        rng = np.random.default_rng(seed)
        keep = [np.where(k.any(), k, np.arange(len(k)) == 0) for k in
                (rng.random(w) < 0.5 for w in s.widths)]
        gated = tracing.gated_call(m, x, [k.astype(np.float32) for k in keep], s)
        small = surgery.extract(m, keep, s)
        # Linen layers build their kernels from their attributes: called plainly, the cut
        # model is refused by Linen's own shape check ...
        with pytest.raises(Exception, match="ScopeParamShapeError|shape"):
            small(x)
        # ... and runs at its stored widths within linen.stored_widths().
        with linen.stored_widths():
            out = small(x)
        assert float(jnp.abs(out - gated).max()) <= 1e-5 * max(1.0, float(jnp.abs(gated).max()))
        assert tracing.structure(small, (1, HW, HW, 3), prune="all").widths == tuple(
            int(k.sum()) for k in keep)


def test_linen_macs_agree_with_xla(net):
    from test_trace import _xla_conv_dot_flops

    m, s = net
    small = surgery.extract(m, [np.arange(w) < max(1, w // 2) for w in s.widths], s)
    for model in (m, small):
        st = tracing.structure(model, (1, HW, HW, 3), prune="all")
        with linen.stored_widths():
            xla = _xla_conv_dot_flops(model, _x(1))
        assert xla == pytest.approx(2 * flops.count(st, count_padding=False).macs, rel=1e-9)


def test_linen_model_through_its_factory_saves_and_loads_bit_exactly(tmp_path):
    model = models.create(FACTORY, image_size=HW, num_classes=10, prune="all")
    randomize(model, seed=1)
    small = surgery.extract(model, [np.arange(w) % 2 == 1 for w in model.widths])
    surgery.save(tmp_path / "p", small, dense_widths=model.widths, image_size=HW)
    back = surgery.load(tmp_path / "p")
    assert back.widths == small.widths
    small.eval(), back.eval()
    assert np.array_equal(np.asarray(small(_x())), np.asarray(back(_x())))


@pytest.mark.slow
def test_cli_trains_cuts_finetunes_and_exports_a_linen_resnet(tmp_path):
    from test_user_models import _main, export_stablehlo

    wd = tmp_path / "w"
    p = _main(f"--workdir={wd}", f"--config.model={FACTORY}", "--config.model_prune=all")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((wd / "results.json").read_text())
    assert r["widths"] != r["dense_widths"] and r["macs_after"] < r["macs_before"]
    small = surgery.load(wd / "pruned_model")
    assert list(small.widths) == r["widths"]
    # Training mode reached Linen's BatchNorm: its running statistics moved from their start.
    means = [v for k, v in nnx.to_flat_state(nnx.state(small, nnx.BatchStat)) if k[-1] == "mean"]
    assert means and any(float(jnp.abs(v[...]).max()) > 0 for v in means)
    e = export_stablehlo(wd, tmp_path / "e")
    assert e.returncode == 0, e.stderr[-2000:]
