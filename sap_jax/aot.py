"""Compile a run for a TPU slice on this CPU host: will it fit, and how fast would it be?

    python -m sap_jax.aot --config=configs/NAME.py --topology=v5e:2x4 [--config.FIELD=VALUE ...]
        [--steps=plain,sap,agn,eval,finetune,finetune_r128] [--out=PATH.json]

No TPU is needed, only the TPU compiler (``pip install -c constraints.txt -e '.[tpu]'``). Every
step the run would compile is compiled for the slice with the run's mesh, shardings, global
batch and dtype (``sap_jax.train.aot``); ``--topology`` is ``GENERATION:SHAPE`` (v4:2x2x1,
v5e:2x4, v5p:2x2x2, v6e:4x4) or a Cloud accelerator type (v4-8, v5litepod-8, v6e-16).

It prints a table, then, as the last line of stdout, one JSON object: ``topology``, ``chips``,
``hbm_capacity_bytes`` (per chip), ``fits``, ``steps`` ({name: ``estimated_s``,
``images_per_s`` (per chip), ``hbm_bytes`` (peak per chip), ``collectives`` {op: count},
``compile_s``, and the raw figures}), ``sap_over_plain`` and ``pruned_speedup_estimated``.
Times are compiler estimates (a per-op roofline plus ring all-reduce time), not measurements.

Exit codes: 0 fits; 2 a step does not fit in HBM (one line on stderr says how much it needs per
chip and what to change), an unknown topology, libtpu missing, a bad config, or the TPU compiler
crashing (a signal inside libtpu: the compiles run in a child process, so the line names the
step it crashed on and the libtpu version).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

# A compile-only TPU process: before JAX loads any plugin. The host's own accelerators stay
# untouched (a launcher may run this beside a job on a TPU VM).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sap_jax import cli  # noqa: E402
from sap_jax.runtime import errors, tpu  # noqa: E402 - no JAX import behind tpu
from sap_jax.runtime.tpu import GiB  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice: GENERATION:SHAPE (v5e:2x4) or an accelerator "
                    "type (v4-8).")
flags.DEFINE_list("steps", None, "Steps to compile (default: all): plain, sap, agn, eval, "
                  "finetune, finetune_r128.")
flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.mark_flags_as_required(["config", "topology"])


def table(result: dict) -> str:
    """The result as a table a person reads."""
    lines = [f"{result['topology']}: {result['chips']} chips, {result['hosts']} host(s), "
             f"{result['hbm_capacity_bytes'] / GiB:.1f} GiB HBM per chip (compiler estimates, "
             "not measurements)",
             f"{'step':<14}{'compile s':>10}{'est. ms':>10}{'img/s/chip':>12}{'HBM GiB':>9}"
             "  collectives"]
    for name, r in result["steps"].items():
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        est = f"{r['estimated_s'] * 1e3:.2f}" if r["estimated_s"] else "-"
        coll = ", ".join(f"{n} {op}" for op, n in r["collectives"].items()) or "none"
        if "refused" in r:
            coll = "does not fit: the compiler ran out of HBM"
        hbm = f"{r['hbm_bytes'] / GiB:.2f}" if r["hbm_bytes"] else "?"
        lines.append(f"{name:<14}{r['compile_s']:>10.1f}{est:>10}{ips:>12}{hbm:>9}  {coll}")
    if "sap_over_plain" in result:
        lines.append(f"SAP's weight step over the plain one: {result['sap_over_plain']:.3f}x")
    for k, v in result.get("pruned_speedup_estimated", {}).items():
        ratio = result["pruned_macs_ratio"][k]
        lines.append(f"pruned ({k}, {ratio:.2f} of the prunable MACs) train step speed-up over "
                     f"dense: {v:.2f}x")
    return "\n".join(lines)


def advice(result: dict) -> str:
    """One line: how much the largest step needs per chip, and what to change."""
    steps = result["steps"]
    refused = [k for k, r in steps.items() if "refused" in r]
    worst = refused[0] if refused else max(steps, key=lambda k: steps[k]["hbm_bytes"] or 0)
    cap = result["hbm_capacity_bytes"] / GiB
    need = steps[worst]["hbm_bytes"]
    amount = f"at least {need / GiB:.2f} GiB" if need else f"more than {cap:.1f} GiB"
    return (f"does not fit: step {worst!r} needs {amount} per chip, {result['topology']} "
            f"has {cap:.1f} GiB; lower --config.batch_size (or eval_batch_size), use "
            "--config.dtype=bfloat16, or choose a slice with more chips or more HBM per chip")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sap_jax.runtime import console, tpu

    console.setup_terminal(FLAGS.verbosity)
    try:
        # libtpu's start-up complaints about a host that is not a TPU VM, TensorFlow's banners.
        with console.quiet_stderr() if FLAGS.verbosity <= 0 else contextlib.nullcontext():
            topo = tpu.topology(FLAGS.topology)
            from sap_jax.train import aot
            from sap_jax.train import config as config_lib
            from sap_jax.train import spec as spec_lib

        config_lib.validate(FLAGS.config, device_count=topo.chips, process_count=topo.hosts)
        spec = spec_lib.from_config(FLAGS.config)
        report = aot.compile_steps(spec, topo, names=FLAGS.steps or aot.STEPS,
                                   log=lambda s: print(s, file=sys.stderr, flush=True))
    except errors.ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_BAD_INPUT)
    result = aot.summary(topo, report)
    print(table(result))
    line = json.dumps(result)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    if not result["fits"]:
        print(f"error: {advice(result)}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_BAD_INPUT)


#: Set in the child process that compiles (see :func:`supervise`).
COMPILER_PROCESS = "SAP_JAX_AOT_COMPILER_PROCESS"
_COMPILING = re.compile(r"^(\w+): compiling")


def libtpu() -> tuple[str, str | None]:
    """What to call the libtpu in use, and the installed package's version (None when absent,
    or when ``TPU_LIBRARY_PATH`` loads another file than the package's)."""
    from importlib import metadata

    try:
        version = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        version = None
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path:
        return f"libtpu from TPU_LIBRARY_PATH={path}", None
    return f"libtpu {version}" if version else "libtpu", version


