"""The core alone (``pip install -e .``, no extras): no TensorFlow, no PyTorch, and still a
whole run with TensorBoard events.

``.ci/run`` runs this file in a venv made exactly as the README's quickstart line makes it:

    .venv-core/bin/python tests/support/core_only.py

tests/test_lean_core.py runs the same checks in the test venv with the optional packages
blocked (``sys.modules[name] = None``, so importing one fails and ``find_spec`` finds none).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys
import sysconfig
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: What the core must not need: the extras' packages, and clu (its writers import TensorFlow).
OPTIONAL = ("tensorflow", "tensorflow_datasets", "torch", "torchvision", "clu", "mlxtend")
#: Distribution names (dist-info) of the OPTIONAL packages, where they differ.
_DISTS = {"tensorflow_cpu": "tensorflow"}


def core_site(tmp: str | os.PathLike, keep: tuple[str, ...] = ()) -> pathlib.Path:
    """A site-packages directory under ``tmp`` with every entry of this interpreter's, linked,
    except the OPTIONAL packages (but those in ``keep``): run with ``python -S`` and it
    (:func:`run`), they are not installed as far as anything can tell."""
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    shadow = pathlib.Path(tmp) / ("core-site" + "".join(f"+{k}" for k in keep))
    shadow.mkdir(parents=True, exist_ok=True)
    for entry in site.iterdir():
        name = entry.name.split("-")[0].split(".")[0].lower()
        name = _DISTS.get(name, name)
        if (name not in OPTIONAL or name in keep) and not (shadow / entry.name).exists():
            (shadow / entry.name).symlink_to(entry)
    return shadow


TINY = "--config=tests/support/tiny_config.py"


def run(module: str, *args: str, site: os.PathLike | None = None, timeout: int = 600):
    """``python -m module args`` from the repository root; with ``site`` (:func:`core_site`),
    with that site-packages in place of the installed one."""
    cmd = [sys.executable, "-m", module]
    if site is not None:
        cmd = [sys.executable, "-S", "-c",
               f"import runpy, site, sys; site.addsitedir({str(site)!r}); "
               "sys.argv = sys.argv[1:]; "
               "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)", module]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def event_scalars(workdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the workdir's TensorBoard event files, by tag, read with the event
    protobuf alone (TFRecord framing: length, its CRC, the record, its CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(pathlib.Path(workdir).rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def check_run(workdir: pathlib.Path, *, site: os.PathLike | None = None) -> dict:
    """The tiny config end to end: exit 0, results.json, and the scalars in the event files."""
    p = run("sap_jax.main", TINY, f"--workdir={workdir}", site=site)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    tags = event_scalars(workdir)
    for tag in ("train/loss", "epoch/val_acc", "finetune/test_acc", "perf/steps_per_sec"):
        assert tag in tags, (tag, sorted(tags))
    assert abs(tags["finetune/test_acc"][-1][1] - results["final_acc"]) < 1e-6
    from sap_jax.runtime import provenance  # what made the run: this very code

    assert results["provenance"]["code_digest"] == provenance.code_digest()
    return results


def check_missing_extras(tmp: pathlib.Path, *, site: os.PathLike | None = None) -> None:
    """A TFDS dataset and mnist5k each exit 2 with one line naming the install."""
    for dataset, size, extra in (("cifar10", 32, "tfds"), ("mnist5k", 28, "mnist")):
        p = run("sap_jax.main", TINY, f"--workdir={tmp / dataset}", f"--config.dataset={dataset}",
                f"--config.image_size={size}", site=site)
        assert p.returncode == 2, p.stderr[-3000:]
        line = next(x for x in p.stderr.splitlines() if x.startswith("error:"))
        assert line.endswith(f'pip install -c constraints.txt -e ".[{extra}]"'), p.stderr[-3000:]
        assert "Traceback" not in p.stderr


def main() -> int:
    found = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
    assert not found, f"the core venv has optional packages installed: {found}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        results = check_run(tmp / "run")
        check_missing_extras(tmp)
    print(f"core only: the tiny run finished (test accuracy {results['final_acc']:.3f}) "
          f"without {', '.join(OPTIONAL)}; TensorBoard events written; TFDS and mnist5k "
          "configs exit 2 naming their extras.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
