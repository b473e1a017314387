"""The launchers in launch/: shellcheck, dry runs, and real runs against stand-in gcloud/sbatch."""

import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                      check=True).stdout.strip()
TPU_PAIRS = ["--name", "sap-r50", "--zone", "us-central2-b", "--accelerator", "v4-32",
            "--bucket", "gs://bkt/", "--config", "configs/imagenet_r50.py", "--run", "r50",
            "--repo", "https://example.org/sap_jax.git", "--ref", HEAD]
# The fit check compiles ResNet-50 for v4-32 (minutes): tested on the tiny config below.
TPU_ARGS = [*TPU_PAIRS, "--skip-fit-check"]
TINY = "tests/support/tiny_config.py"


def _sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _fake(tmp_path, name, script):
    """A stand-in for a cloud CLI that records its arguments, one shell-quoted line per call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    (bin_dir / name).write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%q " "$@" >> {shlex.quote(str(log))}; echo >> {shlex.quote(str(log))}\n' + script)
    (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env, log


def _calls(log):
    return [shlex.split(line) for line in log.read_text().splitlines() if line.strip()]


def test_launchers_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("SAP_JAX_REQUIRE_SHELLCHECK"):
            pytest.fail("shellcheck is required here (SAP_JAX_REQUIRE_SHELLCHECK) but not "
                        "installed")
        pytest.skip("shellcheck not installed (apt-get install shellcheck); CI installs it")
    p = subprocess.run(["shellcheck", "-x", "launch/tpu_pod.sh", "launch/slurm_gpu.sh",
                        "launch/lib.sh"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def _fake_gcloud(tmp_path, state):
    """A stand-in gcloud whose TPU is in ``state`` (MISSING: none); create/delete/start change it
    as the real service would, and a CREATING slice is READY at the next look."""
    state_file = tmp_path / "tpu_state"
    state_file.write_text(state)
    return _fake(tmp_path, "gcloud", f"""sf={shlex.quote(str(state_file))}
case "$4" in
  describe) s=$(cat "$sf"); [[ $s == MISSING ]] && exit 1
            [[ $s == CREATING ]] && echo READY > "$sf"; echo "$s" ;;
  create) echo CREATING > "$sf" ;;
  delete) echo MISSING > "$sf" ;;
  start) echo READY > "$sf" ;;
