"""The resource loss R(T(v)/T_full, p) and its budget object (sap_jax/method/resource.py), against
NumPy, and the budget read from a run config."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sap_jax import models
from sap_jax.method import resource
from sap_jax.structure import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def np_resource(r, p, form, eps=0.005):
    if form == "one_sided":
        return math.log(max(r, p) / p)
    return math.log(max(r, p + eps) / p) if r > p else math.log(p / min(r, p - eps))


@pytest.mark.parametrize("form", ["one_sided", "two_sided"])
def test_resource_loss_matches_numpy(form):
    for p in (0.3, 0.48, 1.0):
        for r in (0.05, 0.29, 0.3, 0.301, 0.47, 0.5, 0.9, 1.0):
            got = float(resource.resource_loss(jnp.float32(r), p, form=form))
            np.testing.assert_allclose(got, np_resource(r, p, form), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["one_sided", "two_sided"])
def test_resource_loss_gradients(form):
    for r in (0.2, 0.7, 0.95):  # away from the kinks at p and p +- eps
        check_grads(lambda r: resource.resource_loss(r, 0.48, form=form), (jnp.float32(r),),
                    order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # Inside the dead band the two-sided loss is flat; under budget the one-sided one is.
    flat = 0.481 if form == "two_sided" else 0.2
    assert float(jax.grad(lambda r: resource.resource_loss(r, 0.48, form=form))(flat)) == 0.0


def test_budget_errors():
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"budget p = {p} must lie in \(0, 1\]"):
            resource.ResourceLoss(p)
    with pytest.raises(ValueError, match="unknown resource-loss form 'hinge'"):
        resource.ResourceLoss(0.5, form="hinge")
    with pytest.raises(ValueError, match="scope"):
        resource.ResourceLoss(0.5, scope="convs")
    with pytest.raises(ValueError, match="eps"):
        resource.ResourceLoss(0.01, form="two_sided", eps=0.02)


def test_the_generator_aims_at_p_minus_the_margin_of_the_configs_budget_section():
    from support import tiny_config

    from sap_jax.train import spec

    c = tiny_config.get_config()
    c.budget.p, c.budget.target_margin, c.budget.lam, c.budget.form = 0.4, 0.01, 6.0, "two_sided"
    c.budget.eps, c.budget.scope = 0.002, "total"
    budget = spec.from_config(c).budget
    # Two targets, two names: the cut meets p; the generator aims at p - target_margin.
    assert (budget.p, budget.generator_target) == (0.4, 0.39)
    assert spec.cut_policy(budget, backend="cpu").p == 0.4
    loss = spec.resource_loss(budget)
    assert (loss.p, loss.lam, loss.form, loss.eps, loss.scope) == (
        0.39, 6.0, "two_sided", 0.002, "total")
    # Called on an architecture, it gives lam * R at the MAC ratio over its scope.
    model = models.create_abstract(c.model)
    s = model.structure(c.image_size)
    arch = [jnp.concatenate([jnp.ones(w // 2), jnp.zeros(w - w // 2)]) for w in s.widths]
    value, r = loss(s, arch)
    assert float(r) == pytest.approx(float(flops.mac_ratio(s, arch, "total")))
    assert float(value) == pytest.approx(
        6.0 * np_resource(float(r), 0.39, "two_sided", 0.002), rel=1e-4)


def test_adaptive_lambda_rests_in_the_dead_band_and_does_not_wind_up_at_its_cap():
    """The controller's three regimes, against the rule written out: over the band it grows
    by rate * (r - p) / p, inside [p - eps, p + eps] it holds still (the loss is flat there),
    under the band it relaxes; clipped to [0, log cap], and at the cap one step under the band
    moves it down at once (no stored excess to unwind)."""
    p, eps, rate, max_log = 0.4, 0.01, 0.5, math.log(8.0)
    step = jax.jit(lambda ll, r: resource.adapt_log_lam(ll, r, p, rate=rate, eps=eps,
                                                        max_log=max_log))
    ll = jnp.float32(0.3)
    for r in (p - 0.99 * eps, p - 0.5 * eps, p, p + 0.9 * eps, p + 0.99 * eps):  # in the band
        assert float(step(ll, r)) == pytest.approx(0.3)
    assert float(step(ll, p + 1.5 * eps)) == pytest.approx(0.3 + rate * 1.5 * eps / p)
    assert float(step(ll, 0.5)) == pytest.approx(0.3 + rate * 0.1 / p)
    assert float(step(ll, 0.3)) == pytest.approx(0.3 - rate * 0.1 / p)
    assert float(step(jnp.float32(0.0), 0.1)) == 0.0  # never under lam itself
    ll = jnp.float32(0.0)
    for _ in range(50):  # far over budget for long: it reaches the cap and stays there
        ll = step(ll, 1.0)
    assert float(ll) == pytest.approx(max_log)
    assert float(step(ll, 0.35)) == pytest.approx(max_log - rate * 0.05 / p, rel=1e-6)
