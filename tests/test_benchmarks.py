"""Benchmark scripts run on tiny shapes (so they never rot), and no step recompiles after
warm-up."""

import collections
import json
import os
import subprocess
import sys

import jax
import pytest

pytestmark = pytest.mark.slow  # benchmark smoke runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import accelerator  # noqa: E402
import compile_time  # noqa: E402
import gpu_check  # noqa: E402
import host_memory as host_memory_bench  # noqa: E402
import latency_budget  # noqa: E402
import latency_run  # noqa: E402
import narrow_conv  # noqa: E402
import pruned_speedup  # noqa: E402
import step_cost  # noqa: E402
from support import tiny_config  # noqa: E402

from configs import quickstart  # noqa: E402
from sap_jax import models, train  # noqa: E402
from sap_jax.structure import flops  # noqa: E402
from sap_jax.structure import groups as G  # noqa: E402


def test_step_cost_smoke():
    r = step_cost.main(["--model", "resnet_cifar_tiny", "--batch", "4", "--image-size", "32",
                        "--steps", "1", "--agn-every", "2"])
    assert set(r["images_per_s"]) == {"plain", "sap", "agn"}
    assert r["sap_over_plain"] > 0 and r["agn_amortised_overhead"] > 0


def test_compile_time_smoke(monkeypatch):
    # Cache every program (tiny ones compile in under JAX's 1 s threshold), so the warm process
    # must load all of them.
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    r = compile_time.main(["--model", "resnet_cifar_tiny", "--batch", "2", "--image-size", "32"])
    assert set(r["cold"]["functions"]) == {"plain", "sap", "agn", "eval", "norms"}
    assert not any(f["from_cache"] for f in r["cold"]["functions"].values())
    assert all(f["from_cache"] for f in r["warm"]["functions"].values())
    assert r["warm"]["cache"]["loaded"] > 0 and r["cold"]["cache"]["loaded"] == 0


def test_accelerator_smoke(tmp_path):
    r = accelerator.main(["--model", "resnet_cifar_tiny", "--image-size", "32", "--batch", "4",
                          "--dtype", "float32", "--steps", "2", "--rounds", "1",
                          "--peak-tflops", "0.5", "--profile", str(tmp_path / "trace"),
                          "--epoch-model", "resnet_cifar_tiny", "--epoch-batch", "4",
                          "--epoch-images", "40", "--agn-every", "3"])
    assert set(r["images_per_s"]) == {"plain", "sap", "agn"} and set(r["mfu"]) == {"plain", "sap"}
    # MFU is 6 x MACs per image x images/s over the given peak.
    want = 6 * r["macs_per_image"] * r["images_per_s"]["sap"] / 0.5e12
    assert r["mfu"]["sap"] == pytest.approx(want) and 0 < want < 1
    assert r["epoch"]["steps"] == 10 and r["epoch"]["with_agn_s"] > 0
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))
    # Without a known peak (fp32 on a CPU), MFU is not guessed.
    assert accelerator.peak_tflops(jax.devices()[0], "float32", 0.0) is None


def test_pruned_speedup_smoke(capsys):
    rows = pruned_speedup.main(["--models", "resnet_cifar_tiny", "--reps", "1", "--batch", "4",
                                "--round-to", "2,3", "--floor", "--json", "-"])
    assert [r["variant"] for r in rows] == ["uniform", "rounded to 2", "rounded to 3",
                                            "one per group"]
    for r in rows[:3]:
        assert r["prunable_mac_ratio"] <= 0.5 and r["latency_speedup"] > 0
    assert rows[3]["widths"] == [1, 1, 1] and rows[3]["mac_ratio"] < rows[0]["mac_ratio"]
    out = capsys.readouterr().out
    assert "resnet_cifar_tiny: with one channel per group the forward still takes" in out
    assert any(line.split()[1:4] == ["one", "per", "group"] and line.split()[-1] == "-"
               for line in out.splitlines()), out
    assert json.loads(out[out.index("\n["):]) == json.loads(json.dumps(rows))  # --json -