esac
exit 0
""")


def _main_of(start_cmd):
    """The sap_jax.main command line inside the detached start command, and the whole command."""
    tokens = shlex.split(start_cmd)
    i = tokens.index("nohup")
    assert tokens[i + 1:i + 3] == ["bash", "-c"]
    lex = shlex.shlex(tokens[i + 3], posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = list(lex)
    return words[:words.index(";")], tokens


def test_tpu_dry_run_prints_create_install_and_the_same_command_on_every_worker(tmp_path):
    env, log = _fake(tmp_path, "gcloud", "exit 0\n")
    p = _sh(TPU, *TPU_ARGS, "--spot", "--dry-run", "--", "--config.budget.p=0.4", "--config.seed=3",
            env=env)
    assert p.returncode == 0, p.stderr
    assert not log.exists()  # a dry run calls nothing
    cmds = [shlex.split(x) for x in p.stdout.splitlines() if x and not x.startswith("#")]
    create, install, run = cmds
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"sap-r50", "--spot", "v4-32", "us-central2-b"} <= set(create)
    for c in (install, run):
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sap-r50"]
        assert "--worker=all" in c
    inner = install[install.index("--command") + 1]
    assert f"git checkout --quiet {HEAD}" in inner and "-c constraints.txt 'jax[tpu]'" in inner
    # The runtime's Python 3.10 is not enough: 3.11 is installed, and the venv checked.
    assert "sys.version_info < (3, 11)" in inner and "apt-get install -y -qq python3.11" in inner
    assert inner.startswith("if [ -f $HOME/sap_jax_logs/r50.pid ] && kill -0")  # live: no install
    main, start = _main_of(run[run.index("--command") + 1])
    assert start[:3] == ["cd", "sap_jax", "&&"] and "already running" in " ".join(start)
    assert main[0] == "TFDS_DATA_DIR=gs://bkt/tensorflow_datasets"
    assert main[1:4] == [".venv/bin/python", "-m", "sap_jax.main"]
    assert main[4:] == ["--config=configs/imagenet_r50.py", "--workdir=gs://bkt/runs/r50",
                        "--config.data_dir=gs://bkt/tensorflow_datasets", "--config.budget.p=0.4",
                        "--config.seed=3"]


def test_tpu_launcher_runs_exactly_what_its_dry_run_prints(tmp_path):
    env, log = _fake_gcloud(tmp_path, "MISSING")  # created, then READY
    env["SAP_JAX_TPU_POLL_S"] = "0"
    dry = _sh(TPU, *TPU_ARGS, "--dry-run", "--", "--config.budget.p=it's", env=env)
    real = _sh(TPU, *TPU_ARGS, "--", "--config.budget.p=it's", env=env)
    assert real.returncode == 0, real.stderr
    printed = [shlex.split(x) for x in dry.stdout.splitlines() if x and not x.startswith("#")]
    calls = _calls(log)
    assert calls[0][3] == "describe"
    assert [c for c in calls if c[3] != "describe"] == [c[1:] for c in printed]


@pytest.mark.parametrize("state, verbs", [
    ("READY", ["describe", "ssh", "ssh"]),
    ("PREEMPTED", ["describe", "delete", "create", "describe", "describe", "ssh", "ssh"]),
    ("TERMINATED", ["describe", "delete", "create", "describe", "describe", "ssh", "ssh"]),
    ("STOPPED", ["describe", "start", "describe", "ssh", "ssh"]),
    ("CREATING", ["describe", "describe", "ssh", "ssh"]),
])
def test_tpu_launcher_brings_the_slice_to_ready_from_every_state(tmp_path, state, verbs):
    env, log = _fake_gcloud(tmp_path, state)
    p = _sh(TPU, *TPU_ARGS, env={**env, "SAP_JAX_TPU_POLL_S": "0"})
    assert p.returncode == 0, p.stderr
    assert [c[3] for c in _calls(log)] == verbs
    assert (tmp_path / "tpu_state").read_text().strip() == "READY"


def test_tpu_launcher_gives_up_on_a_state_it_does_not_know(tmp_path):
    env, _ = _fake_gcloud(tmp_path, "SUSPENDED")
    p = _sh(TPU, *TPU_ARGS, env=env)
    assert p.returncode == 2 and "in state 'SUSPENDED'" in p.stderr


def test_tpu_launcher_reuses_an_existing_slice_and_can_skip_install(tmp_path):
    env, log = _fake_gcloud(tmp_path, "READY")
    p = _sh(TPU, *TPU_ARGS, "--skip-install", env=env)
    assert p.returncode == 0, p.stderr
    assert [c[3] for c in _calls(log)] == ["describe", "ssh"]


def test_the_workers_start_the_run_detached_and_never_twice(tmp_path):
    """The start command the workers get, run here by bash: the first start detaches the run
    (it outlives the ssh session) and a second start while it lives starts nothing."""
    p = _sh(TPU, *TPU_ARGS, "--dry-run")
    run = shlex.split([x for x in p.stdout.splitlines() if x and not x.startswith("#")][-1])
    start = run[run.index("--command") + 1]
    home = tmp_path / "home"
    (home / "sap_jax" / ".venv" / "bin").mkdir(parents=True)
    python = home / "sap_jax" / ".venv" / "bin" / "python"
    python.write_text("#!/usr/bin/env bash\necho \"run $*\"\nsleep 30\n")  # a long run
    python.chmod(0o755)
    env = {**os.environ, "HOME": str(home)}
    # A session of its own, as an ssh login has: the test can then stop everything it started.
    first = subprocess.run(["bash", "-c", start], capture_output=True, text=True, cwd=home, env=env,
                           timeout=30, start_new_session=True)
    second = subprocess.run(["bash", "-c", start], capture_output=True, text=True, cwd=home,
                            env=env, timeout=30)
    pid = int((home / "sap_jax_logs" / "r50.pid").read_text())
    try:
        assert "started r50" in first.stdout and "r50 is already running" in second.stdout
        os.kill(pid, 0)  # still alive after the starting shell ended
        for _ in range(50):  # the log fills as the run writes
            if "sap_jax.main" in (home / "sap_jax_logs" / "r50.log").read_text():
                break
            time.sleep(0.1)
        assert "run -m sap_jax.main --config=configs/imagenet_r50.py" in (
            home / "sap_jax_logs" / "r50.log").read_text()
    finally:
        os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_logs_and_attach_read_worker_0s_log(tmp_path):
    env, log = _fake_gcloud(tmp_path, "READY")
    assert _sh(TPU, *TPU_ARGS, "--logs", env=env).returncode == 0
    assert _sh(TPU, *TPU_ARGS, "--skip-install", "--attach", env=env).returncode == 0
    ssh = [c for c in _calls(log) if c[3] == "ssh"]
    assert "--worker=0" in ssh[0] and ssh[0][-1] == "tail -n 100 $HOME/sap_jax_logs/r50.log"
    assert "--worker=all" in ssh[1] and "--worker=0" in ssh[2]
    assert ssh[2][-1] == "tail -n +1 -F $HOME/sap_jax_logs/r50.log"


def _clone_with_launcher(tmp_path):
    """A small git repository holding the launchers and one committed config."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "configs").mkdir()
    for f in ("tpu_pod.sh", "lib.sh"):
        shutil.copy(os.path.join(ROOT, "launch", f), repo / "launch" / f)
    shutil.copy(os.path.join(ROOT, "configs", "quickstart.py"), repo / "configs" / "quickstart.py")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],  # noqa: E731
                                    cwd=repo, check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    return repo, git


