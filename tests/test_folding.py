"""Batch norm folded into the conv before it (sap_jax/surgery/folding.py): folded equals
unfolded, in fp32, for the presets, a pruned model and any user's network; BatchNorms that do
not directly follow a conv stay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from examples import zoo
from sap_jax import models, surgery

RTOL = 1e-5  # of the largest logit, fp32


def _images(size=32, n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _arrays(model):
    return {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(model))}


def _logits(model, x):
    """``model(x)``, jitted (one compile beats op-by-op dispatch)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _count(model, cls):
    return sum(isinstance(m, cls) for _, m in nnx.iter_graph(model))


def _check_folded(model, x, *, folded_bns, left_bns=0, sample=None):
    """Fold ``model`` and check the logits, the count of folded BatchNorms, the BatchNorms left
    and that ``model`` itself is untouched; returns the folded model."""
    model.eval()
    before = _arrays(model)
    graph_before = nnx.graphdef(model)
    want = _logits(model, x)
    folded = surgery.fold_bn(model, sample)
    assert type(folded) is type(model)
    assert len(surgery.folded_batch_norms(folded)) == folded_bns
    assert _count(folded, nnx.BatchNorm) == left_bns
    assert _count(folded, surgery.FoldedBatchNorm) == folded_bns
    got = _logits(folded, x)
    err = np.abs(got - want).max()
    assert err <= RTOL * np.abs(want).max(), (err, np.abs(want).max())
    # The original is unchanged: same graph (its BatchNorms still there), same arrays.
    assert nnx.graphdef(model) == graph_before
    after = _arrays(model)
    assert after.keys() == before.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert np.array_equal(_logits(model, x), want)
    return folded


def test_folded_equals_unfolded_resnet_cifar():
    model = randomize(models.create("resnet_cifar_tiny"), seed=1)
    n = _count(model, nnx.BatchNorm)
    assert n == 7  # stem + 2 per block, every one after its conv
    pairs = surgery.conv_bn_pairs(model)
    assert pairs[:3] == [("stem_conv", "stem_bn"), ("stages.0.0.conv1", "stages.0.0.bn1"),
                         ("stages.0.0.conv2", "stages.0.0.bn2")]
    folded = _check_folded(model, _images(), folded_bns=n)
    # Each folded conv now has a bias; only the BNs' scale stays (the blocks read it as an
    # anchor), not their statistics.
    assert folded.stem_conv.use_bias and folded.stem_conv.bias is not None
    paths = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(folded))}
    assert "stages/0/0/bn1/scale" in paths and "stem_bn/scale" not in paths
    assert not any(p.endswith(("/mean", "/var")) for p in paths)


def test_folded_equals_unfolded_mobilenet_v2_with_depthwise_convs():
    model = randomize(models.create("mobilenet_v2_tiny"), seed=2)
    n = _count(model, nnx.BatchNorm)
    folded = _check_folded(model, _images(), folded_bns=n, sample=32)
    dw = folded.stages[1][0].dw_conv
    assert dw.feature_group_count == dw.in_features > 1 and dw.use_bias  # depthwise, folded
    assert ("stages.1.0.dw_conv", "stages.1.0.dw_bn") in surgery.conv_bn_pairs(model)


def test_folded_equals_unfolded_pruned_model(rng):
    dense = randomize(models.create("resnet_bottleneck_tiny"), seed=3)
    arch = [(rng.random(w) < 0.5).astype(np.float32) for w in dense.widths]
    pruned = surgery.extract(dense, arch)
    assert pruned.widths != dense.widths
    _check_folded(pruned, _images(), folded_bns=_count(pruned, nnx.BatchNorm))