def test_pruned_speedup_times_a_saved_models_own_widths_in_bfloat16(tmp_path, capsys):
    """A directory in --models is a run's workdir or a saved model: its non-uniform widths are
    timed against its dense widths, in the dtype asked for, with a per-layer breakdown."""
    from sap_jax import surgery

    dense = models.create("resnet_cifar_tiny")
    widths = [3, 5, 9]  # of (4, 8, 16)
    assert len(widths) == dense.num_groups
    surgery.save(tmp_path / "w" / "pruned_model", models.create("resnet_cifar_tiny",
                 widths=widths), dense_widths=dense.widths, image_size=16)
    out = tmp_path / "rows.json"
    rows = pruned_speedup.main(["--models", str(tmp_path / "w"), "--reps", "1", "--batch", "2",
                                "--round-to", "2", "--dtype", "bfloat16", "--layers",
                                "--json", str(out)])
    assert [r["variant"] for r in rows] == ["run's widths", "rounded to 2"]
    assert rows[0]["widths"] == widths and rows[0]["dtype"] == "bfloat16"
    assert all(w % 2 == 0 or w == c for w, c in zip(rows[1]["widths"], dense.widths))
    s = dense.structure(16)
    assert rows[0]["p"] == pytest.approx(flops.count(s, widths).prunable_macs
                                         / flops.count(s).prunable_macs)
    layers = rows[0]["layers"]
    assert [x["path"] for x in layers] == [".".join(x.path) for x in s.layers
                                           if isinstance(x, (G.ConvLayer, G.DenseLayer))]
    assert "layers no group touches" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["widths"] == widths
    with pytest.raises(SystemExit, match="neither a saved model nor a workdir"):
        pruned_speedup.main(["--models", str(tmp_path), "--reps", "1"])


def test_pruned_speedup_times_a_config_cut_as_its_run_cuts_on_this_backend(capsys):
    """A config in --models: its model, p and scope, trimmed and rounded (round_to = 0: for
    the CPU) as its run would cut; --round-to does not apply to it."""
    from sap_jax.method import cut

    path = os.path.join(ROOT, "configs", "quickstart.py")
    rows = pruned_speedup.main(["--models", path, "--reps", "1",
                                "--batch", "2", "--round-to", "2"])
    c = quickstart.get_config()
    assert len(rows) == 1 and rows[0]["model"] == "quickstart" and rows[0]["p"] == c.budget.p
    multiple = cut.HARDWARE_MULTIPLE["cpu"]
    widths, s = rows[0]["widths"], models.create(c.model).structure(c.image_size)
    assert rows[0]["prunable_mac_ratio"] <= c.budget.p < 1
    # Rounded to the CPU's multiple or one of its halves, so each kept width is a multiple of
    # the smallest such (or a group's whole width).
    m = int(rows[0]["variant"].rsplit(" ", 1)[1].rstrip(")"))
    assert rows[0]["variant"].startswith("config's cut (rounded to ") and multiple % m == 0
    assert all(w % m == 0 or w == d for w, d in zip(widths, s.widths)), widths
    assert cut.widths_ratio(s, widths, c.budget.scope) == pytest.approx(
        rows[0]["prunable_mac_ratio"])
    with pytest.raises(SystemExit, match="none.py does not exist"):
        pruned_speedup.main(["--models", os.path.join(ROOT, "configs", "none.py"), "--reps",
                             "1"])


