"""The norm-based baselines (sap_jax/method/baselines.py): channel scores and choosing by them."""

import numpy as np
import pytest

from sap_jax import models
from sap_jax.method import baselines
from sap_jax.structure import flops
from sap_jax.structure import norms as norms_lib


def test_l1_baseline_keeps_the_largest_filters_to_given_widths():
    from flax import nnx

    model = models.create("resnet_cifar_tiny", seed=3)
    s = model.structure(32)
    params = nnx.state(model, nnx.Param)
    norms = norms_lib.channel_norms(params, s, "l1")
    # Independent check: the L1 norm of each producing conv filter (output channel).
    kernel = np.asarray(params["stages"][0][0]["conv1"]["kernel"])
    np.testing.assert_allclose(norms[0], np.abs(kernel).sum((0, 1, 2)), rtol=1e-6)
    arch = baselines.arch_by_norm(norms, s, widths=[2, 3, 5])
    assert [int(v.sum()) for v in arch] == [2, 3, 5]
    for v, n in zip(arch, norms):
        assert n[v == 1].min() >= n[v == 0].max()


def test_norm_cut_meets_the_budget_and_drops_small_channels_first():
    from flax import nnx

    model = models.create("resnet20")
    s = model.structure(32)
    norms = norms_lib.channel_norms(nnx.state(model, nnx.Param), s, "group_l2")
    arch = baselines.arch_by_norm(norms, s, p=0.4)
    assert float(flops.mac_ratio(s, arch)) <= 0.4
    assert all(v.sum() >= 1 for v in arch)
    kept = np.concatenate([n[v == 1] for n, v in zip(norms, arch)])
    dropped = np.concatenate([n[v == 0] for n, v in zip(norms, arch)])
    assert np.median(kept) > np.median(dropped)
    with pytest.raises(ValueError, match="exactly one"):
        baselines.arch_by_norm(norms, s)
    with pytest.raises(ValueError, match=r"in \[1, C_k\]"):
        baselines.arch_by_norm(norms, s, widths=[0] * len(norms))