def test_tpu_launcher_refuses_what_the_workers_cannot_have(tmp_path):
    repo, git = _clone_with_launcher(tmp_path)
    args = ["--name", "n", "--zone", "z", "--bucket", "gs://b", "--run", "r", "--dry-run"]
    script = str(repo / "launch" / "tpu_pod.sh")
    ok = _sh(script, *args, "--config", "configs/quickstart.py", "--repo", "https://x.org/r.git")
    assert ok.returncode == 0, ok.stderr
    git("remote", "add", "origin", str(tmp_path / "elsewhere"))  # a path on this machine
    p = _sh(script, *args, "--config", "configs/quickstart.py")
    assert p.returncode == 2 and "local path the workers cannot reach" in p.stderr
    shutil.copy(repo / "configs" / "quickstart.py", repo / "configs" / "my_local.py")
    p = _sh(script, *args, "--config", "configs/my_local.py", "--repo", "https://x.org/r.git")
    assert p.returncode == 2 and "is not in commit" in p.stderr
    with open(repo / "configs" / "quickstart.py", "a") as f:
        f.write("# edited, not committed\n")
    p = _sh(script, *args, "--config", "configs/quickstart.py", "--repo", "git@host:r.git")
    assert p.returncode == 2 and "differs from commit" in p.stderr


def _tpu_args(changes):
    """TPU_PAIRS with the options in ``changes`` replaced."""
    base = {**dict(zip(TPU_PAIRS[::2], TPU_PAIRS[1::2])), **changes}
    return [x for kv in base.items() for x in kv]


@pytest.mark.parametrize("args, message", [
    (["--bucket", "/local/dir"], "must be a gs:// path"),
    (["--config", "configs/nope.py"], "not found"),
    (["--oops"], "unknown option"),
])
def test_tpu_launcher_bad_input(args, message):
    flat = _tpu_args(dict(zip(args[::2], args[1::2]))) + ([args[0]] if len(args) == 1 else [])
    p = _sh(TPU, *flat, "--skip-fit-check", "--dry-run")
    assert p.returncode == 2 and message in p.stderr


def _fit_args():
    return _tpu_args({"--accelerator": "v4-8", "--config": TINY})


@pytest.mark.slow
def test_tpu_launcher_checks_the_fit_before_creating_a_slice(tmp_path):
    """--dry-run compiles the run for the accelerator type here first (sap_jax.aot), then prints
    the commands; a run that does not fit is refused and nothing is created."""
    env, log = _fake_gcloud(tmp_path, "MISSING")
    env["SAP_JAX_TPU_POLL_S"] = "0"
    p = _sh(TPU, *_fit_args(), "--dry-run", env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "img/s/chip" in p.stderr and "# fit check: the run fits on v4-8" in p.stdout
    assert any(x.startswith("gcloud compute tpus tpu-vm create") for x in p.stdout.splitlines())
    p = _sh(TPU, *_fit_args(), "--", "--config.eval_batch_size=33554432", "--config.seed=1",
            env=env, timeout=600)
    assert p.returncode == 2
    assert "does not fit: step 'eval' needs" in p.stderr
    assert "the run does not fit on v4-8" in p.stderr.strip().splitlines()[-1]
    assert not log.exists()  # not even a look at the slice


SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "4", "--config", "configs/imagenet_r101.py",
              "--workdir", "/shared/runs/r101", "--data-dir", "/shared/tfds", "--partition", "gpu"]


def _script(stdout):
    lines = stdout.splitlines()
    start = lines.index("#!/usr/bin/env bash")
    end = lines.index("# submit with:")
    return "\n".join(lines[start:end]) + "\n"


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
    p = _sh(SLURM, *SLURM_ARGS, "--dry-run", "--", "--config.budget.p=0.45")
    assert p.returncode == 0, p.stderr
    s = _script(p.stdout)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "export TFDS_DATA_DIR=/shared/tfds"):
        assert line in s.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS" not in s
    assert "#SBATCH --signal=TERM@300" in s.splitlines()  # SIGTERM 5 minutes before the limit
    srun = shlex.split(next(line for line in s.splitlines() if line.startswith("srun ")))
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert srun[3:] == ["-m", "sap_jax.main", "--config=configs/imagenet_r101.py",
                        "--workdir=/shared/runs/r101", "--config.data_dir=/shared/tfds",
                        "--config.budget.p=0.45"]
    assert "8 processes, 8 GPUs" in p.stdout
    # The generated batch script is itself valid bash.
    (tmp_path / "job.sbatch").write_text(s)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


