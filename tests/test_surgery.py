"""Extraction gives a smaller model of the same class that computes the gated dense model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FULL, TINY, random_arch, randomize
from flax import nnx

from sap_jax import models, surgery
from sap_jax.structure import flops


def forward(model, x, arch=None):
    """Eval-mode forward, jitted (one compile per model shape)."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x, arch):
        return nnx.merge(graphdef, state)(x, arch)

    return np.asarray(
        f(state, x, None if arch is None else [jnp.asarray(v, jnp.float32) for v in arch]))


def assert_equivalent(dense, arch, x):
    pruned = surgery.extract(dense, arch)
    kept = surgery.kept_arch(dense, arch)
    want, got = forward(dense, x, kept), forward(pruned, x)
    scale = np.max(np.abs(want))
    assert scale > 1e-3  # the check is not vacuous
    assert np.max(np.abs(want - got)) <= 1e-5 * scale
    return pruned, kept


def _input(size, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.mark.parametrize("name", TINY + ["resnet_cifar_tiny_b"])
def test_extraction_equals_gated_dense_on_random_vectors(name):
    kwargs = {}
    if name.endswith("_b"):
        name, kwargs = name[:-2], {"shortcut": "B"}
    dense = randomize(models.create(name, **kwargs), seed=1)
    rng = np.random.default_rng(7)
    for p_keep in (0.3, 0.7):
        arch = random_arch(dense.widths, rng, p_keep)
        pruned, kept = assert_equivalent(dense, arch, _input(32))
        assert type(pruned) is type(dense)
        assert pruned.widths == tuple(int(k.sum()) for k in kept)
        # The extracted model is rebuilt from its width spec alone.
        rebuilt = models.from_config(type(pruned).__name__, pruned.config(), abstract=True)
        assert (jax.tree.map(jnp.shape, nnx.state(rebuilt))
                == jax.tree.map(jnp.shape, nnx.state(pruned)))


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_extraction_equivalence_full_size_models(name):
    dense = randomize(models.create(name), seed=2)
    arch = random_arch(dense.widths, np.random.default_rng(3), 0.5)
    pruned, _ = assert_equivalent(dense, arch, _input(dense.total_stride * 1, batch=2)
                                  if dense.total_stride > 8 else _input(32))
    s_d, s_p = dense.structure(32), pruned.structure(32)
    assert flops.count(s_p).macs < flops.count(s_d).macs


@pytest.mark.parametrize("name", ["resnet_bottleneck_tiny", "mobilenet_v2_tiny"])
def test_edge_cases_all_kept_and_one_kept(name):
    dense = randomize(models.create(name), seed=4)
    x = _input(32)
    pruned, _ = assert_equivalent(dense, [np.ones(w) for w in dense.widths], x)
    assert pruned.widths == dense.widths
    one = [np.eye(w)[w - 1] for w in dense.widths]  # only the last channel of each group
    pruned, _ = assert_equivalent(dense, one, x)
    assert set(pruned.widths) == {1}


def test_empty_group_keeps_its_strongest_channel(caplog):
    dense = randomize(models.create("resnet_cifar_tiny"), seed=5)
    arch = [np.zeros(dense.widths[0]), np.ones(dense.widths[1]), np.ones(dense.widths[2])]
    pruned, kept = assert_equivalent(dense, arch, _input(32))
    assert pruned.widths[0] == 1
    assert int(np.argmax(kept[0])) == int(np.argmax(surgery.channel_scores(dense)[0]))
    assert "kept no channel" in caplog.text


def test_extraction_composes():
    dense = randomize(models.create("mobilenet_v2_cifar_tiny"), seed=6)
    rng = np.random.default_rng(8)
    first = surgery.extract(dense, random_arch(dense.widths, rng, 0.7))
    assert_equivalent(first, random_arch(first.widths, rng, 0.7), _input(32))


def test_bad_vectors_get_clear_errors():
    dense = models.create("resnet_cifar_tiny")
    good = [np.ones(w) for w in dense.widths]
    with pytest.raises(ValueError, match="has 2 vectors but the model has 3 channel groups"):
        surgery.extract(dense, good[:2])
    with pytest.raises(ValueError, match=r"shape \(5,\); group 0 has 4 channels"):
        surgery.extract(dense, [np.ones(5)] + good[1:])
    with pytest.raises(ValueError, match="not binary"):
        surgery.extract(dense, [np.full(4, 0.5)] + good[1:])
    with pytest.raises(ValueError, match="architecture vector\\[0\\]"):
        dense(_input(32), [jnp.ones(3)] + good[1:])


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip(name, tmp_path):
    dense = randomize(models.create(name), seed=9)
    pruned = surgery.extract(dense, random_arch(dense.widths, np.random.default_rng(10)))
    path = surgery.save(tmp_path / "pruned", pruned, dense_widths=dense.widths, image_size=32)
    info = json.loads((tmp_path / "pruned" / "model.json").read_text())
    assert info["widths"] == list(pruned.widths) and info["dense_widths"] == list(dense.widths)
    loaded = surgery.load(path)
    assert type(loaded) is type(pruned) and loaded.widths == pruned.widths
    x = _input(32)
    np.testing.assert_array_equal(forward(loaded, x), forward(pruned, x))
    with pytest.raises(ValueError, match="already holds a saved model"):
        surgery.save(path, pruned)


def test_load_errors_name_the_path(tmp_path):
    dense = models.create("resnet_cifar_tiny")
    with pytest.raises(ValueError, match="model.json is missing"):
        surgery.load(tmp_path)
    path = surgery.save(tmp_path / "m", dense)
    jpath = os.path.join(path, "model.json")
    info = json.loads(open(jpath).read())
    info["config"]["widths"] = [2, 8, 16]  # no longer matches the saved arrays
    open(jpath, "w").write(json.dumps(info))
    with pytest.raises(ValueError, match=r"saved in .*/m cannot fill .*widths \[2, 8, 16\] "
                                         r"\(0 missing, 0 unexpected, 6 mis-shaped"):
        surgery.load(path)
    open(jpath, "w").write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        surgery.load(path)
