"""The end of a run (sap_jax/train/report.py): results.json's figures, the summary's lines,
the files."""

import io
import json
import os
import sys
import time

from sap_jax import models
from sap_jax.structure import flops
from sap_jax.train import Progress, report, spec
from sap_jax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import tiny_config  # noqa: E402


def _results(budget_ratio=None, **cut):
    c = tiny_config.get_config()
    dense = models.create_abstract(c.model).structure(c.image_size)
    pruned = models.create_abstract(c.model, widths=[2, 4, 8]).structure(c.image_size)
    prog = Progress(dense_acc=0.9, cut_acc=0.5, cut_acc_bn=0.8, subnet_acc_at_cut=0.5,
                    alignment_ratio_at_cut=0.02, arch_source="generator", arch_ratio_chosen=0.45,
                    trimmed_channels=0, round_to=1, times={"dense": 1.0, "search": 2.0},
                    history={"epoch": [1, 2, 3], "mac_ratio": [0.9, 0.47], "hamming": [0.1, 0.0],
                             "test_acc": [0.5, 0.8, 0.9]})
    for k, v in cut.items():
        setattr(prog, k, v)
    before, after = flops.count(dense), flops.count(pruned)
    r = report.results(spec.from_config(c), prog.to_json(), before, after, 0.85, dense, pruned,
                       config=config_lib.to_json_dict(c), budget_ratio=budget_ratio)
    return c, r, before, after


def test_results_carry_the_measured_ratios_and_the_configs_budget():
    c, r, before, after = _results()
    assert r["macs_ratio"] == after.macs / before.macs < 1
    assert r["prunable_macs_ratio"] == after.prunable_macs / before.prunable_macs
    assert r["params_ratio"] == after.params / before.params
    assert (r["p"], r["budget_scope"], r["budget_enforced"]) == (c.budget.p, "prunable", True)
    assert r["generator_ratio"] == 0.47  # the generator's last MAC ratio
    assert r["widths"] == [2, 4, 8] and r["dense_widths"] == [4, 8, 16]
    assert r["final_acc"] == 0.85 and r["splits"]["final_acc"] == "test"
    assert r["config"]["budget"]["p"] == c.budget.p
    c.sap.selector = "norm"  # no generator ran: no generator ratio, whatever the history holds
    s = models.create_abstract(c.model).structure(c.image_size)
    assert report.results(spec.from_config(c), {"history": {"mac_ratio": [0.4]}}, before, before,
                          0.8, s, s, config={})["generator_ratio"] is None


def test_the_summary_says_what_the_cut_did():
    _, r, _, _ = _results()
    text = report.summary(r)
    for part in ("budget p = 0.5 of prunable MACs", "final (after fine-tuning)", "85.00%",
                 "alignment at the cut: dropped channels' mean norm is 0.020"):
        assert part in text, part
    assert "over p" not in text and "rounded" not in text
    _, r, _, _ = _results(arch_ratio_chosen=0.55, trimmed_channels=3, round_to=2)
    text = report.summary(r)
    assert ("kept 55.0% of prunable MACs, over p; its 3 lowest-norm kept channels were dropped"
            in text)
    assert "kept widths rounded to multiples of 2 (budget.round_to)" in text
    _, r, _, _ = _results(arch_source="generator_last_within_p", arch_ratio_last=0.505)
    assert "last architecture kept 50.5% of prunable MACs, just over p" in report.summary(r)
    _, r, _, _ = _results(arch_ratio_chosen=0.55)
    r["budget_enforced"] = False
    assert "cut as chosen (budget.enforce = False)" in report.summary(r)


def test_a_cut_over_its_budget_says_so_in_results_and_summary():
    _, r, _, _ = _results(budget_ratio=0.5)  # at p exactly: met
    assert (r["budget_ratio"], r["budget_met"]) == (0.5, True)
    assert "OVER" not in report.summary(r)
    _, r, _, _ = _results(budget_ratio=0.62, arch_ratio_chosen=0.9, trimmed_channels=5,
                          round_to=2)
    assert r["budget_met"] is False
    text = report.summary(r)
    assert "its 5 lowest-norm kept channels were dropped at the cut toward p" in text
    assert ("warning: the cut model keeps 62.0% of prunable MACs, OVER the budget p = 0.5: no "
            "widths the cut may take reach it: one channel per group at least, on multiples "
            "of 2") in text
    assert "OVER the budget" in report.brief(r, "/wd")
    r.update(budget_metric="latency", budget_scope="total", round_to=0)
    assert ("62.0% of total estimated latency, OVER the budget p = 0.5: no widths the cut may "
            "take reach it: one channel per group at least, on the latency table's steps (a "
            "lower p is beyond this model on the table's device)") in report.summary(r)
    r["budget_enforced"] = False
    assert "OVER the budget p = 0.5: budget.enforce = False" in report.summary(r)
    _, r, _, _ = _results()  # a caller that does not say: nothing claimed
    assert r["budget_met"] is None and "OVER" not in report.summary(r)


def test_the_terminal_gets_a_brief_with_the_headline_figures_and_the_notes():
    _, r, _, _ = _results(arch_ratio_chosen=0.55, trimmed_channels=3)
    r["speed"] = {"device": "cpu", "dtype": "float32", "reps": 5, "mac_speedup": 2.0, "batches": [
        {"batch": 1, "speedup": 1.1, "speedup_iqr": [0.9, 1.3], "within_noise": True},
        {"batch": 64, "speedup": 1.5, "speedup_iqr": [1.4, 1.6], "within_noise": False}]}
    text = report.brief(r, "/wd")
    assert len(text.splitlines()) <= 6
    for part in ("budget p = 0.5 of prunable MACs", "final 85.00%", "alignment 0.020",
                 "its 3 lowest-norm kept channels were dropped",
                 "batch 1 1.10x [0.90-1.30, within noise]",
                 "batch 64 1.50x [1.40-1.60]", "full report: /wd/summary.txt"):
        assert part in text, part


def test_write_puts_results_summary_and_plots_in_the_workdir(tmp_path):
    _, r, _, _ = _results()
    report.write(str(tmp_path), r, plots=True)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(r))
    assert (tmp_path / "summary.txt").read_text() == report.summary(r) + "\n"
    for name in ("accuracy.png", "hamming.png", "widths.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    (tmp_path / "quiet").mkdir()
    report.write(str(tmp_path / "quiet"), r, plots=False)
    assert sorted(os.listdir(tmp_path / "quiet")) == ["results.json", "summary.txt"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_line_redraws_in_place_on_a_terminal_and_stays_silent_elsewhere():
    from sap_jax.runtime import console

    out = _Terminal()
    line = console.ProgressLine(100, stream=out, every_s=0.0)
    line.update(10, "search epoch 2/5")  # the first call only starts the clock
    time.sleep(0.01)
    line.update(20, "search epoch 2/5")
    text = out.getvalue()
    assert text.startswith("\r  search epoch 2/5  step 20/100") and "steps/s  ETA " in text
    line.clear()
    assert out.getvalue().endswith("\r") and line.width == 0
    quiet = io.StringIO()  # not a terminal: a batch job's log gets whole lines only
    line = console.ProgressLine(100, stream=quiet, every_s=0.0)
    line.update(1, "x")
    line.update(2, "x")
    line.clear()
    assert quiet.getvalue() == ""