@pytest.mark.parametrize("rc, marker, requeued", [(75, True, True), (143, True, True),
                                                 (0, False, False), (1, False, False)])
def test_slurm_job_requeues_itself_when_the_run_saved_on_sigterm(tmp_path, rc, marker, requeued):
    """The batch script, run by bash with stand-in srun and scontrol: a run that saved a
    checkpoint on Slurm's SIGTERM (exit 75 and WORKDIR/PREEMPTED; srun may report 143 when it
    stops the sibling tasks) is requeued and the marker cleared; others are not."""
    wd = tmp_path / "wd"
    wd.mkdir()
    args = [str(wd) if a == "/shared/runs/r101" else a for a in SLURM_ARGS]
    p = _sh(SLURM, *args, "--dry-run")
    (tmp_path / "job.sbatch").write_text(_script(p.stdout))
    touch = f"touch {shlex.quote(str(wd / 'PREEMPTED'))}\n" if marker else ""
    env, srun_log = _fake(tmp_path, "srun", f"{touch}exit {rc}\n")
    _, scontrol_log = _fake(tmp_path, "scontrol", "")
    job = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                         env={**env, "SLURM_JOB_ID": "4242"}, cwd=tmp_path, timeout=60)
    assert job.returncode == rc, job.stderr
    assert len(_calls(srun_log)) == 1
    calls = _calls(scontrol_log) if scontrol_log.exists() else []
    assert calls == ([["requeue", "4242"]] if requeued else [])
    assert not (wd / "PREEMPTED").exists() or not requeued


def test_slurm_without_a_data_dir_and_without_a_venv(tmp_path):
    args = [a for a in SLURM_ARGS if a not in ("--data-dir", "/shared/tfds")]
    s = _script(_sh(SLURM, *args, "--dry-run").stdout)
    assert "TFDS_DATA_DIR" not in s and "data_dir" not in s  # digits and mnist5k need none
    env, log = _fake(tmp_path, "sbatch", "")
    p = _sh(SLURM, *args, "--venv", str(tmp_path / "novenv"), env=env)
    assert p.returncode == 2 and f"no virtual environment at {tmp_path / 'novenv'}" in p.stderr
    assert not log.exists()  # nothing submitted


def test_help_prints_the_header_and_options_only():
    for script in (TPU, SLURM):
        p = _sh(script, "--help")
        assert p.returncode == 0 and "Options:" in p.stdout
        assert "set -euo pipefail" not in p.stdout and "#!" not in p.stdout


def test_slurm_one_process_per_node_sees_all_its_gpus():
    p = _sh(SLURM, *SLURM_ARGS, "--per", "node", "--dry-run")
    s = _script(p.stdout).splitlines()
    assert "#SBATCH --ntasks-per-node=1" in s and "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in s
    assert "#SBATCH --cpus-per-task=48" in s


def test_slurm_launcher_submits_the_script_its_dry_run_prints(tmp_path):
    env, log = _fake(tmp_path, "sbatch", "echo Submitted batch job 1\n")
    workdir = tmp_path / "runs" / "r101"
    args = [a if a != "/shared/runs/r101" else str(workdir) for a in SLURM_ARGS]
    dry = _sh(SLURM, *args, "--dry-run", env=env)
    real = _sh(SLURM, *args, env=env)
    assert real.returncode == 0, real.stderr
    assert _calls(log) == [[str(workdir / "sap_jax.sbatch")]]
    assert (workdir / "sap_jax.sbatch").read_text() == _script(dry.stdout)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be a positive integer"),
    (["--per", "socket"], "--per must be 'gpu' or 'node'"),
    (["--workdir", ""], "--workdir needs a value"),
    (["--time", "two days"], "--time must be a Slurm time limit"),
    (["--time", "4"], "--signal-lead 300 s must be shorter than --time 4"),
    (["--time", "0-00:04:59"], "must be shorter than --time 0-00:04:59"),
    (["--partition", "gpu\n#SBATCH --exclusive"], "--partition must be a Slurm name"),
])
def test_slurm_launcher_bad_input(args, message):
    base = dict(zip(SLURM_ARGS[::2], SLURM_ARGS[1::2]))
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for kv in base.items() for x in kv]
    p = _sh(SLURM, *flat, "--dry-run")
    assert p.returncode == 2 and message in p.stderr
