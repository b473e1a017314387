"""The declarative channel-group description matches the real modules."""

import numpy as np
import pytest
from conftest import FULL, TINY
from flax import nnx, traverse_util

from sap_jax import models
from sap_jax.structure import flops
from sap_jax.structure import groups as G


def _flat_shapes(model):
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    return {G.as_path(k): tuple(v.shape) for k, v in flat.items()}


@pytest.mark.parametrize("name", TINY + FULL)
def test_description_covers_every_tensor_with_the_right_shape(name):
    model = models.create_abstract(name)
    s = model.structure(models.get_preset(name).image_size)
    described = s.param_shapes()
    assert described == _flat_shapes(model)
    # The parameter count read from the description equals the real one.
    n_params = sum(int(np.prod(v.shape)) for v in
                   jax_leaves(nnx.state(model, nnx.Param)))
    assert flops.count(s).params == n_params


def jax_leaves(state):
    import jax
    return jax.tree.leaves(state)


@pytest.mark.parametrize("name", TINY + FULL)
def test_every_slice_has_the_group_size_on_its_axis(name):
    model = models.create_abstract(name)
    s = model.structure(models.get_preset(name).image_size)
    shapes = _flat_shapes(model)
    assert s.num_groups == len(model.widths) > 0
    for g in s.groups:
        roles = {sl.role for sl in g.slices}
        # Each group is produced by a conv (or depthwise), consumed, and normalised.
        assert {"bn_scale", "bn_bias", "bn_mean", "bn_var"} <= roles
        assert "in" in roles and ("out" in roles)
        for sl in g.slices:
            assert shapes[sl.path][sl.axis] == g.size, (g.name, sl)


def test_group_layout_per_block_type():
    basic = models.create_abstract("resnet_cifar_tiny").structure(32).groups[0]
    assert {(sl.path[-2], sl.role) for sl in basic.slices if sl.role in ("in", "out")} == {
        ("conv1", "out"), ("conv2", "in")}
    bott = models.create_abstract("resnet_bottleneck_tiny").structure(32).groups
    assert {(sl.path[-2], sl.role) for sl in bott[0].slices if "bn" not in sl.role} == {
        ("conv1", "out"), ("conv2", "in")}
    assert {(sl.path[-2], sl.role) for sl in bott[1].slices if "bn" not in sl.role} == {
        ("conv2", "out"), ("conv3", "in")}
    mb = models.create_abstract("mobilenet_v2_tiny").structure(32).groups[0]
    assert {(sl.path[-2], sl.role) for sl in mb.slices if "bn" not in sl.role} == {
        ("expand_conv", "out"), ("dw_conv", "depthwise"), ("project_conv", "in")}
    assert {sl.path[-2] for sl in mb.slices if sl.role == "bn_scale"} == {"expand_bn", "dw_bn"}


def test_unpruned_layers_are_outside_every_group():
    for name in ("resnet56", "resnet50", "mobilenet_v2"):
        s = models.create_abstract(name).structure(models.get_preset(name).image_size)
        owned = {sl.path[:-1] for g in s.groups for sl in g.slices}
        for layer in ("stem_conv", "stem_bn", "head"):
            assert (layer,) not in owned
        # Residual widths: the last conv of every block produces an unpruned width.
        assert not any(p[-1] in ("conv3", "project_conv") or p[-1] == "down_conv"
                       for g in s.groups for sl in g.slices if sl.role == "out"
                       for p in [sl.path[:-1]])


def test_mobilenet_blocks_without_expansion_have_no_group():
    model = models.create_abstract("mobilenet_v2")
    first = model.stages[0][0]
    assert not first.expand and first.num_groups == 0
    assert len(model.widths) == 16  # 17 blocks, the first has expand ratio 1


def test_check_arch_errors_name_the_group_and_fix():
    widths = (4, 8)
    with pytest.raises(ValueError, match="has 1 vectors but the model has 2 channel groups"):
        G.check_arch([np.ones(4)], widths)
    with pytest.raises(ValueError, match=r"\[1\] .*shape \(7,\).*must have shape \(8,\)"):
        G.check_arch([np.ones(4), np.ones(7)], widths)
    with pytest.raises(ValueError, match="sequence of 2 vectors"):
        G.check_arch(None, widths)


def test_check_binary_rejects_soft_vectors():
    with pytest.raises(ValueError, match="not binary: it holds 0.3.*v > 0.5"):
        G.check_binary([np.array([1.0, 0.3, 0.0])])
    out = G.check_binary([np.array([1, 0, 1]), np.array([True, False])])
    assert out[0].tolist() == [True, False, True] and out[1].dtype == bool


def test_min_kept_rule_keeps_the_strongest_channel(caplog):
    arch = [np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.0])]
    scores = [np.array([0.1, 3.0, 2.0]), np.array([5.0, 9.0])]
    out = G.ensure_min_kept(arch, scores, ["a", "b"])
    assert out[0].tolist() == [False, True, False]
    assert out[1].tolist() == [True, False]  # already satisfied: unchanged
    assert "group a kept no channel" in caplog.text