class _UserCNN(nnx.Module):
    """A user's network with every case: a conv with a bias then a BN (folded); a BN on the
    input, a BN after a residual add and a BN on a conv output that the skip reads too (all
    three stay); a conv then a BN inside an nnx.Sequential (folded)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, rngs: nnx.Rngs):
        c = 6
        self.in_bn = nnx.BatchNorm(in_channels, rngs=rngs)
        self.conv1 = nnx.Conv(in_channels, c, (3, 3), use_bias=True, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c, rngs=rngs)
        self.add_bn = nnx.BatchNorm(c, rngs=rngs)
        self.conv3 = nnx.Conv(c, c, (1, 1), rngs=rngs)
        self.bn3 = nnx.BatchNorm(c, rngs=rngs)
        self.seq = nnx.Sequential(nnx.Conv(c, c, (3, 3), strides=2, rngs=rngs),
                                  nnx.BatchNorm(c, rngs=rngs))
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.in_bn(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        z = self.add_bn(self.bn2(self.conv2(y)) + y)
        c = self.conv3(nnx.relu(z))
        y = nnx.relu(self.bn3(c)) + c
        y = nnx.relu(self.seq(y))
        return self.head(y.mean(axis=(1, 2)))


def user_cnn(num_classes: int = 10, in_channels: int = 3, *, rngs: nnx.Rngs) -> nnx.Module:
    return _UserCNN(num_classes, in_channels, rngs=rngs)


def test_folded_equals_unfolded_user_network_in_a_traced_model():
    model = models.TracedModel(f"{__name__}:user_cnn", image_size=8, num_classes=10)
    randomize(model, seed=4)
    assert surgery.conv_bn_pairs(model) == [("net.conv1", "net.bn1"), ("net.conv2", "net.bn2"),
                                            ("net.seq.layers.0", "net.seq.layers.1")]
    folded = _check_folded(model, _images(8), folded_bns=3, left_bns=3)
    net = folded.net
    assert isinstance(net.bn1, surgery.FoldedBatchNorm)
    assert isinstance(net.seq.layers[1], surgery.FoldedBatchNorm)
    for name in ("in_bn", "add_bn", "bn3"):  # not directly after a conv: unchanged
        assert isinstance(getattr(net, name), nnx.BatchNorm)
    assert net.conv3.kernel[...].shape == model.net.conv3.kernel[...].shape
    assert np.array_equal(net.conv3.kernel[...], model.net.conv3.kernel[...])
    # A module that is no PrunableModel needs a sample; the folded one equals this one.
    raw = randomize(user_cnn(rngs=nnx.Rngs(0)), seed=5)
    with pytest.raises(ValueError, match="sample input"):
        surgery.fold_bn(raw)
    _check_folded(raw, _images(8), folded_bns=3, left_bns=3, sample=_images(8))


@pytest.mark.slow  # eight more models to build
def test_folded_equals_unfolded_on_the_zoo():
    """Every user-style model of examples/zoo.py: pre-activation BatchNorms (DenseNet) stay,
    a model without BatchNorm (ConvNeXt) is only copied."""
    want = {"convnext": (0, 0), "densenet": (3, 5), "flatten_cnn": (2, 0), "vgg11_bn": (8, 0),
            "se_resnet": (6, 0), "mobilenet_v3": (8, 0), "resnext": (8, 0)}
    for i, (name, (n, left)) in enumerate(sorted(want.items())):
        model = randomize(zoo.ZOO[name](10, 3, image_size=8, width=4), seed=i)
        _check_folded(model, _images(8), folded_bns=n, left_bns=left, sample=(1, 8, 8, 3))


class _DoubledBN(nnx.BatchNorm):
    def __call__(self, x, **kwargs):
        return 2 * super().__call__(x, **kwargs)


def test_a_conv_read_twice_a_bn_in_train_mode_or_a_bn_of_its_own_is_not_folded():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
            self.bn2 = nnx.BatchNorm(4, rngs=rngs)
            self.conv3 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
            self.bn3 = _DoubledBN(4, rngs=rngs)

        def __call__(self, x):
            y = self.bn(self.conv(x))
            y = self.bn2(self.conv2(y), use_running_average=False)
            return self.bn3(self.conv3(y)) + self.conv(x).sum()

    net = randomize(Net(nnx.Rngs(0)), seed=6)
    # conv is called twice, bn2 in train mode, bn3 computes more than a BatchNorm.
    assert surgery.conv_bn_pairs(net, (1, 8, 8, 3)) == []
