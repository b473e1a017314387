"""nnx.State <-> plain string-keyed trees (sap_jax/structure/codec.py): what the trainer jits,
shards and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import randomize
from flax import nnx, traverse_util

from sap_jax import models
from sap_jax.structure.codec import ModuleCodec, path_str


def _model():
    model = models.create("resnet_cifar_tiny", seed=1)
    randomize(model, seed=2)
    return model


def test_split_and_merge_round_trip_every_array_under_the_channel_group_paths():
    model = _model()
    codec = ModuleCodec(model)
    params, rest = codec.split(model)
    flat = traverse_util.flatten_dict(params)
    assert all(isinstance(k, str) for path in flat for k in path)
    # The plain trees use the paths the channel groups name (strings, list indices too).
    owned = {sl.path for g in model.structure(32).groups for sl in g.slices
             if sl.role not in ("bn_mean", "bn_var")}
    assert owned <= set(flat)
    assert ("stages", "0", "0", "bn1", "mean") in traverse_util.flatten_dict(rest)
    back = codec.merge(params, rest)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert codec.rest_of(back).keys() == rest.keys()


def test_path_str_drops_the_variable_value_attribute():
    state = nnx.state(_model(), nnx.Param)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert ("stages", "0", "0", "conv1", "kernel") in paths
    assert not any("value" in p for p in paths)


def test_a_module_merged_inside_jit_differentiates_like_the_module_itself():
    model = _model()
    model.eval()  # BN with running statistics: the same function both ways
    codec = ModuleCodec(model)
    params, rest = codec.split(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    @jax.jit
    def loss_plain(p):
        return jnp.sum(codec.merge(p, rest)(x) ** 2)

    got = loss_plain(params)
    want, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    g_plain = traverse_util.flatten_dict(jax.grad(loss_plain)(params))
    g_nnx = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert set(g_plain) == set(g_nnx)
    for k, v in g_plain.items():
        np.testing.assert_allclose(v, g_nnx[k], rtol=1e-4, atol=1e-6)
