"""Per-layer timing and latency tables (sap_jax.method.latency, python -m sap_jax.latency)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator

from sap_jax import models
from sap_jax.method import cut, latency, resource
from sap_jax.structure import flops
from sap_jax.structure import groups as G


@pytest.fixture(scope="module")
def structure():
    return models.create_abstract("mobilenet_v2_tiny").structure(32)


def test_each_layer_alone_has_the_shape_its_widths_give(structure):
    """Every conv (depthwise ones included) and the head, at dense and at pruned widths: the
    output has the layer's own spatial size and the channel count its widths give."""
    pruned = [max(1, w // 3) for w in structure.widths]
    layers = latency.timed_layers(structure)
    assert {type(x) for x in layers} == {G.ConvLayer, G.DenseLayer}
    assert any(x.depthwise for x in layers if isinstance(x, G.ConvLayer))
    for widths in (structure.widths, pruned):
        for layer in layers:
            y = latency.layer_forward(layer, widths, 2)()
            cout = int(G.dim_value(layer.out_ch, widths))
            if isinstance(layer, G.ConvLayer):
                assert y.shape == (2, *layer.out_hw, cout), layer.path
            else:
                assert y.shape == (2 * layer.tokens, cout), layer.path


def test_layer_times_rows(structure):
    pruned = [max(1, w // 2) for w in structure.widths]
    rows = latency.layer_times(structure, [structure.widths, pruned], 2, reps=2,
                               dtype=jnp.bfloat16)
    layers = latency.timed_layers(structure)
    assert [r["path"] for r in rows] == [".".join(x.path) for x in layers]
    for r, layer in zip(rows, layers):
        assert r["macs"] == [int(flops.layer_macs(layer, ws))
                             for ws in (structure.widths, pruned)]
        assert r["prunable"] == G.is_prunable(layer)
        assert len(r["ms"]) == 2 and all(t > 0 for t in r["ms"])
        assert all(lo <= hi for lo, hi in r["iqr_ms"])
    # Pruning shrinks the MACs of exactly the layers a group touches.
    assert all((r["macs"][1] < r["macs"][0]) == r["prunable"] for r in rows)


def test_widths_that_do_not_fit_are_refused(structure):
    too_wide = list(structure.widths)
    too_wide[0] += 1
    for bad in (too_wide, list(structure.widths)[:-1], [0] * len(structure.widths)):
        with pytest.raises(ValueError, match="do not fit the groups"):
            latency.layer_times(structure, [bad], 1, reps=1)
    with pytest.raises(ValueError, match="reps"):
        latency.layer_times(structure, [structure.widths], 1, reps=0)
    assert np.all(np.asarray(structure.widths) > 0)


# -- latency tables -----------------------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny():
    """A real table of a tiny ResNet (a few grid points, two reps: seconds on 2 cores)."""
    model = models.create("resnet_cifar_tiny", num_classes=10)
    table = latency.build_table(model, 16, 2, points=3, reps=2)
    return model.structure(16), table


def test_grid_spans_the_dimension_in_power_of_two_steps():
    assert latency.grid(1, 5, 9) == [1, 2, 3, 4, 5]
    assert latency.grid(1, 64, 9) == [1, 8, 16, 24, 32, 40, 48, 56, 64]
    assert latency.grid(1, 960, 9) == [1, 128, 256, 384, 512, 640, 768, 896, 960]
    for lo, hi, n in ((1, 16, 3), (3, 100, 5), (7, 7, 2), (1, 2048, 9)):
        g = latency.grid(lo, hi, n)
        assert g[0] == lo and g[-1] == hi and len(g) <= max(n, 2) and g == sorted(set(g))


def test_table_round_trips_through_json(tiny, tmp_path):
    structure, table = tiny
    path = tmp_path / "t.json"
    table.save(path)
    back = latency.LatencyTable.load(path)
    assert back.to_json() == json.loads(json.dumps(table.to_json()))
    assert back.device["platform"] == "cpu" and back.versions["jax"] == jax.__version__
    assert back.created and back.batch == 2 and back.dtype == "float32"
    for widths in (structure.widths, [1] * structure.num_groups, [3, 5, 7]):
        for scope in ("prunable", "total"):
            assert back.ratio(structure, widths, scope) == table.ratio(structure, widths, scope)
    assert all(e.train_ms is not None and e.train_ms.shape == e.forward_ms.shape
               for e in back.entries)
    # The line older readers use (before the calibration curve) never falls as layers widen,
    # however noisy a tiny model's timings.
    assert back.layer_scale > 0


def test_a_table_of_another_model_or_size_is_refused(tiny, tmp_path):
    _, table = tiny
    other = models.create_abstract("resnet_cifar_tiny", widths=[2, 4, 8]).structure(16)
    bigger = models.create_abstract("resnet_cifar_tiny").structure(32)
    for s in (other, bigger):
        with pytest.raises(ValueError, match="does not match this model"):
            table.check_matches(s)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a sap_jax latency table"):
        latency.LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        latency.LatencyTable.load(tmp_path / "missing.json")


def _reference_ratio(table, structure, widths, scope):
    """The estimate, computed independently: SciPy's linear grid interpolation of each layer's
    brute-force monotone envelope, summed, and for the whole forward read through the table's
    calibration points by straight lines (NumPy's interp between them, the end segments'
    slope beyond the last; from the origin below the first)."""
    total = 0.0
    for row, layer in zip(table.layers, latency.timed_layers(structure)):
        e = table.entries[row["entry"]]
        z = np.asarray(e.forward_ms, np.float64)
        env = np.array([min(z[q] for q in np.ndindex(z.shape)
                            if all(a >= b for a, b in zip(q, p))) for p in np.ndindex(z.shape)]
                       ).reshape(z.shape)
        cout = float(G.dim_value(layer.out_ch, widths))
        axes, point = ((e.cout,), [cout]) if e.diagonal else (
            (e.cin, e.cout), [float(G.dim_value(layer.in_ch, widths)), cout])
        keep = [i for i, a in enumerate(axes) if len(a) > 1]  # SciPy needs 2+ points per axis
        env = env.reshape([len(axes[i]) for i in keep]) if keep else env.reshape(())
        if keep:
            f = RegularGridInterpolator([np.asarray(axes[i], float) for i in keep], env,
                                        bounds_error=False, fill_value=None)
            t = f([[point[i] for i in keep]])[0]
        else:
            t = float(env)
        if scope == "total" or G.is_prunable(layer):
            total += t
    if scope == "total":
        xs, ys = (np.asarray([0.0, *v], np.float64) for v in zip(*table.calibration))
        if total > xs[-1]:  # beyond the last point: its last segment, extended
            total = ys[-1] + (total - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        else:  # from the origin through the points
            total = float(np.interp(total, xs, ys))
    return total


def test_latency_resource_loss_matches_a_numpy_reference_with_its_gradient(tiny):
    structure, table = tiny
    rng = np.random.default_rng(0)
    # A latency budget bounds the whole forward: "total" by default, "prunable" refused.
    with pytest.raises(ValueError, match="whole forward"):
        resource.ResourceLoss(0.4, scope="prunable", table=table)
    with pytest.raises(ValueError, match="whole forward"):
        cut.CutPolicy(p=0.4, scope="prunable", table=table)
    assert cut.CutPolicy(p=0.4, table=table).scope == "total"
    assert cut.CutPolicy(p=0.4).scope == resource.ResourceLoss(0.4).scope == "prunable"
    for given in ("total", None):
        loss = resource.ResourceLoss(0.4, lam=3.0, form="two_sided", scope=given, table=table)
        assert loss.metric == "latency" and loss.scope == "total"
        scope = loss.scope
        dense = _reference_ratio(table, structure, structure.widths, scope)
        # Soft architectures whose kept widths fall between grid points (no kinks nearby).
        arch = [jnp.asarray(rng.uniform(0.2, 0.9, c), jnp.float32) for c in structure.widths]
        widths = [float(np.sum(np.asarray(v, np.float64))) for v in arch]
        ref = _reference_ratio(table, structure, widths, scope) / dense
        res, r = loss(structure, arch)
        np.testing.assert_allclose(float(r), ref, rtol=1e-5)
        want = 3.0 * (np.log(max(ref, 0.405) / 0.4) if ref > 0.4 else np.log(0.4 / min(ref, 0.395)))
        np.testing.assert_allclose(float(res), want, rtol=1e-5)
        # d ratio / d v_k,i = d ratio / d width_k, by central differences of the reference.
        grads = jax.grad(functools.partial(loss.ratio, structure))(arch)
        for k in range(structure.num_groups):
            h = 1e-3
            up = widths[:k] + [widths[k] + h] + widths[k + 1:]
            down = widths[:k] + [widths[k] - h] + widths[k + 1:]
            fd = (_reference_ratio(table, structure, up, scope)
                  - _reference_ratio(table, structure, down, scope)) / (2 * h * dense)
            np.testing.assert_allclose(np.asarray(grads[k]), fd, rtol=2e-3, atol=1e-7)


def test_the_whole_forward_is_read_through_its_calibration(tiny):
    """The table reproduces the whole model it timed: at dense widths exactly (unless noise
    timed a narrower model faster), at its narrowest, a quarter and half at most what was timed
    there. The curve rises strictly, is extended beyond its ends, and the generator's gradient
    through it at dense widths is not zero (the end of the curve is not a flat clamp)."""
    structure, table = tiny
    xs, ys = zip(*table.calibration)
    assert list(xs) == sorted(set(xs)) and list(ys) == sorted(set(ys)) and ys[-1] <= table.model_ms
    # Dense is the widest point: its own time, unless a narrower one with the same summed layer
    # times (a tiny model's noise) was timed faster.
    assert table.estimate_ms(structure, list(structure.widths)) == pytest.approx(ys[-1])
    assert table.check["widths"] == latency.calibration_widths(structure, 3 / 8)
    r56 = models.create_abstract("resnet56").structure(32)
    assert latency.calibration_widths(r56, 3 / 8) == [8] * 9 + [16] * 9 + [24] * 9
    assert latency.calibration_widths(r56, 0.0) == [8] * 27
    assert latency.calibration_widths(r56, 1 / 4, 128) == [16] * 9 + [32] * 9 + [64] * 9
    # The points it was read from: one channel per group is the least any widths cost, so no
    # estimate ever falls on the segment from the origin; each timed point is kept, lowered
    # only by the envelope or the least slope.
    pts = table.calibration_points
    assert pts["one"]["widths"] == [1] * structure.num_groups
    assert min(p["layers_ms"] for p in pts.values()) == pts["one"]["layers_ms"] == xs[0]
    for p in pts.values():
        assert table.estimate_ms(structure, p["widths"]) <= p["model_ms"] * (1 + 1e-9)
    # Sorted; 5 at x = 1 priced like 3 at x = 2 (the envelope); the second x = 3 dropped; the
    # flat segment from 1 to 2 tilted to a tenth of the average slope (4 / 3).
    curve = latency.calibration_curve([(1, 5), (3, 6), (2, 3), (3, 4)])
    tilt = latency.MIN_SLOPE * 4 / 3
    np.testing.assert_allclose(curve, [[1, 3 - tilt], [2, 3], [3, 4]])
    assert latency._piecewise(4.0, curve) == pytest.approx(5.0)  # the last segment, extended
    assert latency._piecewise(0.5, curve) == pytest.approx((3 - tilt) / 2)  # from the origin
    assert latency._piecewise(1.5, curve) == pytest.approx(3 - tilt / 2)
    # At the widest point (dense widths), the slope of the last segment, not a clamp's zero.
    for c in (curve, table.calibration):
        slope = jax.grad(lambda x, c=c: latency._piecewise(x, c, jnp))(jnp.float32(c[-1][0]))
        # (float32: two close points make a steep segment, known to a few parts in 1e6)
        assert float(slope) == pytest.approx((c[-1][1] - c[-2][1]) / (c[-1][0] - c[-2][0]),
                                             rel=1e-3) if len(c) > 1 else float(slope) > 0


def test_estimates_never_fall_as_a_group_widens(tiny):
    """Measured CPU times need not be monotone in the width (noise, odd widths); the estimate
    is, so the generator's gradient never rewards keeping more channels."""
    structure, table = tiny
    for k, c in enumerate(structure.widths):
        base = [max(1, w // 2) for w in structure.widths]
        f = [table.estimate_ms(structure, base[:k] + [w] + base[k + 1:]) for w in range(1, c + 1)]
        assert all(b >= a - 1e-9 for a, b in zip(f, f[1:])), (k, f)


def _synthetic(structure, times):
    """A table whose one 1-D entry per group-reading layer has the given forward times."""
    rows, entries = [], []
    for layer in latency.timed_layers(structure):
        shape = latency._layer_shape(layer)
        cin = latency._dim_grid(layer.in_ch, structure, 16)
        cout = latency._dim_grid(layer.out_ch, structure, 16)
        z = np.zeros((len(cin), len(cout)))
        if isinstance(layer.out_ch, G.GroupRef):
            z[:] = np.asarray(times[layer.out_ch.index])[None, :]
        entries.append(latency.Entry(shape, cin, cout, False, z, np.stack([z, z], -1)))
        rows.append({"path": ".".join(layer.path), "entry": len(entries) - 1})
    return latency.LatencyTable(
        device={"platform": "cpu", "kind": "synthetic"}, versions={}, created="", model={
            "class": "ResNetCifar", "group_names": list(structure.group_names),
            "widths": list(structure.widths), "input_hw": list(structure.input_hw)},
        batch=1, dtype="float32", reps=1, points=16, layers=rows, entries=entries)


def test_a_table_that_is_not_monotone_is_handled():
    """Width 5 of a group measured slower than 6 to 8 (an odd width the device runs badly):
    the envelope prices 5 like 6, the table reports it, and rounding never keeps it."""
    structure = models.create_abstract("resnet_cifar_tiny", widths=[8, 8, 8]).structure(16)
    step = [1, 1, 2, 2, 9, 3, 3, 3]  # ms at widths 1..8: 5 is slow, 6-8 cost the same
    slope = [0.1 * w for w in range(1, 9)]
    table = _synthetic(structure, [step, slope, slope])
    for e in table.entries:
        assert np.all(np.diff(e.envelope(), axis=1) >= 0)
    bad = table.monotone_violations()
    assert bad and {b["cout"] for b in bad} == {5}
    steps = table.step_widths(structure, tolerance=0.0)
    # Worth keeping in group 0: 2 (1 costs as much), 4 (3 as much; 5 and up cost more) and 8 (the
    # top; 5 costs more than 8, 6 and 7 as much). The other groups' time rises at every width.
    assert steps == [[2, 4, 8], list(range(1, 9)), list(range(1, 9))]
    snapped = cut.snap_widths(structure, [5, 8, 8], steps, 1.0, scope="total", table=table)
    assert snapped == [8, 8, 8]  # 5 costs more than 8: rounding goes up, the budget allows it
    tight = table.ratio(structure, [4, 8, 8], "total")
    assert cut.snap_widths(structure, [5, 8, 8], steps, tight, scope="total",
                           table=table) == [4, 8, 8]
    assert table.ratio(structure, [5, 8, 8], "total") == table.ratio(structure, [6, 8, 8], "total")



def test_snapping_takes_the_step_that_saves_most_per_channel_not_the_coarsest():
    """Group 0's time does not move between 1 and 8 channels but falls at 1 (its only step is
    8 -> 1: 7 ms for 7 channels); group 1 saves 1.5 ms per channel. A budget one group-1
    channel away is met by that channel, not by collapsing group 0 to a single channel."""
    structure = models.create_abstract("resnet_cifar_tiny", widths=[8, 8, 8]).structure(16)
    flat = [1.0] + [8.0] * 7
    steep = [1.5 * w for w in range(1, 9)]
    table = _synthetic(structure, [flat, steep, [0.0] * 8])
    steps = table.step_widths(structure, tolerance=0.0)
    assert steps[0] == [1, 8] and steps[1] == list(range(1, 9))
    p = table.ratio(structure, [8, 7, 8], "total")
    assert p < table.ratio(structure, [8, 8, 8], "total")
    assert cut.snap_widths(structure, [8, 8, 8], steps, p, scope="total",
                           table=table) == [8, 7, 8]
    # A budget that needs more than group 1 can give still takes group 0's step.
    tight = table.ratio(structure, [1, 1, 8], "total")
    assert cut.snap_widths(structure, [8, 8, 8], steps, tight, scope="total",
                           table=table) == [1, 1, 8]


def test_snapping_rounds_each_width_to_a_neighbouring_step_before_cutting_deeper():
    """Group 0 kept 5 of 8: its steps around 5 are 4 and 7 (5 and 6 cost about as much as 7,
    within the noise tolerance), and 7 puts the model over p. Group 1's only step below 8 is one
    channel, and that step saves the most per channel; but rounding takes group 0 to 4, which
    meets p, and leaves group 1 whole."""
    structure = models.create_abstract("resnet_cifar_tiny", widths=[8, 8, 8]).structure(16)
    table = _synthetic(structure, [[1, 2, 3, 4, 5.2, 5.4, 5.6, 8], [1] + [9] * 7, [0.0] * 8])
    steps = table.step_widths(structure)
    assert steps[:2] == [[1, 2, 3, 4, 7, 8], [1, 8]]
    p = table.ratio(structure, [5, 8, 8], "total")
    assert table.ratio(structure, [7, 8, 8], "total") > p
    snapped = cut.snap_widths(structure, [5, 8, 8], steps, p, scope="total", table=table)
    assert snapped == [4, 8, 8] and table.ratio(structure, snapped, "total") <= p
    # Below the first grid point above one channel a table measured nothing: table_steps adds
    # the backend's multiples there (8 on a CPU), so a 64-wide group is not left 1 or 64 only.
    wide = models.create_abstract("resnet_cifar_tiny", widths=[64, 8, 8]).structure(16)
    coarse = _synthetic(wide, [[0.1 * w for w in latency.grid(1, 64, 16)], [1.0] * 8, [1.0] * 8])
    coarse.points = 3  # the grid of the first group: 1, 32, 64
    assert latency.grid(1, 64, 3) == [1, 32, 64]
    assert cut.table_steps(wide, coarse, "cpu")[0] == [1, 8, 16, 24, 32, 64]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sap_jax.latency",
                           "--config=tests/support/tiny_config.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_refuses_an_unknown_topology_and_an_absent_backend(tmp_path):
    out = str(tmp_path / "t.json")
    p = _cli("--backend=tpu:v9:2x2", f"--out={out}")
    assert p.returncode == 2 and "unknown TPU generation" in p.stderr
    p = _cli("--backend=gpu", f"--out={out}")
    assert p.returncode == 2 and "--backend=gpu" in p.stderr
    if not any(d.platform == "tpu" for d in jax.devices()):
        p = _cli("--backend=tpu", f"--out={out}")
        assert p.returncode == 2 and "no TPU is attached to this host" in p.stderr
        assert "--backend=tpu:TOPOLOGY" in p.stderr and "lockfile" not in p.stderr
    assert not os.path.exists(out)
    # Where the table could not be written: refused before anything is built.
    for bad, why in ((tmp_path / "nowhere" / "t.json", "does not exist"),
                     (tmp_path, "is a folder")):
        p = _cli(f"--out={bad}")
        assert p.returncode == 2 and why in p.stderr and "layer 1/" not in p.stderr, p.stderr


def test_cli_estimates_a_tpu_table_by_compiling_for_a_slice_that_is_not_there(tmp_path):
    """--backend=tpu:TOPOLOGY: every point compiled for one v5e chip and its time estimated from
    the program (the [tpu] extra); the table says so and a run reads it like a measured one."""
    out = tmp_path / "t.json"
    p = _cli("--backend=tpu:v5e:2x2", f"--out={out}", "--points=2", "--no-train")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(estimated: v5e:2x2)" in p.stdout
    table = latency.LatencyTable.load(out)
    structure = models.create_abstract("resnet_cifar_tiny").structure(16)
    table.check_matches(structure)
    assert table.device["platform"] == "tpu" and table.device["kind"] == "TPU v5 lite"
    assert table.device["topology"] == "v5e:2x2" and "estimated" in table.device
    assert table.batch == 16 // 4  # batch_size over the slice's 4 chips
    for e in table.entries:
        ms = np.asarray(e.forward_ms)
        assert np.all(ms > 0) and ms.flat[-1] >= ms.flat[0]  # the widest point costs the most
        assert np.array_equal(np.asarray(e.forward_iqr_ms)[..., 0], ms)  # no spread: one estimate
    assert table.model_ms > 0
    assert 0 < table.ratio(structure, [max(1, w // 2) for w in structure.widths], "total") < 1


@pytest.mark.slow
def test_cli_builds_a_table_a_run_can_read(tmp_path):
    out = tmp_path / "t.json"
    p = _cli(f"--out={out}", "--points=2", "--reps=1", "--no-train", "--batch=4",
             "--host-memory=retain")
    assert p.returncode == 0, p.stderr
    assert "latency table of resnet_cifar_tiny at 16px, batch 4" in p.stdout
    retained = "retained" if sys.platform == "linux" else "system"
    assert f"host memory: {retained}" in p.stdout  # set before the backend started
    table = latency.LatencyTable.load(out)
    assert table.device["host_memory"].startswith(retained)
    table.check_matches(models.create_abstract("resnet_cifar_tiny").structure(16))
    assert table.batch == 4 and table.points == 2 and table.reps == 1
    assert all(e.train_ms is None for e in table.entries) and table.check["measured_ratio"] > 0