def test_latency_run_reports_its_measured_ratio_next_to_the_estimate(tmp_path):
    """A whole latency-budgeted run on mock ImageNet (benchmarks/latency_run.py): the run builds
    its table, cuts, and times the cut at the table's batch."""
    out = latency_run.main(["--workdir", str(tmp_path), "--model", "resnet_cifar_tiny",
                            "--image-size", "16", "--batch", "4", "--epochs", "2", "--steps",
                            "2", "--points", "2", "--reps", "1", "--speed-reps", "1",
                            "--examples", "16", "--p", "0.95"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budget_metric"] == "latency" and saved["budget_scope"] == "total"
    assert (tmp_path / "latency_table.json").exists()
    # (Whether p is met is test_latency_budget's: this tiny model's floor under a one-repetition
    # table can lie above any p; here, that the script reports the run's own figures.)
    assert out["latency_ratio_estimated"] == saved["latency_ratio_estimated"]
    row = next(b for b in saved["speed"]["batches"] if b["batch"] == 4)
    assert out["latency_ratio_measured"] == pytest.approx(1 / row["speedup"])
    assert out["widths"] == saved["widths"]


def test_latency_budget_builds_times_and_refuses_a_table_of_another_dtype(tmp_path):
    table = tmp_path / "t.json"
    rows = latency_budget.main(["--model", "resnet_cifar_tiny", "--p", "0.9", "--batch", "2",
                                "--points", "2", "--reps", "1", "--dtype", "bfloat16",
                                "--save-table", str(table), "--json", str(tmp_path / "r.json")])
    assert [r["cut"] for r in rows] == ["latency, snapped", "latency, as trimmed",
                                        "MACs at the same MAC count"]
    assert all(r["measured_ratio"] > 0 and r["estimated_ratio"] > 0 for r in rows)
    assert json.loads(table.read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "r.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):  # timings in float32 against a bfloat16 table
        latency_budget.main(["--model", "resnet_cifar_tiny", "--table", str(table)])


def test_gpu_check_runs_each_part_in_its_own_process_and_judges_the_targets(tmp_path, capsys):
    out = tmp_path / "gpu"
    summary = gpu_check.main(["--out", str(out), "--quick", "--parts", "speedup"])
    assert summary["environment"]["backend"] == jax.default_backend()
    assert summary["parts"]["speedup"]["returncode"] == 0 and summary["incomplete"] == []
    rows = json.loads((out / "speedup.json").read_text())
    # The verdicts are the rows' own figures against the issue's targets.
    r8 = next(r for r in rows if r["variant"] == "rounded to 8")
    eff = r8["throughput_efficiency"]
    want = f"({'meets' if eff >= 0.8 else 'MISSES'} >= 0.8)"
    assert any(want in v and f"{eff:.2f}" in v for v in summary["verdicts"])
    below = [r for r in rows for k in ("latency", "throughput") if r[f"{k}_speedup"] < 1]
    assert any("BELOW 1" in v for v in summary["verdicts"]) == bool(below)
    assert json.loads((out / "summary.json").read_text()) == summary
    # Too little of the budget for a part: skipped, said, and the exit status is not 0.
    skipped = gpu_check.main(["--out", str(tmp_path / "g2"), "--quick", "--parts", "speedup",
                              "--budget-s", "1"])
    assert "skipped" in skipped["parts"]["speedup"] and skipped["incomplete"] == ["speedup"]
    assert f"{jax.devices()[0].platform} (bfloat16)" in (out / "speedup.log").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(out), "--parts", "speedup,nonsense"])


def test_narrow_conv_lowerings_agree_and_are_timed():
    rows = narrow_conv.main(["--batch", "2", "--shapes", "6:4:2,5:2:3", "--reps", "1"])
    assert [(r["h"], r["cin"], r["cout"]) for r in rows] == [(6, 4, 2), (5, 2, 3)]
    assert all(set(r["ms"]) == {"xla", "xla defaults", "out matmul", "im2col"}
               and min(r["ms"].values()) > 0 for r in rows)
    with pytest.raises(SystemExit):
        narrow_conv.main(["--shapes", "6:4"])


def test_host_memory_times_both_modes_in_fresh_processes():
    rows = host_memory_bench.main(["--shape", "2,4,4,8", "--reps", "2"])
    assert [r["mode"] for r in rows] == ["system", "retain"]
    assert rows[0]["status"].startswith("system")
    assert rows[1]["status"].startswith("retained" if sys.platform == "linux" else "system")
    assert all(set(r["ms"]) == {"fresh output", "reduce only", "donated"}
               and min(r["ms"].values()) > 0 for r in rows)


def test_penalty_overhead_smoke():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "penalty_overhead.py"),
                        "--model", "resnet_cifar_tiny", "--batch", "2", "--image-size", "32",
                        "--steps", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]


