"""Backbones: shapes, the width spec, the gate, and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FULL, TINY, randomize, slow
from flax import nnx

from sap_jax import models

NUM_GROUPS = {"resnet20": 9, "resnet32": 15, "resnet44": 21, "resnet56": 27, "resnet110": 54,
              "resnet18": 8, "resnet34": 16, "resnet50": 32, "resnet101": 66,
              "mobilenet_v2": 16, "mobilenet_v2_cifar": 16}


def _apply(model, x, arch=None):
    model.eval()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x, a: nnx.merge(graphdef, s)(x, a))(state, x, arch)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shapes_and_gate(name):
    model = randomize(models.create(name), seed=3)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    y = _apply(model, x)
    assert y.shape == (2, model.num_classes)
    assert np.all(np.isfinite(y))
    # An all-ones gate is the identity; a gate that drops channels changes the output.
    ones = [jnp.ones(w) for w in model.widths]
    np.testing.assert_allclose(_apply(model, x, ones), y, rtol=1e-6, atol=1e-6)
    half = [jnp.arange(w) % 2 == 0 for w in model.widths]
    assert not np.allclose(_apply(model, x, [h.astype(jnp.float32) for h in half]), y)


def test_a_gated_forward_keeps_the_heads_dropout():
    """Gating runs through the tracer on the features; the head (and its dropout, which needs
    ``rngs``) runs outside, so training with an architecture still drops out."""
    model = randomize(models.create("mobilenet_v2_tiny", dropout=0.5), seed=2)
    model.train()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    arch = [jnp.ones(w) for w in model.widths]
    plain = model(x, arch)
    dropped = [model(x, arch, rngs=nnx.Rngs(dropout=k)) for k in (1, 1, 2)]
    assert not np.allclose(dropped[0], plain)
    np.testing.assert_array_equal(dropped[0], dropped[1])  # same key, same mask
    assert not np.allclose(dropped[0], dropped[2])


@pytest.mark.parametrize("name", slow(FULL))
def test_full_models_shapes_without_allocating(name):
    preset = models.get_preset(name)
    model = models.create_abstract(name)
    assert type(model).__name__ == preset.cls.__name__
    assert model.num_groups == NUM_GROUPS[name]
    size = preset.image_size
    # Build and run inside eval_shape: shapes are traced, no weights are allocated.
    out = jax.eval_shape(lambda x: models.create(name)(x),
                         jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert out.shape == (2, model.num_classes)


def test_pruned_model_is_the_same_class_with_smaller_widths():
    dense = models.create("resnet56")
    small = models.create("resnet56", widths=[3] * 27)
    assert type(small) is type(dense)
    assert small.widths == (3,) * 27
    assert small.stages[0][0].conv1.kernel.shape == (3, 3, 16, 3)
    assert small.stages[0][0].conv2.kernel.shape == (3, 3, 3, 16)


def test_cifar_resnet_depths_and_shortcuts():
    with pytest.raises(ValueError, match="6n"):
        models.create_abstract("resnet56", depth=57)
    with pytest.raises(ValueError, match="shortcut"):
        models.create_abstract("resnet56", shortcut="C")
    b = models.create_abstract("resnet20", shortcut="B")
    a = models.create_abstract("resnet20")
    # Option B adds a 1x1 projection (+BN) at each of the two downsampling blocks.
    count = lambda m: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(b) - count(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_mobilenet_cifar_strides():
    m = models.create_abstract("mobilenet_v2_cifar")
    assert m.total_stride == 8
    assert models.create_abstract("mobilenet_v2").total_stride == 32


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet57'.*Did you mean.*resnet56"):
        models.create("resnet57")


def test_wrong_input_channels_and_image_size():
    model = models.create("resnet_cifar_tiny")
    with pytest.raises(ValueError, match=r"3 channels; got shape \(1, 32, 32, 1\)"):
        model(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"unsupported image size \(30, 30\).*multiples of .* 4"):
        model(jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match=r"unsupported image size 100 .*32"):
        models.create_abstract("resnet50").structure(100)


@pytest.mark.parametrize("widths, msg", [([4, 0, 4], r"widths\[1\] = 0"),
                                         ([4, 4], "3 prunable channel groups but widths has 2"),
                                         ([4, 2.5, 4], r"widths\[1\] = 2.5")])
def test_bad_widths(widths, msg):
    with pytest.raises(ValueError, match=msg):
        models.create_abstract("resnet_cifar_tiny", widths=widths)


def test_config_round_trip_rebuilds_the_same_shapes():
    for name in TINY:
        m = models.create_abstract(name)
        r = models.from_config(type(m).__name__, m.config(), abstract=True)
        assert jax.tree.map(jnp.shape, nnx.state(r)) == jax.tree.map(jnp.shape, nnx.state(m))


@pytest.mark.slow
def test_mobilenet_v2_dropout_applies_in_training_only():
    """The train step draws dropout masks from its key (different keys, different losses; no key,
    no dropout); evaluation never drops."""
    import jax.numpy as jnp
    import optax

    from sap_jax import train
    from sap_jax.structure.codec import ModuleCodec

    model = models.create("mobilenet_v2_tiny", dropout=0.5)
    codec = ModuleCodec(model)
    tx = optax.sgd(0.0)  # measure the loss only; nothing moves
    step = train.make_train_step(codec, model.structure(32), tx, penalty_form="none")
    params, rest = codec.split(model)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32)}
    arch = [jnp.ones(w) for w in model.widths]

    def loss(key=None):
        p, r, o = jax.tree.map(jnp.array, (params, rest, tx.init(params)))  # steps donate
        extra = [key] if key is not None else []
        return float(step(p, r, o, batch, arch, jnp.float32(0), *extra)[3]["loss"])

    k1, k2 = jax.random.key(1), jax.random.key(2)
    assert loss(k1) == loss(k1)  # a key fixes the masks
    assert loss(k1) != loss(k2)  # dropout is on in training
    no_dropout = loss()
    assert no_dropout not in (loss(k1), loss(k2))
    ev = train.make_eval_step(codec)
    out = [ev(params, rest, {**batch, "mask": jnp.ones(4)}, arch)["loss"] for _ in range(2)]
    assert float(out[0]) == float(out[1])
    # Without dropout, the train-mode loss is the model's plain forward in train mode.
    m = codec.merge(params, rest)
    m.train()
    want = optax.softmax_cross_entropy_with_integer_labels(m(batch["image"]), batch["label"]).mean()
    np.testing.assert_allclose(no_dropout, float(want), rtol=1e-5)
