"""Multi-process runs: 2 real JAX processes on 127.0.0.1, each with 2 simulated CPU devices.

They exercise what a TPU pod or a GPU cluster runs: ``jax.distributed``
start-up, per-process data shards, global arrays, collective checkpoints and
process-0-only output.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx, traverse_util

from sap_jax import surgery
from sap_jax.runtime import parallel

pytestmark = pytest.mark.slow  # several processes training a tiny model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=tests/support/tiny_config.py", "--config.plots=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}")
    for k in parallel._MULTIHOST_ENV:  # a CI runner inside Slurm must not auto-join its job
        env.pop(k, None)
    return env


def _main(args, local_devices, **kw):
    return subprocess.Popen([sys.executable, "-m", "sap_jax.main", *args], cwd=ROOT,
                            env=_env(local_devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _job(workdir, *extra, n=2, port=None, timeout_s=60):
    port = port or _free_port()
    return [_main([*TINY, f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={n}", f"--process_id={i}",
                   f"--distributed_timeout_s={timeout_s}", *extra], local_devices=2)
            for i in range(n)]


def _wait(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _params(workdir):
    model = surgery.load(os.path.join(workdir, "pruned_model"))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(
        nnx.state(model, nnx.Param))}


def _results(workdir):
    return json.loads(open(os.path.join(workdir, "results.json")).read())


def _assert_same_run(a, b):
    ra, rb = _results(a), _results(b)
    assert ra["widths"] == rb["widths"]
    for key in ("train_loss", "test_acc", "hamming", "subnet_val_acc", "penalty", "ft_train_loss",
                "ft_test_acc"):
        np.testing.assert_allclose(rb["history"][key], ra["history"][key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process with the same 4 devices' worth of global batch."""
    wd = tmp_path_factory.mktemp("single")
    (rc, out, err), = _wait([_main([*TINY, f"--workdir={wd}"], local_devices=4)])
    assert rc == 0, err[-3000:]
    return str(wd)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    wd = tmp_path_factory.mktemp("two")
    # Also times inference at the end: each process on its own first device, no collectives.
    runs = _wait(_job(wd, "--config.speed.enabled=True", "--config.speed.reps=2",
                      "--config.speed.batch_sizes=(1,2)"))
    for rc, _, err in runs:
        assert rc == 0, err[-3000:]
    return str(wd), runs


def test_two_processes_run_every_phase_and_match_one_process(single, two):
    wd, runs = two
    _assert_same_run(single, wd)
    # Only process 0 reports.
    assert "SAP resnet_cifar_tiny" in runs[0][1] and "SAP resnet_cifar_tiny" not in runs[1][1]
    assert "process 1 of 2" in runs[1][2]
    assert "speed-up on cpu" in runs[0][1] and "batch 1 " in runs[0][1]  # the headline figures
    assert [b["batch"] for b in _results(wd)["speed"]["batches"]] == [1, 2]


