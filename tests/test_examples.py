"""The README's example runs and does what it says."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_partial_penalty_example_shrinks_only_dropped_channels():
    r = _load("partial_penalty").main(steps=150)
    assert r["ce_last"] < 0.5 * r["ce_first"]  # it still learns the task
    assert r["reg_last"] < 0.5 * r["reg_first"]
    (d0, d1), (k0, k1) = r["dropped_norm"], r["kept_norm"]
    assert d1 < 0.5 * d0  # dropped channels head to zero
    assert k1 > 0.8 * k0  # kept channels are not penalised
