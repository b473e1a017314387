"""sap_jax.runtime.speed: what it times, how it alternates, and the ratios it reports."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sap_jax import models
from sap_jax.runtime import speed
from sap_jax.structure import flops


def test_time_interleaved_warms_each_function_then_alternates():
    calls = []

    def fn(name):
        def call():
            calls.append(name)
            return jnp.zeros(())
        return call

    times = speed.time_interleaved([fn("a"), fn("b")], reps=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)
    with pytest.raises(ValueError, match="reps = 0"):
        speed.time_interleaved([fn("a")], reps=0)


def test_forward_fn_runs_the_eval_mode_model_and_leaves_it_untouched():
    model = models.create("resnet_cifar_tiny", num_classes=10)
    fwd = speed.forward_fn(model, 16, 3, seed=5)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 16, 16, 3)), jnp.float32)
    model.eval()
    expected = model(x)
    model.train()
    np.testing.assert_allclose(np.asarray(fwd()), np.asarray(expected), rtol=1e-5, atol=1e-5)
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert bns and not any(bn.use_running_average for bn in bns)  # still in train mode


def test_compare_reports_speedups_and_efficiency_against_the_mac_ratio():
    dense = models.create("resnet_cifar_tiny", num_classes=10)
    widths = [max(1, w // 2) for w in dense.widths]
    pruned = models.create("resnet_cifar_tiny", num_classes=10, widths=widths)
    full, small = flops.count(dense.structure(16)).macs, flops.count(pruned.structure(16)).macs
    assert (flops.model_macs(dense, 16), flops.model_macs(pruned, 16)) == (full, small)
    r = speed.compare(dense, pruned, 16, (1, 2), macs=(full, small), reps=2)
    assert r["macs_dense"] == full and r["macs_pruned"] == small
    assert r["mac_speedup"] == pytest.approx(full / small) and r["mac_speedup"] > 1
    assert r["platform"] == "cpu" and r["dtype"] == "float32" and r["reps"] == 2
    for row, b in zip(r["batches"], (1, 2)):
        assert row["batch"] == b
        assert row["dense_min_ms"] <= row["dense_ms"] and row["pruned_min_ms"] <= row["pruned_ms"]
        lo, hi = row["speedup_iqr"]
        assert lo <= row["speedup"] <= hi
        assert row["pruned_images_per_s"] == pytest.approx(1e3 * b / row["pruned_ms"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / r["mac_speedup"])
        lo, hi = row["speedup_iqr"]
        assert lo <= hi and row["within_noise"] == (lo <= 1 <= hi)
        assert row["dense_iqr_ms"][0] <= row["dense_iqr_ms"][1]
    lines = speed.summary_lines(r)
    assert "batch 1 latency" in lines[2] and "batch 2 img/s" in lines[3]
    with pytest.raises(ValueError, match="batch_sizes"):
        speed.compare(dense, pruned, 16, (0,), macs=(full, small))


def test_the_speedup_is_the_median_of_the_rounds_ratios_and_lies_inside_its_iqr():
    # A sitting that drifts: the machine slows down over the rounds, both models alike. The
    # ratio of the two medians (5.0 / 2.5 = 2.0) lies outside the rounds' own ratios' IQR.
    dense = [1.0, 2.0, 5.0, 8.0, 9.0]
    pruned = [0.8, 1.6, 2.5, 6.4, 7.2]  # each round: dense / pruned = 1.25, 1.25, 2, 1.25, 1.25
    row = speed.paired_row(4, dense, pruned, mac_speedup=2.5)
    assert row["speedup"] == 1.25 and row["speedup_iqr"] == [1.25, 1.25]
    assert row["efficiency"] == pytest.approx(0.5)
    assert row["dense_ms"] == 5000.0 and row["pruned_ms"] == 2500.0  # the medians, as timed
    assert row["dense_images_per_s"] == pytest.approx(0.8) and not row["within_noise"]
    with pytest.raises(ValueError, match="pair up"):
        speed.paired_row(4, dense, pruned[:4], mac_speedup=2.5)


def test_a_slower_pruned_model_is_warned_of_with_advice_for_its_budget_metric():
    row = {"batch": 8, "dense_ms": 2.0, "pruned_ms": 2.2, "speedup": 0.9, "efficiency": 0.4,
           "dense_images_per_s": 4000.0, "pruned_images_per_s": 3600.0,
           "speedup_iqr": [0.85, 0.95], "within_noise": False}
    s = {"device": "cpu", "dtype": "float32", "reps": 10, "mac_speedup": 2.0, "batches": [row]}
    text = "\n".join(speed.summary_lines(s))
    assert "ran SLOWER than the dense one on cpu at batch 8 (0.90x)" in text
    assert 'budget.metric = "latency"' in text
    latency = speed.brief_line(s, "latency")
    assert "SLOWER" in latency and "estimate did not hold" in latency
    assert 'budget.metric = "latency"' not in latency
    row.update(speedup_iqr=[0.8, 1.1], within_noise=True)
    assert "ran no faster than the dense one on cpu at batch 8 (0.90x, within the noise)" in (
        "\n".join(speed.summary_lines(s)))
    row.update(speedup=1.0)
    assert "warning" not in "\n".join(speed.summary_lines(s))


def test_spread_and_the_noise_verdict_against_hand_computed_quartiles():
    assert speed.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    row = {"batch": 1, "dense_ms": 2.0, "pruned_ms": 1.9, "speedup": 1.05, "efficiency": 0.5,
           "speedup_iqr": [0.94, 1.43], "within_noise": True}
    s = {"device": "cpu", "dtype": "float32", "reps": 10, "mac_speedup": 2.0, "batches": [row]}
    lines = speed.summary_lines(s)
    assert "0.94-1.43" in lines[2] and "at batch 1 the speed-up is within the noise" in lines[-1]
    row.update(speedup_iqr=[1.1, 1.3], within_noise=False)
    assert "within the noise" not in "\n".join(speed.summary_lines(s))
