"""AGN, straight-through Gumbel-sigmoid, resource loss and the AGN objective, against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import randomize, slow
from flax import nnx
from test_resource import np_resource

from sap_jax import models
from sap_jax.method import agn as A
from sap_jax.method import resource
from sap_jax.structure import flops


def np_agn(g):
    """The AGN forward pass in NumPy, from its parameters (flax GRU convention)."""
    p = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
    z = p(g.z)
    wi, bi, wh = p(g.gru.dense_i.kernel), p(g.gru.dense_i.bias), p(g.gru.dense_h.kernel)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    h, hs = np.zeros(wh.shape[0]), []
    for zk in z:
        xr, xz, xn = np.split(zk @ wi + bi, 3)
        hr, hz, hn = np.split(h @ wh, 3)
        r, u = sig(xr + hr), sig(xz + hz)
        h = (1 - u) * np.tanh(xn + r * hn) + u * h
        hs.append(h)
    H = np.stack(hs)
    mu, var = H.mean(-1, keepdims=True), H.var(-1, keepdims=True)
    H = (H - mu) / np.sqrt(var + g.norm.epsilon) * p(g.norm.scale) + p(g.norm.bias)
    H = 0.5 * H * (1 + np.vectorize(math.erf)(H / math.sqrt(2)))  # exact GELU
    return [H[k] @ p(head.kernel) + p(head.bias) for k, head in enumerate(g.heads)]


def test_agn_matches_numpy_and_table_2_shapes():
    sizes = (4, 8, 16, 5)
    g = A.AGN(sizes, seed=3)
    assert g.z.shape == (4, 32) and g.gru.hidden_features == 64
    assert [h.kernel.shape for h in g.heads] == [(64, c) for c in sizes]
    got = jax.jit(lambda g: g())(g)
    for o, w in zip(got, np_agn(g)):
        np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-5)


def test_z_is_fixed_seeded_and_not_trained():
    a, b, c = A.AGN((4, 8), seed=0), A.AGN((4, 8), seed=0), A.AGN((4, 8), seed=1)
    np.testing.assert_array_equal(a.z[...], b.z[...])
    assert not np.allclose(a.z[...], c.z[...])
    params = nnx.state(a, nnx.Param)
    assert "z" not in params and "z" in nnx.state(a)
    grads = nnx.grad(lambda g: sum(jnp.sum(o) for o in g()))(a)
    assert "z" not in grads


def test_gumbel_sigmoid_forward_and_straight_through_gradient():
    o = jnp.linspace(-6.0, 2.0, 41)
    key = jax.random.key(0)
    g = np.asarray(jax.random.gumbel(key, o.shape))
    tau, b = 0.4, 3.0
    s = 1 / (1 + np.exp(-(np.asarray(o) + g + b) / tau))
    v = A.gumbel_sigmoid(o, key, tau=tau, offset=b)
    np.testing.assert_array_equal(v, np.round(s))
    assert set(np.unique(v)) <= {0.0, 1.0}
    grad = jax.grad(
        lambda o: jnp.sum(A.gumbel_sigmoid(o, key, tau=tau, offset=b) * jnp.arange(41.0)))(o)
    np.testing.assert_allclose(grad, s * (1 - s) / tau * np.arange(41.0), rtol=1e-4, atol=1e-7)
    # Deterministic mode: no noise.
    det = A.gumbel_sigmoid(o, None)
    np.testing.assert_array_equal(det, (np.asarray(o) + 3.0 > 0).astype(np.float32))


@pytest.mark.parametrize("name", slow(["resnet56", "resnet50", "mobilenet_v2"]))
def test_pruning_starts_from_the_whole_model(name):
    widths = models.create_abstract(name).widths
    g = A.AGN(widths, seed=0)
    sample = jax.jit(lambda g, k: g.sample(k))
    kept = np.concatenate([np.asarray(v) for v in sample(g, jax.random.key(1))])
    assert kept.mean() > 0.97, kept.mean()
    assert all(v.all() for v in g.architecture())


def test_temperature_errors():
    with pytest.raises(ValueError, match="tau = 0 must be > 0"):
        A.gumbel_sigmoid(jnp.zeros(3), tau=0)
    with pytest.raises(ValueError, match="tau = -1.0"):
        A.AGN((3,)).sample(jax.random.key(0), tau=-1.0)


# ---------------------------------------------------------------- resource loss

# ---------------------------------------------------------------- AGN objective

@pytest.fixture(scope="module")
def setup():
    model = randomize(models.create("resnet_cifar_tiny"), seed=0)
    apply_fn, state = models.gated_apply(model)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 8))}
    return model, apply_fn, state, batch


def test_agn_objective_value_metrics_and_agn_only_gradients(setup):
    model, apply_fn, state, batch = setup
    s = model.structure(32)
    g = A.AGN(model.widths, seed=0)
    res = resource.ResourceLoss(0.5, lam=6.0)
    key = jax.random.key(3)
    step = nnx.jit(lambda g, key: A.agn_value_and_grad(g, apply_fn, state, batch, key,
                                                        structure=s, resource=res))
    loss, m, grads = step(g, key)
    # Independent recomputation with the same sampled architecture.
    arch = g.sample(key)
    model.eval()
    logits = np.asarray(model(batch["image"], arch), np.float64)
    logp = (logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True))
    ce = -logp[np.arange(8), np.asarray(batch["label"])].mean()
    widths = [float(np.sum(v)) for v in arch]
    full, sub = flops.count(s), flops.count(s, widths)
    r = sub.prunable_macs / full.prunable_macs
    np.testing.assert_allclose(m["ce"], ce, rtol=1e-4)
    np.testing.assert_allclose(m["mac_ratio"], r, rtol=1e-5)
    np.testing.assert_allclose(m["mac_ratio_total"], sub.macs / full.macs, rtol=1e-5)
    np.testing.assert_allclose(m["resource_loss"], 6.0 * np_resource(r, 0.5, "one_sided"),
                               rtol=1e-4)
    np.testing.assert_allclose(loss, ce + 6.0 * np_resource(r, 0.5, "one_sided"), rtol=1e-4)
    np.testing.assert_allclose(m["kept_fraction"], [np.mean(v) for v in arch])
    # Gradients: exactly the AGN's parameters, and they are not all zero.
    assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(g, nnx.Param))
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(grads))


def test_agn_learns_to_meet_the_budget(setup):
    model, apply_fn, state, batch = setup
    s = model.structure(32)
    g = A.AGN(model.widths, seed=0)
    res = resource.ResourceLoss(0.4, lam=8.0)
    opt = nnx.Optimizer(g, optax.adamw(1e-2, weight_decay=1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(g, opt, key):
        loss, m, grads = A.agn_value_and_grad(g, apply_fn, state, batch, key, structure=s,
                                              resource=res)
        opt.update(g, grads)
        return m

    ratios = [float(step(g, opt, jax.random.key(i))["mac_ratio"]) for i in range(150)]
    assert ratios[0] > 0.9 and min(ratios[-10:]) < 0.5, ratios[::10]


def test_agn_objective_rejects_a_mismatched_generator(setup):
    model, apply_fn, state, batch = setup
    with pytest.raises(ValueError, match=r"AGN generates groups of sizes \[4, 8\]"):
        A.agn_loss(A.AGN((4, 8)), apply_fn, state, batch, None, structure=model.structure(32),
                   resource=resource.ResourceLoss(0.5))
