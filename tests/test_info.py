"""The `python -m sap_jax.info` command users run before (and after) pruning."""

import json
import subprocess
import sys

import numpy as np

from sap_jax import info, models, surgery
from sap_jax.structure import flops


def test_json_report_of_a_preset(capsys):
    assert info.main(["--model=resnet56", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["groups"] == [16] * 9 + [32] * 9 + [64] * 9
    assert abs(r["macs"] / 125.49e6 - 1) < 0.01
    assert r["prunable_macs"] < r["macs"]
    assert {"macs", "params", "prunable_macs", "groups"} <= set(r)


def test_text_report_and_image_size(capsys):
    assert info.main(["--model", "mobilenet_v2", "--image-size", "160"]) == 0
    out = capsys.readouterr().out
    assert "16 prunable channel groups" in out and "input 160x160" in out
    want = flops.count(models.create_abstract("mobilenet_v2").structure(160))
    assert f"{want.macs / 1e6:.2f}M" in out


def test_pruned_directory_before_after_table(tmp_path, capsys):
    dense = models.create("resnet_cifar_tiny")
    arch = [np.array([1, 1, 0, 0], np.float32), np.ones(8, np.float32), np.ones(16, np.float32)]
    surgery.save(tmp_path / "p", surgery.extract(dense, arch), dense_widths=dense.widths,
                 image_size=32)
    assert info.main(["--pruned", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "50.0%" in out
    assert info.main(["--pruned", str(tmp_path / "p"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["groups"] == [2, 8, 16] and r["dense_groups"] == [4, 8, 16]
    assert 0 < r["macs_ratio"] < 1
    # A run's workdir holds its model in pruned_model/: --pruned finds it there.
    surgery.save(tmp_path / "run" / "pruned_model", surgery.extract(dense, arch),
                 dense_widths=dense.widths, image_size=32)
    assert info.main(["--pruned", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == [2, 8, 16]


def test_a_missing_or_unfinished_model_directory_is_named_for_what_it_is(tmp_path, capsys):
    assert info.main(["--pruned", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "half").mkdir()  # a save that never wrote model.json
    assert info.main(["--pruned", str(tmp_path / "half")]) == 2
    assert "model.json is missing (was the save interrupted?" in capsys.readouterr().err


def test_errors_exit_2_with_a_message():
    p = subprocess.run([sys.executable, "-m", "sap_jax.info", "--model=resnet57"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown model 'resnet57'" in p.stderr and "resnet56" in p.stderr
    assert info.main(["--model=resnet50", "--image-size=100"]) == 2
