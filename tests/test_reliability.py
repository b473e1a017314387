"""Hardening: preemption, crashes, damaged state, determinism, numerical faults.

The tiny config runs 20 weight steps: dense epoch (steps 1-4), search epochs
(5-12), then the cut and two fine-tuning epochs (13-20). Checkpoints: 1 after
epoch 1 (E_start), 2 after epoch 2, 3 at the end of the search, 4 after the
cut, 5 and 6 after the fine-tuning epochs.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sap_jax import surgery, train
from sap_jax.train import config as config_lib
from sap_jax.train import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow
TINY = ["--config=tests/support/tiny_config.py", "--config.plots=False"]


def _fault_run(workdir, fault="none", arg=0, *extra, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "support", "fault_run.py"), fault, str(arg),
         "--", *TINY, f"--workdir={workdir}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _outcome(workdir):
    """What a finished run produced that must not depend on interruptions: the per-epoch
    history, the widths and every final parameter (exactly)."""
    r = json.loads(open(os.path.join(workdir, "results.json")).read())
    model = surgery.load(os.path.join(workdir, "pruned_model"))
    params = {"/".join(map(str, k)): np.asarray(v)
              for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return r["history"], r["widths"], r["final_acc"], params


def _assert_identical(a, b):
    (ha, wa, fa, pa), (hb, wb, fb, pb) = a, b
    assert ha == hb and wa == wb and fa == fb
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


_REFERENCE_OUTPUT = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = tmp_path_factory.mktemp("reference")
    p = _fault_run(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    _REFERENCE_OUTPUT.update(stdout=p.stdout, stderr=p.stderr)
    return str(wd)


def test_the_terminal_gets_one_line_per_epoch_and_the_workdir_the_full_log(reference):
    err = _REFERENCE_OUTPUT["stderr"]
    c = tiny_config.get_config()
    epochs = [line for line in err.splitlines() if " epoch " in line]
    assert len(epochs) == c.num_epochs + c.finetune.num_epochs
    for noise in ("logging_writer", "Setting work unit notes", "oneDNN", "libtpu", "train/loss="):
        assert noise not in err, noise
    assert len(err.splitlines()) <= len(epochs) + 6  # start, cut, a warning at most
    log = open(os.path.join(reference, "log.txt")).read()  # everything, metrics included
    assert "train/loss=" in log and "epoch 1/" in log and "cut: widths" in log


# -- 1. preemption -------------------------------------------------------------------

@pytest.mark.parametrize("signal_, step, phase, ckpt, into", [
    ("sigterm", 6, "search", 2, 2), ("sigterm", 15, "finetune", 5, 3),
    ("sigint", 6, "search", 2, 2)])  # a first Ctrl-C is taken like a preemption notice
def test_sigterm_saves_at_the_next_step_exits_75_and_resumes_exactly(reference, tmp_path, signal_,
                                                                     step, phase, ckpt, into):
    # Every program goes into the workdir's compilation cache (not only those that take over 1 s
    # to compile), so the resumed process runs programs loaded from it, not compiled afresh.
    cache_all = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    p = _fault_run(tmp_path, signal_, step, env=cache_all)
    assert p.returncode == train.EXIT_PREEMPTED == 75, p.stderr[-3000:]
    assert ("Ctrl-C: saved checkpoint" in p.stderr) == (signal_ == "sigint")
    assert "Traceback" not in p.stderr
    assert (tmp_path / "PREEMPTED").exists()  # for schedulers that see srun's code, not 75
    assert (f"saved checkpoint {ckpt} at step {step} (phase {phase}" in p.stderr
            and f"{into} steps into it" in p.stderr and "Rerun the same command" in p.stderr)
    assert not (tmp_path / "results.json").exists()
    # The resumed process keeps freed host memory and times its models (neither is a result
    # field): the outcome must not change, and the speed figures say what they ran under.
    again = _fault_run(tmp_path, "none", 0, "--config.host_memory=retain",
                       "--config.speed.enabled=True", "--config.speed.reps=1", env=cache_all)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from checkpoint {ckpt}" in again.stderr
    assert not (tmp_path / "PREEMPTED").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    cache = results["compile_cache"]
    assert cache["directory"] == str(tmp_path / "compile_cache") and cache["loaded"] > 0
    assert results["speed"]["host_memory"].startswith(
        "retained" if sys.platform == "linux" else "system")
    _assert_identical(_outcome(reference), _outcome(tmp_path))


def test_a_ctrl_c_during_the_cut_stops_after_it_and_resumes_exactly(reference, tmp_path):
    p = _fault_run(tmp_path, "sigint-cut", 0)
    assert p.returncode == 75, p.stderr[-3000:]
    assert "Ctrl-C: stopped after the cut" in p.stderr and "Traceback" not in p.stderr
    again = _fault_run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_identical(_outcome(reference), _outcome(tmp_path))


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    p = _fault_run(tmp_path, "sigint2", 6)
    assert p.returncode == 130, p.stderr[-3000:]
    assert "aborted by Ctrl-C without saving" in p.stderr and "Traceback" not in p.stderr
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == [1]  # only the phase-start checkpoint; nothing written at the abort


# -- 2. crash safety -------------------------------------------------------------------

@pytest.mark.parametrize("fault, arg, resumes_from", [
    ("sigkill", 10, "checkpoint 2"),       # mid-epoch in the search
    ("sigkill", 17, "checkpoint 5"),       # mid-epoch in fine-tuning
    ("sigkill-save", 3, "checkpoint 2"),   # while checkpoint 3 is being written
])
def test_sigkill_restarts_from_the_last_complete_checkpoint(reference, tmp_path, fault, arg,
                                                             resumes_from):
    p = _fault_run(tmp_path, fault, arg)
    assert p.returncode == -9, p.stderr[-3000:]
    if fault == "sigkill-save":  # the kill really hit a write in progress
        assert any("orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints"))
    again = _fault_run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {resumes_from}" in again.stderr
    assert not any("tmp" in n for n in os.listdir(tmp_path / "checkpoints"))
    _assert_identical(_outcome(reference), _outcome(tmp_path))


# -- 3. determinism ----------------------------------------------------------------------

def test_same_seed_is_bit_identical_and_another_seed_is_not(reference, tmp_path):
    assert _fault_run(tmp_path / "again").returncode == 0
    _assert_identical(_outcome(reference), _outcome(tmp_path / "again"))
    assert _fault_run(tmp_path / "seed1", "none", 0, "--config.seed=1").returncode == 0
    h0, _, _, p0 = _outcome(reference)
    h1, _, _, p1 = _outcome(tmp_path / "seed1")
    assert h0["train_loss"] != h1["train_loss"]
    assert any(not np.array_equal(p0[k], p1[k])
               for k in p0 if k in p1 and p0[k].shape == p1[k].shape)


# -- 4. damaged or foreign state ------------------------------------------------------------

def _copy(reference, tmp_path, finished=False):
    """The reference workdir; unless ``finished``, as if the run stopped just before writing
    its results (so a rerun restores the last checkpoint)."""
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    if not finished:
        (wd / "results.json").unlink()
    return wd


def test_rerunning_a_finished_run_prints_its_summary_and_changes_nothing(reference, tmp_path,
                                                                          capsys):
    wd = _copy(reference, tmp_path, finished=True)
    before = {f: (wd / f).read_bytes() for f in ("results.json", "summary.txt")}
    steps, phases = [], []
    hooks = train.Hooks(on_step=lambda *a: steps.append(a), on_phase=phases.append)
    r = train.train_and_evaluate(tiny_config.get_config(), str(wd), hooks=hooks)
    assert steps == [] and phases == []  # nothing trained, nothing cut
    assert r == json.loads(before["results.json"])
    assert {f: (wd / f).read_bytes() for f in before} == before
    printed = capsys.readouterr().out.strip()
    assert printed == report.brief(json.loads(before["results.json"]), wd).strip()
    assert printed.count("\n") < 8 and str(wd / "summary.txt") in printed


def test_remeasuring_a_finished_runs_speed_keeps_the_earlier_figures(reference, tmp_path):
    """--remeasure_speed times the models again and changes nothing else; each earlier
    measurement stays in speed_earlier."""
    wd = _copy(reference, tmp_path, finished=True)
    before = json.loads((wd / "results.json").read_text())
    c = tiny_config.get_config()
    c.speed.enabled, c.speed.reps, c.speed.batch_sizes = True, 1, (1,)
    steps = []
    hooks = train.Hooks(on_step=lambda *a: steps.append(a))
    first = train.train_and_evaluate(c, str(wd), hooks=hooks, remeasure_speed=True)
    second = train.train_and_evaluate(c, str(wd), hooks=hooks, remeasure_speed=True)
    assert steps == []  # nothing trained
    assert first["speed"]["batches"]
    assert first["speed_earlier"] == ([before["speed"]] if before.get("speed") else [])
    assert second["speed_earlier"] == first["speed_earlier"] + [first["speed"]]
    on_disk = json.loads((wd / "results.json").read_text())
    assert on_disk == second
    assert {k: v for k, v in on_disk.items() if not k.startswith("speed")} == {
        k: v for k, v in before.items() if not k.startswith("speed")}


def test_corrupted_checkpoint_names_its_path_and_what_to_do(reference, tmp_path):
    wd = _copy(reference, tmp_path)
    state = wd / "checkpoints" / "6" / "state"
    for d, _, files in os.walk(state):
        for f in files:
            if not f.startswith("_") and "commit" not in f:
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.write(b"\x00garbage" * 8)
    with pytest.raises(train.CheckpointError,
                       match=r"checkpoints/6 cannot be read .*Delete .*checkpoints/6 "
                             r"to resume from the checkpoint before it"):
        train.train_and_evaluate(tiny_config.get_config(), str(wd))


def test_unreadable_checkpoint_metadata_is_reported(reference, tmp_path):
    wd = _copy(reference, tmp_path)
    (wd / "checkpoints" / "6" / "meta" / "metadata").write_text("{truncated")
    with pytest.raises(train.CheckpointError, match=r"checkpoints/6 cannot be read"):
        train.train_and_evaluate(tiny_config.get_config(), str(wd))


def test_checkpoint_from_another_config_is_refused(reference, tmp_path):
    wd = _copy(reference, tmp_path)
    (wd / "config.json").unlink()  # not even the workdir's config file can vouch for it
    c = tiny_config.get_config()
    c.sap.gamma = 0.5
    with pytest.raises(config_lib.ConfigError, match=r"checkpoints/6 was written by a run with a "
                                                     r"different config"):
        train.train_and_evaluate(c, str(wd))


def test_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(reference, tmp_path,
                                                                   monkeypatch):
    real = ocp.CheckpointManager.save

    def full(self, step, *a, **kw):
        if step == 3:  # a partial write, then the disk is full
            os.makedirs(os.path.join(self.directory, "3.orbax-checkpoint-tmp-1"), exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(train.CheckpointWriteError,
                       match=r"could not write checkpoint 3 to .*No space "
                             r"left on device.*checkpoint 2 in .* is intact"):
        train.train_and_evaluate(tiny_config.get_config(), str(tmp_path))
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    train.train_and_evaluate(tiny_config.get_config(), str(tmp_path))  # space is back: resume
    _assert_identical(_outcome(reference), _outcome(tmp_path))


# -- 6. numerical faults -------------------------------------------------------------------

def test_skip_mode_skips_non_finite_steps_and_counts_them(tmp_path, monkeypatch):
    from sap_jax.train import data as data_lib

    real = data_lib.ArrayDataset.train_batches

    def poisoned(self, epoch, global_batch, num_steps=None, **kw):
        for i, b in enumerate(real(self, epoch, global_batch, num_steps, **kw)):
            if epoch == 1 and i in (1, 2):
                b["image"] = b["image"] * np.inf
            yield b

    monkeypatch.setattr(data_lib.ArrayDataset, "train_batches", poisoned)
    c = tiny_config.get_config()
    c.on_nonfinite = "skip"
    r = train.train_and_evaluate(c, str(tmp_path))
    assert r["skipped_steps"] == 2
    assert np.all(np.isfinite(r["history"]["train_loss"]))
    model = surgery.load(tmp_path / "pruned_model")
    assert all(np.all(np.isfinite(np.asarray(v)))
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