def test_two_process_checkpoints_are_written_once_and_complete(two):
    import jax
    import orbax.checkpoint as ocp

    wd, _ = two
    root = os.path.join(wd, "checkpoints")
    names = sorted(os.listdir(root))
    assert names == ["5", "6"], names  # keep_checkpoints = 2; no temporary or duplicate dirs
    for name in names:
        assert sorted(os.listdir(os.path.join(root, name))) == [
            "_CHECKPOINT_METADATA", "commit_success.txt", "meta", "state"]
    # The last checkpoint, written by both processes, restores whole in this one process
    # and holds exactly the final fine-tuned parameters.
    ckptr = ocp.StandardCheckpointer()
    state_dir = os.path.join(root, "6", "state")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                            ckptr.metadata(state_dir).item_metadata)
    state = ckptr.restore(state_dir, abstract)
    flat = {"/".join(k): np.asarray(v) for k, v in
            traverse_util.flatten_dict(state["params"]).items()}
    final = _params(wd)
    assert flat.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(flat[k], final[k], err_msg=k)
    with ocp.CheckpointManager(root, item_names=("state", "meta")) as mgr:
        meta = mgr.restore(6, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert meta["phase"] == "finetune" and meta["epoch"] == 2 and meta["ckpt"] == 6
    assert sorted(os.listdir(os.path.join(wd, "pruned_model"))) == ["model.json", "state"]


def test_two_process_run_killed_mid_search_resumes_to_the_same_result(two, tmp_path):
    wd = tmp_path / "killed"
    procs = _job(wd)
    ckpt = wd / "checkpoints" / "2"  # orbax renames a finished checkpoint into place
    deadline = time.monotonic() + 300
    while (not ckpt.exists() and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    assert ckpt.exists() and not (wd / "results.json").exists()
    resumed = _wait(_job(wd))
    for rc, _, err in resumed:
        assert rc == 0, err[-3000:]
    assert "resuming from checkpoint 2" in resumed[0][2]
    _assert_same_run(two[0], str(wd))


def test_process_id_that_does_not_fit_is_refused(tmp_path):
    (rc, _, err), = _wait([_main([*TINY, f"--workdir={tmp_path}",
                                  "--coordinator_address=127.0.0.1:1234",
                                  "--num_processes=2", "--process_id=2"], local_devices=1)])
    assert rc == parallel.EXIT_DISTRIBUTED_SETUP and "must lie in [0, 1]" in err
    assert "Traceback" not in err


def test_unreachable_coordinator_fails_clearly_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    (rc, _, err), = _wait([_main([*TINY, f"--workdir={tmp_path}",
                                  f"--coordinator_address=127.0.0.1:{_free_port()}",
                                  "--num_processes=2", "--process_id=1",
                                  "--distributed_timeout_s=3"], local_devices=1)], timeout=120)
    assert rc == parallel.EXIT_DISTRIBUTED_SETUP and "could not be reached within 3 s" in err
    assert time.monotonic() - t0 < 60


def test_a_job_whose_other_processes_never_start_fails_clearly(tmp_path):
    procs = _job(tmp_path, n=2, timeout_s=4)
    procs[1].kill()  # process 1 never joins
    (rc, _, err), _ = _wait(procs, timeout=120)
    assert rc == parallel.EXIT_DISTRIBUTED_SETUP and "did not form within 4 s" in err


def test_per_process_batch_that_does_not_divide_is_refused_before_compiling(tmp_path):
    runs = _wait(_job(tmp_path, "--config.batch_size=6"))
    for rc, _, err in runs:
        assert rc == 2 and "batch_size = 6" in err and "Traceback" not in err


def test_an_unwritable_workdir_stops_every_process_at_once(tmp_path):
    """Process 0 finds the workdir unwritable; process 1 must not wait for it at a barrier
    until the job's time-out, but stop with the same exit code."""
    (tmp_path / "a_file").write_text("")
    start = time.monotonic()
    runs = _wait(_job(tmp_path / "a_file" / "wd", timeout_s=120))
    for rc, _, err in runs:
        assert rc == 2 and "cannot be written" in err and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - start < 100  # well before the 120 s coordination time-out


def test_explicit_start_up_needs_all_three_flags(tmp_path):
    (rc, _, err), = _wait([_main([*TINY, f"--workdir={tmp_path}", "--num_processes=2"],
                                 local_devices=1)])
    assert rc == parallel.EXIT_DISTRIBUTED_SETUP and "--coordinator_address" in err


def test_sigterm_on_one_process_stops_both_at_the_same_step(two, tmp_path):
    wd = tmp_path / "preempted"
    procs = _job(wd)
    ckpt = wd / "checkpoints" / "1"  # the search has started
    deadline = time.monotonic() + 300
    while (not ckpt.exists() and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the scheduler preempts one host
    runs = _wait(procs)
    steps = []
    for rc, _, err in runs:
        assert rc == 75, err[-3000:]
        line = next(x for x in err.splitlines() if "preemption notice" in x)
        steps.append(line.split(" at step ")[1].split(" ")[0])
    assert steps[0] == steps[1]
    resumed = _wait(_job(wd))
    for rc, _, err in resumed:
        assert rc == 0, err[-3000:]
    _assert_same_run(two[0], str(wd))