#: Signals that mean the compiler itself failed (not the host or the user stopping it).
CRASHES = {"SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"}


def crash_line(sig: str, step: str | None, topology: str) -> str:
    """What to say when the TPU compiler died with signal ``sig`` compiling ``step``."""
    what = f"the {step} step" if step else "the run's steps"
    library, version = libtpu()
    if sig == "SIGKILL":
        return (f"compiling {what} for {topology} was killed (SIGKILL), most likely by the "
                "host's out-of-memory killer: compile on a host with more memory, or fewer "
                "steps at a time (--steps).")
    line = (f"the TPU compiler crashed ({sig}) compiling {what} for {topology} ({library}); "
            "this is a compiler bug, not a problem of the config.")
    try:
        generation = tpu.parse_name(topology)[0].generation
    except errors.ConfigError:
        generation = None
    if generation == "v6e" and version is not None and version.startswith("0.0.42"):
        line += (" libtpu 0.0.42 crashes on every v6e training step of a network with "
                 "batch-statistics BN before a downsampling block when the batch is sharded "
                 "(docs/scaling.md; benchmarks/libtpu_v6e_repro.py); libtpu 0.0.52 compiles "
                 "them but needs a newer jaxlib than the one pinned. Estimate on v5e "
                 "(--topology=v5e:...) meanwhile.")
    else:
        line += " Another libtpu (TPU_LIBRARY_PATH=.../libtpu.so) may compile it."
    return line


def _topology_arg(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a.startswith("--topology="):
            return a.split("=", 1)[1]
        if a == "--topology" and i + 1 < len(args):
            return args[i + 1]
    return None


def supervise(args: list[str], command: list[str] | None = None) -> int:
    """Run ``python -m sap_jax.aot ARGS`` (or ``command``) in a child process and pass its
    output on. libtpu can crash (a signal: no Python exception, no message); the crash then
    ends in one line naming the step being compiled and exit code 2, like every other
    refusal. Ctrl-C and SIGTERM reach the child too; the exit code is then 128 + the signal."""
    env = {**os.environ, COMPILER_PROCESS: "1"}
    child = subprocess.Popen(command or [sys.executable, "-m", "sap_jax.aot", *args], env=env,
                             stderr=subprocess.PIPE, text=True, errors="replace")
    stopped: list[int] = []

    def forward(signum, _frame):  # a launcher's or timeout's SIGTERM to this process alone
        stopped.append(signum)
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    step, dying = None, False
    try:
        for line in child.stderr:
            # A crash's fault-handler dump (Python's stacks, dozens of lines) says nothing more
            # than the line below.
            dying = dying or line.startswith("Fatal Python error")
            if not dying:
                sys.stderr.write(line)
                sys.stderr.flush()
            if m := _COMPILING.match(line):
                step = m[1]
        rc = child.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to both; wait for the child to stop
        stopped.append(signal.SIGINT)
        child.send_signal(signal.SIGINT)
        rc = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        return 128 + int(stopped[0])
    if rc >= 0:
        return rc
    try:
        sig = signal.Signals(-rc).name
    except ValueError:
        sig = f"signal {-rc}"
    if sig in ("SIGINT", "SIGTERM"):  # stopped from outside, not crashed
        return 128 - rc
    if sig not in CRASHES and sig != "SIGKILL":
        print(f"error: compiling stopped with {sig}.", file=sys.stderr, flush=True)
        return errors.EXIT_BAD_INPUT
    topology = _topology_arg(args)
    print(f"error: {crash_line(sig, step, topology or 'the slice')}", file=sys.stderr,
          flush=True)
    return errors.EXIT_BAD_INPUT


def run() -> None:
    if os.environ.get(COMPILER_PROCESS) != "1":
        sys.exit(supervise(sys.argv[1:]))
    rest = cli.parse_or_exit(sys.argv)
    app.run(main, flags_parser=lambda _argv: rest)


if __name__ == "__main__":
    run()
