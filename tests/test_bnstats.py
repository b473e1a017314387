"""BN re-estimation: forward passes only, exact pooled statistics, against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from sap_jax import models
from sap_jax.structure.codec import ModuleCodec
from sap_jax.train import bnstats


class TwoBN(nnx.Module):
    """conv -> BN -> relu -> gate -> conv -> BN -> mean -> linear: small enough to recompute."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (1, 1), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x, arch=None):
        y = nnx.relu(self.bn1(self.conv1(x)))
        if arch is not None:
            y = y * arch[0]
        return self.head(self.bn2(self.conv2(y)).mean(axis=(1, 2)))


def _np_bn_train(x, scale, bias, eps):
    m, v = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - m) / np.sqrt(v + eps) * scale + bias


def test_pooled_statistics_match_numpy_reference():
    model = TwoBN(nnx.Rngs(0))
    randomize(model, seed=3)
    codec = ModuleCodec(model)
    params, rest = codec.split(model)
    rest = jax.tree.map(lambda x: x * np.nan, rest)  # the old statistics must not matter
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.normal(size=(6, 5, 5, 3)), jnp.float32)} for _ in range(3)]
    arch = [jnp.asarray([1.0, 0.0, 1.0, 1.0])]
    new = bnstats.reestimate(bnstats.make_batch_stats_step(codec), params, rest, batches, arch)

    # Reference: each batch normalised by its own statistics (train mode), pooled over batches.
    k2 = np.asarray(model.conv2.kernel[...])[0, 0]
    s1, b1 = np.asarray(model.bn1.scale[...]), np.asarray(model.bn1.bias[...])
    pre1, pre2 = [], []
    for b in batches:
        x = np.asarray(model.conv1(b["image"]))  # the conv itself; BN and the rest recomputed here
        pre1.append(x)
        y = np.maximum(_np_bn_train(x, s1, b1, model.bn1.epsilon), 0) * np.asarray(arch[0])
        pre2.append(y @ k2)
    for name, pre in (("bn1", pre1), ("bn2", pre2)):
        allx = np.concatenate(pre)
        np.testing.assert_allclose(new[name]["mean"], allx.mean(axis=(0, 1, 2)),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new[name]["var"], allx.var(axis=(0, 1, 2)),
                                   rtol=1e-4, atol=1e-5)
    # Parameters are untouched.
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                     codec.split(model)[0], params))


def test_one_batch_makes_eval_mode_equal_train_mode():
    """With the statistics of one batch, eval mode on that batch reproduces train mode."""
    model = models.create("resnet_cifar_tiny", num_classes=10)
    randomize(model, seed=1)
    codec = ModuleCodec(model)
    params, rest = codec.split(model)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 16, 16, 3)), jnp.float32)
    arch = [jnp.asarray(np.random.default_rng(4).random(w) < 0.6, jnp.float32)
            for w in model.widths]
    new = bnstats.reestimate(bnstats.make_batch_stats_step(codec), params, rest,
                             [{"image": x}], arch)

    train_model = codec.merge(params, rest)
    train_model.train()
    want = train_model(x, arch)
    eval_model = codec.merge(params, new)
    eval_model.eval()
    np.testing.assert_allclose(eval_model(x, arch), want, rtol=2e-4, atol=2e-4)
    stale = codec.merge(params, rest)
    stale.eval()
    assert not np.allclose(stale(x, arch), want, atol=1e-2)  # the stale statistics differ


def test_needs_a_batch():
    model = TwoBN(nnx.Rngs(0))
    codec = ModuleCodec(model)
    params, rest = codec.split(model)
    with pytest.raises(ValueError, match="at least one batch"):
        bnstats.reestimate(bnstats.make_batch_stats_step(codec), params, rest, [], None)
