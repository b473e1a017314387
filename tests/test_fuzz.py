"""Property-based bad input: every config or CLI override either validates or fails with a clear
error before anything compiles; the functional API answers wrong arrays with ValueError."""

import os
import sys

import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from sap_jax import cli, models, surgery
from sap_jax.method import agn, penalty
from sap_jax.structure import flops
from sap_jax.train import config as config_lib

pytestmark = pytest.mark.slow  # hypothesis: hundreds of examples per test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import tiny_config  # noqa: E402

FIELDS = sorted(k for k, _ in __import__("flax").traverse_util.flatten_dict(
    tiny_config.get_config().to_dict(), sep=".").items())
VALUES = st.one_of(
    st.integers(-3, 400).map(str),
    st.sampled_from(["0", "1", "-1", "0.5", "1.5", "1e-9", "1e40", "nan", "inf", "-inf", "True",
                     "False", "None", "", "abc", "(1, 2)", "(2, 1)", "(-1,)", "()", "[3]",
                     "float32", "bfloat16", "cifar10", "imagenet2012", "resnet56", "proximal",
                     "two_sided", "total", "best", "cosine", "skip"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(overrides):
    """Parse overrides as ``python -m sap_jax.main`` does; raises flags.Error or returns
    the message main prints for a malformed override path."""
    fv = flags.FlagValues()
    argv = ["prog", f"--config={os.path.join(ROOT, 'tests', 'support', 'tiny_config.py')}",
            *overrides]
    problem = cli.check_overrides(argv)
    if problem:
        raise flags.Error(problem)
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_overrides_reach_the_config():  # so that the fuzzing below really parses values
    assert _parse(["--config.sap.gamma=0.25", "--config.optim.boundaries=(1,)"]).sap.gamma == 0.25


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=8)),
                          VALUES), min_size=1, max_size=3))
def test_any_cli_override_validates_or_fails_clearly(pairs):
    overrides = [f"--config.{k}={v}" for k, v in pairs]
    try:
        c = _parse(overrides)
    except flags.Error as e:  # main prints this as one "error:" line and exits with code 2
        assert str(e)
        return
    try:
        config_lib.validate(c, device_count=1, process_count=1)
    except config_lib.ConfigError as e:
        assert str(e).startswith("invalid config:")


@FUZZ
@given(st.sampled_from(FIELDS), st.one_of(st.integers(-10**6, 10**6), st.floats(), st.booleans(),
                                          st.none(), st.text(max_size=5),
                                          st.lists(st.integers(-5, 500), max_size=3).map(tuple)))
def test_any_field_value_set_in_python_validates_or_fails_clearly(field, value):
    c = tiny_config.get_config()
    node = c
    *head, last = field.split(".")
    for h in head:
        node = node[h]
    try:
        with c.ignore_type():
            node[last] = value
    except (TypeError, ValueError):
        return  # ml_collections refuses the type outright
    try:
        config_lib.validate(c, device_count=2, process_count=1)
    except config_lib.ConfigError as e:
        assert "invalid config" in str(e)


# -- the functional API -----------------------------------------------------------------------

MODEL = models.create("resnet_cifar_tiny")
STRUCT = MODEL.structure(32)
PARAMS = __import__("flax").nnx.state(MODEL, __import__("flax").nnx.Param)


def _vectors():
    vec = st.one_of(
        st.integers(0, 20).map(lambda n: np.ones(n, np.float32)),
        st.sampled_from([np.float32, np.int32, np.bool_, np.complex64, np.str_, object]).flatmap(
            lambda dt: st.integers(1, 16).map(lambda n: np.ones(n).astype(dt))),
        st.integers(1, 16).map(lambda n: np.ones((n, 2), np.float32)),
        st.just(np.float32(1)), st.none(), st.just("abc"),
        st.integers(1, 16).map(lambda n: [1.0] * n),
    )
    right = st.just([np.ones(w, np.float32) for w in MODEL.widths])
    return st.one_of(right, st.lists(vec, max_size=4), st.none(), st.just(3), st.just("mask"))


@FUZZ
@given(_vectors())
def test_api_answers_malformed_masks_with_value_error(arch):
    for fn in (lambda v: penalty.partial_group_lasso(PARAMS, v, STRUCT),
               lambda v: flops.mac_ratio(STRUCT, v),
               lambda v: surgery.extract(MODEL, v)):
        try:
            fn(arch)
        except ValueError as e:
            assert str(e)


@FUZZ
@given(st.one_of(st.lists(st.one_of(st.integers(-3, 70), st.floats(), st.text(max_size=2),
                                    st.none()), max_size=4),
                 st.none(), st.text(max_size=4), st.integers()))
def test_agn_rejects_bad_group_sizes_with_value_error(sizes):
    try:
        agn.AGN(sizes, hidden=4, z_dim=2)
    except ValueError as e:
        assert "group_sizes" in str(e)


def test_fuzzed_config_errors_come_before_compiling(tmp_path):
    # The CLI path end to end: a fuzz-style bad value exits 2 with the message, no traceback.
    import subprocess

    p = subprocess.run([sys.executable, "-m", "sap_jax.main",
                        "--config=tests/support/tiny_config.py",
                        f"--workdir={tmp_path}", "--config.optim.learning_rate=inf",
                        "--config.agn.tau=nan"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert (p.returncode == 2 and "optim.learning_rate = inf" in p.stderr
            and "agn.tau = nan" in p.stderr)
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("value", ["1e400", "nan"])
def test_non_finite_numbers_are_rejected(value):
    c = _parse([f"--config.sap.gamma={value}"])
    with pytest.raises(config_lib.ConfigError, match="sap.gamma"):
        config_lib.validate(c, device_count=1, process_count=1)
