"""Shared test helpers. Models are tiny or abstract so the suite stays fast on 2 CPU cores."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402

from sap_jax import models  # noqa: E402

TINY = ["resnet_cifar_tiny", "resnet_tiny", "resnet_bottleneck_tiny", "mobilenet_v2_tiny",
        "mobilenet_v2_cifar_tiny"]
FULL = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34",
        "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v2_cifar"]
assert sorted(TINY + FULL) == models.names(), "add new presets to TINY or FULL"


def tiny_config(**overrides):
    """tests/support/tiny_config.py with dotted fields overridden:
    ``tiny_config(**{"budget.p": 0.3})``."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from support import tiny_config as tiny

    c = tiny.get_config()
    for k, v in overrides.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def slow(names):
    """``names`` as parameters of the full suite only (pytest -m "not slow" leaves them out)."""
    return [pytest.param(n, marks=pytest.mark.slow) for n in names]


def randomize(model, seed: int = 0):
    """Give every parameter and BN statistic random values, in place.

    Fresh BNs have scale 1, bias 0, mean 0, var 1, which would let a wrong
    slice of BN tensors go unnoticed; random ones make every tensor matter.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    for path, x in flat.items():
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            continue  # random keys and their counters
        name, shape = path[-1], x.shape
        if name == "var":
            v = rng.uniform(0.5, 2.0, shape)
        elif name == "scale":
            v = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean"):
            v = rng.normal(0.0, 0.5, shape)
        else:  # kernels: keep the He-style scale so deep nets stay finite
            v = np.asarray(x) * rng.uniform(0.5, 1.5, shape)
        flat[path] = jax.numpy.asarray(v, x.dtype)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)
    return model


def random_arch(widths, rng, p_keep=0.5):
    return [(rng.random(w) < p_keep).astype(np.float32) for w in widths]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