def test_no_step_recompiles_after_the_first_epoch_of_each_phase(tmp_path, monkeypatch):
    from jax._src import dispatch

    tag = {"now": "start"}
    compiles = collections.Counter()

    def listener(name, secs, **kw):
        if name == dispatch.BACKEND_COMPILE_EVENT:
            compiles[tag["now"]] += 1

    def on_step(phase, step, metrics):
        tag["now"] = step  # compiles from here to the next step's end are step's

    def on_phase(name):
        if name == "cut":
            tag["now"] = "cut"

    hooks = train.Hooks(on_step=on_step, on_phase=on_phase)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        c = tiny_config.get_config()
        c.plots = False
        train.train_and_evaluate(c, str(tmp_path), hooks=hooks)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # 4 steps per epoch: dense epoch = steps 1-4, search epochs 5-8 and 9-12 (with their
    # end-of-epoch evaluation and checkpoint), cut, fine-tuning epochs 13-16 and 17-20.
    assert compiles["start"] > 0 and compiles["cut"] > 0  # the listener does see compiles
    later = {k: n for k, n in compiles.items() if isinstance(k, int) and (9 <= k <= 12 or k >= 13)}
    assert later == {}, later


def test_cpu_parity_smoke_jax_side():
    import cpu_parity

    r = cpu_parity.main(["--depth", "20", "--batch", "4", "--steps", "1", "--jax-only"])
    assert r["median_s"]["jax"] > 0


def test_loop_overhead_smoke():
    r = step_cost.main(["--loop-epochs", "1", "--loop-repeats", "1", "--loop-agn-batch", "16"])
    assert r["ratio"] > 0 and r["agn_batch"] == 16
    assert r["agn_every"] == quickstart.get_config().sap.agn_every  # the default: the quickstart's


def test_cpu_step_variants_smoke():
    import os as os_

    import cpu_step_variants

    from sap_jax.models import blocks
    from sap_jax.runtime import xla_cpu

    before = (blocks.materialize, dict(xla_cpu.COMPILER_OPTIONS),
              os_.environ.get("SAP_JAX_XLA_CPU_DEFAULTS"))
    (r,) = cpu_step_variants.main(["--models", "resnet_cifar_tiny:4:16", "--steps", "1",
                                   "--rounds", "1"])
    assert set(r["median_s"]) == set(cpu_step_variants.VARIANTS)
    assert all(t > 0 for t in r["median_s"].values())
    # Switching variants leaves the library as it was.
    assert (blocks.materialize, dict(xla_cpu.COMPILER_OPTIONS),
            os_.environ.get("SAP_JAX_XLA_CPU_DEFAULTS")) == before


def test_compilation_cache_stores_programs_loads_them_again_and_restores_jax_setting(tmp_path):
    import jax.numpy as jnp

    from sap_jax.runtime import parallel

    def program():  # a new function object each time: JAX's in-memory cache cannot answer
        return jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)

    x = jnp.arange(12.0).reshape(3, 4)
    before = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
    try:
        with parallel.compilation_cache(tmp_path / "cc") as first:
            want = float(program()(x))
        assert first.directory == str(tmp_path / "cc") and (first.requests, first.loaded) == (1, 0)
        assert os.listdir(tmp_path / "cc")  # the program was written
        assert jax.config.jax_compilation_cache_dir == before  # and JAX's setting restored
        with parallel.compilation_cache(tmp_path / "cc") as again:
            assert float(program()(x)) == want
        assert (again.requests, again.loaded) == (1, 1)
        # A cache directory chosen outside sap_jax (JAX_COMPILATION_CACHE_DIR) wins.
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
        with parallel.compilation_cache(tmp_path / "cc") as theirs:
            program()(x)
        assert theirs.directory == str(tmp_path / "theirs") and os.listdir(tmp_path / "theirs")
        with parallel.compilation_cache("") as off:  # "" leaves JAX's setting alone too
            assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")
        assert off.directory == str(tmp_path / "theirs")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        from jax.experimental.compilation_cache import compilation_cache as cc
        cc.reset_cache()


def test_flat_gradient_counts_the_all_reduces_of_each_reduction():
    """The tiny config's gradient for v5e:2x2 (a TPU compile in a fresh process): the
    partitioner reduces leaf by leaf; a shard_map's reductions at the end combine into one."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "flat_gradient.py")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r[0]: r[1:] for r in (
        [c.strip() for c in line.strip("|").split("|")]
        for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line)}
    counts = {k: int(v[0]) for k, v in rows.items() if k != "gradient reduction"}
    assert counts["per leaf"] == counts["flattened"] == 1, counts
    assert counts["partitioner"] > 1, counts
