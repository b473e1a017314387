"""The training program: all phases, resume, config validation, faults."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from sap_jax import info, models, surgery, train
from sap_jax.method import cut
from sap_jax.train import config as config_lib
from sap_jax.train import report

pytestmark = pytest.mark.slow  # whole tiny runs, in-process and through the CLI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


tiny = tiny_config  # tests/support/tiny_config.py with dotted overrides
TINY_CONFIG = "--config=tests/support/tiny_config.py"  # the same file, for the CLI (cwd ROOT)


def test_tiny_run_through_every_phase_on_mock_cifar10(tmp_path):
    import tensorflow_datasets as tfds

    from sap_jax.train import data as data_lib

    c = tiny(dataset="cifar10", image_size=32, plots=True,
             **{"speed.enabled": True, "speed.batch_sizes": (1, 4), "speed.reps": 2})
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        r = train.train_and_evaluate(c, str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"results.json", "summary.txt", "accuracy.png", "hamming.png", "widths.png",
            "pruned_model", "checkpoints", "config.json"} <= files
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["widths"] == r["widths"] and len(saved["widths"]) == 3
    for key in ("dense_acc", "cut_acc", "final_acc", "subnet_acc_at_cut"):
        assert 0.0 <= saved[key] <= 1.0
    # The cut model computes exactly the gated dense sub-network.
    assert saved["cut_acc"] == pytest.approx(saved["subnet_acc_at_cut"], abs=1e-6)
    assert saved["macs_after"] < saved["macs_before"]
    # The tiny search is too short for the AGN to reach p; budget.enforce (the default)
    # trimmed the chosen architecture at the cut, and the cut model still equals the
    # gated sub-network above.
    assert saved["chosen_arch_ratio"] > c.budget.p >= saved["prunable_macs_ratio"]
    assert saved["budget_ratio"] == saved["prunable_macs_ratio"] and saved["budget_met"] is True
    assert "dropped at the cut to meet p" in (tmp_path / "summary.txt").read_text()
    # budget.round_to = 0 (auto): on the CPU, multiples of 8 or the largest half of 8 that
    # meets p on this 4-16-wide model, applied to the widths the trimming left.
    kept = saved["widths_before_rounding"]
    s = models.create_abstract(c.model, num_classes=10).structure(c.image_size)
    assert (saved["round_to"], saved["widths"]) == cut.auto_round_widths(s, kept, c.budget.p,
                                                                         "cpu")
    assert saved["round_to"] > 1
    h = saved["history"]
    assert len(h["test_acc"]) == 3 and len(h["hamming"]) == 2 and len(h["ft_test_acc"]) == 2
    assert set(saved["times_s"]) == {"dense", "search", "cut", "finetune", "speed"}
    assert saved["devices"] == {"platform": "cpu", "kind": "cpu", "count": 1, "per_process": 1,
                                "processes": 1}
    # Measured inference speed of the extracted model vs the dense one, on this device.
    sp = saved["speed"]
    assert sp["platform"] == "cpu" and sp["reps"] == 2 and sp["image_size"] == 32
    assert sp["macs_dense"] == saved["macs_before"] and sp["macs_pruned"] == saved["macs_after"]
    assert [b["batch"] for b in sp["batches"]] == [1, 4]
    for b in sp["batches"]:
        lo, hi = b["speedup_iqr"]
        assert lo <= b["speedup"] <= hi  # the median of the rounds' ratios, inside their IQR
        assert b["efficiency"] == pytest.approx(
            b["speedup"] * saved["macs_after"] / saved["macs_before"])
    assert "batch 1 latency" in (tmp_path / "summary.txt").read_text()
    model = surgery.load(tmp_path / "pruned_model")
    assert list(model.widths) == saved["widths"]
    assert info.main(["--pruned", str(tmp_path / "pruned_model")]) == 0
    # The saved model says how to feed it: size, normalisation and the dataset's classes.
    x = surgery.read_info(tmp_path / "pruned_model")["metadata"]["input"]
    assert x["image_size"] == 32 and x["mean"] == list(data_lib.CIFAR_MEAN)
    assert x["class_names"][0] == "airplane" and x["num_classes"] == 10


def _final(workdir):
    return json.loads(open(os.path.join(workdir, "results.json")).read())


class _Killed(Exception):
    pass


# Kill-and-resume at many points (SIGTERM, SIGKILL, mid-checkpoint) lives in
# tests/test_reliability.py, against a subprocess run.


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from sap_jax.train import data as data_lib

    real = data_lib.ArrayDataset.train_batches

    def poisoned(self, epoch, global_batch, num_steps=None, **kw):
        for b in real(self, epoch, global_batch, num_steps, **kw):
            if epoch == 2:
                b["image"] = b["image"] * np.nan
            yield b

    monkeypatch.setattr(data_lib.ArrayDataset, "train_batches", poisoned)
    with pytest.raises(train.NonFiniteLoss, match=r"NaN/Inf at step 9 \(phase search, epoch 3\).*"
                                                  r"last good checkpoint \(2, in .*checkpoints\)"):
        train.train_and_evaluate(tiny(), str(tmp_path))
    progress = train.latest_progress(str(tmp_path), tiny())
    assert progress["ckpt"] == 2 and progress["epoch"] == 2
    # The remedy (a lower learning rate) changes a result-affecting field of a started run:
    # refused unless asked for, then the run continues from checkpoint 2 and records the change.
    monkeypatch.setattr(data_lib.ArrayDataset, "train_batches", real)
    lower = tiny(**{"optim.learning_rate": 0.01})
    with pytest.raises(config_lib.ConfigError, match="--allow_config_change"):
        train.train_and_evaluate(lower, str(tmp_path))
    phases = []
    r = train.train_and_evaluate(lower, str(tmp_path), train.Hooks(on_phase=phases.append),
                                 allow_config_change=True)
    assert phases == ["search", "cut", "finetune", "finish"]
    assert r["config_changes"] == [{"from_checkpoint": 2, "fields": {
        "optim.learning_rate": [tiny().optim.learning_rate, 0.01]},
        "from_hashes": r["config_changes"][0]["from_hashes"]}]
    assert len(r["history"]["test_acc"]) == tiny().num_epochs  # the two epochs before it kept


def _main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sap_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, timeout=300)


def test_imagenet_config_without_imagenet_fails_fast_with_instructions(tmp_path):
    p = _main("--config=configs/imagenet_r50.py", f"--workdir={tmp_path / 'w'}",
              f"--config.data_dir={tmp_path / 'tfds'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "ImageNet (TFDS 'imagenet2012') is not prepared" in p.stderr
    assert "downloads/manual" in p.stderr and "tfds build imagenet2012" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_override_fails_before_compiling_and_an_old_field_name_is_refused(tmp_path):
    p = _main(TINY_CONFIG, f"--workdir={tmp_path}", "--config.budget.p=0")
    assert p.returncode == 2 and "budget p = 0" in p.stderr and "Traceback" not in p.stderr
    # sap.p became budget.p in 0.2.0: the old name is unknown, and the message names the new one.
    p = _main(TINY_CONFIG, f"--workdir={tmp_path}", "--config.sap.p=0.5")
    assert p.returncode == 2 and "no field 'sap.p'" in p.stderr and "budget.p" in p.stderr


@pytest.mark.parametrize("case", ["missing", "syntax", "int", "float", "no_workdir", "unwritable"])
def test_command_line_mistakes_exit_with_2_and_one_line(tmp_path, case):
    """Each is reported before anything trains, on one line of stderr, with exit code 2."""
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    (tmp_path / "ro").mkdir(mode=0o555)
    tiny_cfg, wd = TINY_CONFIG, f"--workdir={tmp_path / 'w'}"
    args, says = {
        "missing": ([f"--config={tmp_path / 'nope.py'}", wd], "nope.py does not exist"),
        "syntax": ([f"--config={bad}", wd], "cannot be loaded: SyntaxError"),
        "int": ([tiny_cfg, wd, "--config.num_epochs=three"], "--config.num_epochs=three: invalid"),
        "float": ([tiny_cfg, wd, "--config.budget.p=abc"], "could not convert string to float"),
        "no_workdir": ([tiny_cfg], "--workdir"),
        "unwritable": ([tiny_cfg, f"--workdir={tmp_path / 'ro' / 'w'}"], "cannot be written"),
    }[case]
    if case == "unwritable" and os.geteuid() == 0:
        args[1] = "--workdir=/proc/sap_jax_w"  # root writes anywhere else
    p = _main(*args)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and says in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "FATAL" not in p.stderr


def multidevice_runs(tmp_path, counts, *model):
    """tests/support/multidevice_run.py's results on each of ``counts`` simulated devices."""
    out = {}
    for n in counts:
        script = os.path.join(ROOT, "tests", "support", "multidevice_run.py")
        p = subprocess.run([sys.executable, script, str(n), str(tmp_path / f"d{n}"), *model],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
        out[n] = json.loads(line[len("RESULT "):])
    return out


def test_eight_simulated_devices_match_one_device(tmp_path):
    out = multidevice_runs(tmp_path, (1, 8))
    one, eight = np.array(out[1]["losses"]), np.array(out[8]["losses"])
    assert len(one) == len(eight) >= 10
    # The same steps: sharding only reorders float32 sums. Dense training (the first epoch)
    # agrees to rounding; afterwards the search's discrete choices let the rounding grow a
    # little (measured up to 3.5e-4 relative), far below what a wrong split or an unreduced
    # gradient would give (percent-level from the second step).
    dense_steps = out[1]["dense_steps"]
    np.testing.assert_allclose(eight[:dense_steps], one[:dense_steps], rtol=2e-5)
    np.testing.assert_allclose(eight, one, rtol=1e-3)
    assert out[8]["widths"] == out[1]["widths"]
    # The pre-flight check compiled the sharded first step, and the loop's first step found it:
    # no compile of the weight step between entering "search" and the first step's result.
    for n in (1, 8):
        assert out[n]["step_compiles"] == {"preflight": 1, "first_step": 0}, out[n]


def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    c = tiny(dtype="bfloat16", num_epochs=2, **{"budget.enforce": False, "budget.round_to": 2})
    c.finetune.num_epochs = 1
    r = train.train_and_evaluate(c, str(tmp_path))
    # Without budget.enforce the cut keeps the chosen architecture, over budget or not
    # (the tiny search is far too short for the AGN to reach p), and the summary says so;
    # rounding (to 2 here) stays within the chosen ratio instead of trimming to p.
    assert r["chosen_arch_ratio"] >= r["prunable_macs_ratio"] > c.budget.p
    assert r["budget_ratio"] == r["prunable_macs_ratio"] and r["budget_met"] is False
    assert all(w % 2 == 0 or w == d for w, d in zip(r["widths"], r["dense_widths"]))
    text = (tmp_path / "summary.txt").read_text()
    assert "cut as chosen" in text and "OVER the budget p = 0.5: budget.enforce = False" in text
    h = r["history"]
    assert np.all(np.isfinite(h["train_loss"])) and np.all(np.isfinite(h["ft_train_loss"]))
    model = surgery.load(tmp_path / "pruned_model")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    assert model(jnp.zeros((2, 16, 16, 3))).dtype == jnp.bfloat16


def test_round_to_cuts_widths_to_multiples_within_the_budget(tmp_path):
    c = tiny(**{"budget.round_to": 2, "num_epochs": 2})
    c.finetune.num_epochs = 1
    r = train.train_and_evaluate(c, str(tmp_path))
    assert all(w % 2 == 0 for w in r["widths"]) and r["widths"] != r["dense_widths"]
    assert r["round_to"] == 2 and "rounded to multiples of 2" in report.summary(r)
    assert r["prunable_macs_ratio"] <= c.budget.p
    # The cut model still computes exactly the gated dense sub-network it came from.
    assert r["cut_acc"] == pytest.approx(r["subnet_acc_at_cut"], abs=1e-6)


def test_best_architecture_is_chosen_on_validation_never_on_test(tmp_path, monkeypatch):
    """final_arch="best" judges sub-networks on the validation split: scrambling the test split's
    labels changes every reported test number but not the choice."""
    from sap_jax.train import data as data_lib

    c = tiny(num_epochs=4, compile_cache=str(tmp_path / "cache"), **{"sap.final_arch": "best"})
    c.finetune.num_epochs = 1
    clean = train.train_and_evaluate(c, str(tmp_path / "clean"))

    real = data_lib.digits

    def scrambled_test_labels(*args, **kw):
        d = real(*args, **kw)
        d.test_y = (d.test_y + 1 + np.arange(len(d.test_y)) % 9) % 10  # every label wrong
        return d

    monkeypatch.setattr(data_lib, "digits", scrambled_test_labels)
    broken = train.train_and_evaluate(c, str(tmp_path / "broken"))
    # The test split was changed and read (its loss; an untrained tiny model can sit at chance
    # accuracy on both).
    assert broken["history"]["test_loss"] != clean["history"]["test_loss"]
    assert broken["final_acc"] <= 0.2
    h = clean["history"]
    judged = h["subnet_val_acc_bn"]  # c.cut.bn_in_search: judged with re-estimated BN
    assert clean["best_subnet_val_acc"] == max(judged)
    assert clean["best_subnet_epoch"] == c.sap.e_start + 1 + int(np.argmax(judged))
    for key in ("best_subnet_val_acc", "best_subnet_epoch", "widths"):
        assert broken[key] == clean[key], key
    assert broken["history"]["subnet_val_acc"] == h["subnet_val_acc"]
    assert clean["splits"]["best_subnet_val_acc"] == "val"
    assert clean["splits"]["final_acc"] == "test"
