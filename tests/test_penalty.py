"""Partial group lasso against an independent NumPy reference, gradients and the proximal form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_arch, randomize, slow
from flax import nnx
from jax.test_util import check_grads

from sap_jax import models
from sap_jax.method import penalty
from sap_jax.models.blocks import BasicBlock, Bottleneck, InvertedResidual

FAMILIES = ["resnet_cifar_tiny", "resnet_bottleneck_tiny", "mobilenet_v2_tiny"]


def np_groups(model, include_bn):
    """Per group, the (tensor, channel axis) pairs, written from the block code, not the
    Structure."""
    groups = []
    a = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
    for stage in model.stages:
        for blk in stage:
            if isinstance(blk, BasicBlock):
                layout = [[(blk.conv1, 3, blk.bn1), (blk.conv2, 2, None)]]
            elif isinstance(blk, Bottleneck):
                layout = [[(blk.conv1, 3, blk.bn1), (blk.conv2, 2, None)],
                          [(blk.conv2, 3, blk.bn2), (blk.conv3, 2, None)]]
            elif isinstance(blk, InvertedResidual) and blk.expand:
                layout = [[(blk.expand_conv, 3, blk.expand_bn), (blk.dw_conv, 3, blk.dw_bn),
                           (blk.project_conv, 2, None)]]
            else:
                layout = []
            for group in layout:
                tensors = []
                for conv, axis, bn in group:
                    tensors.append((a(conv.kernel), axis))
                    if bn is not None and include_bn:
                        tensors += [(a(bn.scale)[None], 1), (a(bn.bias)[None], 1)]
                groups.append(tensors)
    return groups


def np_penalty(model, arch, include_bn):
    groups = np_groups(model, include_bn)
    assert len(groups) == len(arch)
    dropped = [1 - np.asarray(v, np.float64) for v in arch]
    total = sum(d.sum() for d in dropped)
    out = 0.0
    for tensors, d in zip(groups, dropped):
        s = 0.0
        for t, axis in tensors:
            t = np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis])
            s += np.sum(d * np.sqrt((t ** 2).sum(0)))
        out += (d.sum() / total if total else 0.0) * s
    return out


_jitted = {}


def jit_penalty(structure, include_bn):
    """One compiled penalty per (structure, include_bn), shared across tests."""
    key = (structure, include_bn)
    if key not in _jitted:
        _jitted[key] = jax.jit(lambda p, v: penalty.partial_group_lasso(p, v, structure,
                                                                          include_bn=include_bn))
    return _jitted[key]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("include_bn", [False, True])
def test_penalty_matches_numpy_reference(name, include_bn):
    model = randomize(models.create(name), seed=2)
    s = model.structure(32)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(3)
    f = jit_penalty(s, include_bn)
    for p_keep in (0.2, 0.5, 0.9):
        arch = random_arch(model.widths, rng, p_keep)
        got = float(f(params, [jnp.asarray(v) for v in arch]))
        want = np_penalty(model, arch, include_bn)
        assert want > 0
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_per_group_weights_are_dropped_shares():
    arch = [np.array([1, 0, 0, 1.]), np.ones(3), np.array([0, 0, 0, 0, 0, 1.])]
    np.testing.assert_allclose(penalty.group_weights(arch), [2 / 7, 0, 5 / 7], rtol=1e-6)
    np.testing.assert_array_equal(penalty.group_weights([np.ones(4), np.ones(2)]), [0, 0])


def test_new_masks_do_not_recompile():
    model = models.create("resnet_bottleneck_tiny")
    s = model.structure(32)
    traces = []

    @jax.jit
    def f(params, arch):
        traces.append(1)
        return jax.grad(lambda p: penalty.partial_group_lasso(p, arch, s))(params)

    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    for _ in range(4):
        f(params, [jnp.asarray(v) for v in random_arch(model.widths, rng)])
    assert len(traces) == 1


@pytest.mark.parametrize("name", FAMILIES[:1] + slow(FAMILIES[1:]))
def test_gradient_matches_finite_differences(name):
    model = randomize(models.create(name), seed=4)
    s = model.structure(32)
    arch = [jnp.asarray(v) for v in random_arch(model.widths, np.random.default_rng(5))]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    check_grads(lambda p: penalty.partial_group_lasso(p, arch, s, include_bn=True), (params,),
                order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


def test_exactly_zero_slices_have_finite_zero_gradient():
    model = randomize(models.create("resnet_cifar_tiny"), seed=0)
    s = model.structure(32)
    model.stages[0][0].conv1.kernel[..., 1] = 0.0  # group 0, channel 1: producing slice zero
    model.stages[0][0].conv2.kernel[..., 1, :] = 0.0  # and the consuming slice
    arch = [jnp.asarray(v) for v in [np.array([1, 0, 0, 1.]), np.ones(8), np.ones(16)]]
    params = nnx.state(model, nnx.Param)
    grads = jax.grad(lambda p: penalty.partial_group_lasso(p, arch, s, include_bn=True))(params)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    g1 = grads["stages"][0][0]["conv1"]["kernel"][...]
    assert np.all(g1[..., 1] == 0) and np.any(g1[..., 2] != 0) and np.all(g1[..., 0] == 0)


def test_nothing_dropped_gives_exactly_zero():
    model = randomize(models.create("mobilenet_v2_tiny"), seed=0)
    s = model.structure(32)
    arch = [jnp.ones(w) for w in model.widths]
    params = nnx.state(model, nnx.Param)
    value, grads = jax.value_and_grad(
        lambda p: penalty.partial_group_lasso(p, arch, s, include_bn=True))(params)
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_mask_errors_are_clear():
    model = models.create("resnet_cifar_tiny")
    s, params = model.structure(32), nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match="mask has 2 vectors but the model has 3 channel groups"):
        penalty.partial_group_lasso(params, [np.ones(4), np.ones(8)], s)
    with pytest.raises(ValueError,
                       match=r"mask\[1\] \(stages.1.0.conv1\) has shape \(7,\); group 1 has 8"):
        penalty.partial_group_lasso(params, [np.ones(4), np.ones(7), np.ones(16)], s)
    other = nnx.state(models.create("mobilenet_v2_tiny"), nnx.Param)
    with pytest.raises(ValueError, match="params lack .* tensor"):
        penalty.partial_group_lasso(other, [np.ones(4), np.ones(8), np.ones(16)], s)


# ---------------------------------------------------------------- proximal form

def np_prox(model, arch, strength):
    """Reference proximal step on a copy of the parameters, from the block code."""
    dropped = [1 - np.asarray(v, np.float64) for v in arch]
    total = sum(d.sum() for d in dropped)
    new = {}
    for tensors_k, conv_refs, d in zip(np_groups(model, False), _conv_refs(model), dropped):
        thr = strength * (d.sum() / total) * d
        for (t, axis), conv in zip(tensors_k, conv_refs):
            t = new.get(id(conv), t)
            n = np.sqrt((np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) ** 2).sum(0))
            factor = np.where(n > thr, 1 - thr / np.where(n > 0, n, 1), 0.0)
            shape = [1] * t.ndim
            shape[axis] = -1
            new[id(conv)] = t * factor.reshape(shape)
    return new


def _conv_refs(model):
    refs = []
    for stage in model.stages:
        for blk in stage:
            if isinstance(blk, BasicBlock):
                refs.append([blk.conv1, blk.conv2])
            elif isinstance(blk, Bottleneck):
                refs += [[blk.conv1, blk.conv2], [blk.conv2, blk.conv3]]
            elif isinstance(blk, InvertedResidual) and blk.expand:
                refs.append([blk.expand_conv, blk.dw_conv, blk.project_conv])
    return refs


@pytest.mark.parametrize("name", FAMILIES)
def test_proximal_step_matches_numpy_reference(name):
    model = randomize(models.create(name), seed=6)
    s = model.structure(32)
    arch = [jnp.asarray(v) for v in random_arch(model.widths, np.random.default_rng(6), 0.5)]
    # Large enough that some dropped slices reach zero, small enough that others survive.
    norms = [np.sqrt((np.moveaxis(t, ax, -1).reshape(-1, t.shape[ax]) ** 2).sum(0))
             for g in np_groups(model, False) for t, ax in g]
    strength = len(model.widths) * float(np.median(np.concatenate(norms)))  # N_k/N ~ 1/K
    want = np_prox(model, arch, strength)
    tx = penalty.proximal_partial_group_lasso(s, strength)
    params = nnx.state(model, nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, arch=arch)
    nnx.update(model, jax.tree.map(lambda w, u: w + u, params, updates))
    hit_zero = 0
    for conv_refs in _conv_refs(model):
        for conv in conv_refs:
            np.testing.assert_allclose(np.asarray(conv.kernel[...]), want[id(conv)],
                                       rtol=1e-5, atol=1e-6)
            hit_zero += int(np.sum(np.all(want[id(conv)] == 0, axis=(0, 1, 2))))
    assert hit_zero > 0
    assert not all(np.all(np.asarray(c.kernel[...]) == 0)
                   for refs in _conv_refs(model) for c in refs)


def test_proximal_leaves_kept_channels_and_plain_sgd_untouched():
    model = randomize(models.create("resnet_cifar_tiny"), seed=1)
    s = model.structure(32)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda w: jnp.full_like(w, 0.01), params)
    sgd = optax.sgd(0.1, momentum=0.9)
    tx = optax.chain(sgd, penalty.proximal_partial_group_lasso(
        s, optax.linear_schedule(0.0, 1.0, 10)))
    arch = [jnp.asarray(v) for v in [np.array([1, 0, 1, 0.]), np.ones(8), np.ones(16)]]
    plain, sgd_state = sgd.update(grads, sgd.init(params), params)
    plain2, _ = sgd.update(grads, sgd_state, params)
    # Step 0 of the schedule has strength 0: exactly plain SGD.
    u0, state = tx.update(grads, tx.init(params), params, arch=arch)
    for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    # Later: dropped slices shrink, kept slices get exactly the SGD update.
    u1, _ = tx.update(grads, state, params, arch=arch)
    k0 = u1["stages"][0][0]["conv1"]["kernel"]
    p0 = plain2["stages"][0][0]["conv1"]["kernel"]
    np.testing.assert_array_equal(k0[..., 0], p0[..., 0])
    assert not np.allclose(k0[..., 1], p0[..., 1])


def test_proximal_works_with_nnx_optimizer_and_needs_the_mask():
    model = randomize(models.create("resnet_cifar_tiny"), seed=1)
    s = model.structure(32)
    arch = [jnp.asarray(v) for v in [np.array([1, 0, 1, 0.]), np.ones(8), np.ones(16)]]
    opt = nnx.Optimizer(model,
                        optax.chain(optax.sgd(0.1), penalty.proximal_partial_group_lasso(s, 0.5)),
                        wrt=nnx.Param)
    before = float(penalty.partial_group_lasso(nnx.state(model, nnx.Param), arch, s))
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, grads, arch=arch)
    after = float(penalty.partial_group_lasso(nnx.state(model, nnx.Param), arch, s))
    assert after < before
    with pytest.raises(ValueError, match="arch=v"):
        opt.update(model, grads)
