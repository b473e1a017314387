"""The training program: all phases, resume, config validation, faults."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sap_jax import config as config_lib
from sap_jax import info, report, surgery, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import test_tiny  # noqa: E402


def tiny(**overrides):
    c = test_tiny.get_config()
    for k, v in overrides.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def test_tiny_run_through_every_phase_on_mock_cifar10(tmp_path):
    import tensorflow_datasets as tfds

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
    # The tiny search is too short for the AGN to reach p; enforce_budget (the default)
    # trimmed the chosen architecture at the cut, and the cut model still equals the
    # gated sub-network above.
    assert saved["chosen_arch_ratio"] > c.sap.p >= saved["prunable_macs_ratio"]
    assert "dropped at the cut to meet p" in (tmp_path / "summary.txt").read_text()
    assert saved["round_to"] == 1  # no rounding (the default)
    h = saved["history"]
    assert len(h["test_acc"]) == 3 and len(h["hamming"]) == 2 and len(h["ft_test_acc"]) == 2
    assert set(saved["times_s"]) == {"dense", "search", "cut", "finetune", "speed"}
    # Measured inference speed of the extracted model vs the dense one, on this device.
    sp = saved["speed"]
    assert sp["platform"] == "cpu" and sp["reps"] == 2 and sp["image_size"] == 32
    assert sp["macs_dense"] == saved["macs_before"] and sp["macs_pruned"] == saved["macs_after"]
    assert [b["batch"] for b in sp["batches"]] == [1, 4]
    for b in sp["batches"]:
        assert b["speedup"] == pytest.approx(b["dense_ms"] / b["pruned_ms"])
        assert b["efficiency"] == pytest.approx(b["speedup"] * saved["macs_after"] / saved["macs_before"])
    assert "batch 1 latency" in (tmp_path / "summary.txt").read_text()
    model = surgery.load(tmp_path / "pruned_model")
    assert list(model.widths) == saved["widths"]
    assert info.main(["--pruned", str(tmp_path / "pruned_model")]) == 0


def _final(workdir):
    return json.loads(open(os.path.join(workdir, "results.json")).read())


class _Killed(Exception):
    pass


# Kill-and-resume at many points (SIGTERM, SIGKILL, mid-checkpoint) lives in
# tests/test_reliability.py, against a subprocess run.


def test_config_validation_lists_every_error():
    c = tiny(**{"sap.p": 1.5, "sap.e_start": 3, "model": "resnet57", "dataset": "mnist",
                "batch_size": 15, "agn.tau": 0.0, "agn.resource_form": "hinge",
                "speed.batch_sizes": (1, 0), "speed.reps": 0})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, device_count=2, process_count=1)
    msg = str(e.value)
    for part in ("sap.p", "budget p = 1.5", "sap.e_start = 3", "num_epochs = 3",
                 "unknown model 'resnet57'", "dataset = 'mnist'", "batch_size = 15 does not divide by the 2 devices",
                 "agn.tau = 0.0", "'hinge'", "speed.batch_sizes = (1, 0)", "speed.reps = 0"):
        assert part in msg, part
    with pytest.raises(config_lib.ConfigError, match="image_size"):
        config_lib.validate(tiny(image_size=18))
    config_lib.validate(tiny())  # the tiny config itself is valid


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "__init__.py"))
def test_every_shipped_config_is_valid(name):
    config_lib.validate(importlib.import_module(f"configs.{name}").get_config(),
                        device_count=1, process_count=1)


def test_config_validation_checks_sizes_against_the_dataset():
    with pytest.raises(config_lib.ConfigError, match="val_size = 1430 leaves 7 of digits.s 1437"):
        config_lib.validate(tiny(val_size=1430))
    with pytest.raises(config_lib.ConfigError, match="mnist5k images are 28 px"):
        config_lib.validate(tiny(dataset="mnist5k", image_size=16))
    config_lib.validate(tiny(dataset="mnist5k", image_size=28))


def test_workdir_with_a_different_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_json_dict(tiny(**{"sap.p": 0.3}))))
    with pytest.raises(config_lib.ConfigError, match=r"different config \(fields sap.p differ\)"):
        train.train_and_evaluate(tiny(), str(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from sap_jax import data as data_lib

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


def _main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sap_jax.main", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, timeout=300)


def test_imagenet_config_without_imagenet_fails_fast_with_instructions(tmp_path):
    p = _main("--config=configs/imagenet_r50.py", f"--workdir={tmp_path / 'w'}",
              f"--config.data_dir={tmp_path / 'tfds'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "ImageNet (TFDS 'imagenet2012') is not prepared" in p.stderr
    assert "downloads/manual" in p.stderr and "tfds build imagenet2012" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_override_fails_before_compiling(tmp_path):
    p = _main("--config=configs/test_tiny.py", f"--workdir={tmp_path}", "--config.sap.p=0")
    assert p.returncode == 2 and "budget p = 0" in p.stderr and "Traceback" not in p.stderr


def test_eight_simulated_devices_match_one_device(tmp_path):
    out = {}
    for n in (1, 8):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_run.py"), str(n),
                            str(tmp_path / f"d{n}")], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
        out[n] = json.loads(line[len("RESULT "):])
    one, eight = np.array(out[1]["losses"]), np.array(out[8]["losses"])
    assert len(one) == len(eight) >= 10
    np.testing.assert_allclose(eight, one, rtol=2e-4, atol=2e-5)
    assert out[8]["widths"] == out[1]["widths"]


def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    c = tiny(dtype="bfloat16", num_epochs=2, **{"sap.enforce_budget": False, "sap.round_to": 2})
    c.finetune.num_epochs = 1
    r = train.train_and_evaluate(c, str(tmp_path))
    # Without enforce_budget the cut keeps the chosen architecture, over budget or not
    # (the tiny search is far too short for the AGN to reach p), and the summary says so;
    # rounding (to 2 here) stays within the chosen ratio instead of trimming to p.
    assert r["chosen_arch_ratio"] >= r["prunable_macs_ratio"] > c.sap.p
    assert all(w % 2 == 0 or w == d for w, d in zip(r["widths"], r["dense_widths"]))
    assert "cut as chosen" in (tmp_path / "summary.txt").read_text()
    h = r["history"]
    assert np.all(np.isfinite(h["train_loss"])) and np.all(np.isfinite(h["ft_train_loss"]))
    model = surgery.load(tmp_path / "pruned_model")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    assert model(jnp.zeros((2, 16, 16, 3))).dtype == jnp.bfloat16


def test_round_to_cuts_widths_to_multiples_within_the_budget(tmp_path):
    c = tiny(**{"sap.round_to": 2, "num_epochs": 2})
    c.finetune.num_epochs = 1
    r = train.train_and_evaluate(c, str(tmp_path))
    assert all(w % 2 == 0 for w in r["widths"]) and r["widths"] != r["dense_widths"]
    assert r["round_to"] == 2 and "rounded to multiples of 2" in report.summary(r)
    assert r["prunable_macs_ratio"] <= c.sap.p
    # The cut model still computes exactly the gated dense sub-network it came from.
    assert r["cut_acc"] == pytest.approx(r["subnet_acc_at_cut"], abs=1e-6)


def test_best_architecture_is_chosen_on_validation_never_on_test(tmp_path, monkeypatch):
    """final_arch="best" judges sub-networks on the validation split: scrambling the test split's
    labels changes every reported test number but not the choice."""
    from sap_jax import data as data_lib

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
    assert broken["dense_acc"] != clean["dense_acc"]  # the test split was changed and read
    assert broken["final_acc"] <= 0.2
    h = clean["history"]
    judged = h["subnet_val_acc_bn"]  # c.cut.bn_in_search: judged with re-estimated BN
    assert clean["best_subnet_val_acc"] == max(judged)
    assert clean["best_subnet_epoch"] == c.sap.e_start + 1 + int(np.argmax(judged))
    for key in ("best_subnet_val_acc", "best_subnet_epoch", "widths"):
        assert broken[key] == clean[key], key
    assert broken["history"]["subnet_val_acc"] == h["subnet_val_acc"]
    assert clean["splits"]["best_subnet_val_acc"] == "val" and clean["splits"]["final_acc"] == "test"
