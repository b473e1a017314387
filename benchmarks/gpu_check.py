"""Issue 29's accelerator figures in one call: for the few minutes of a lent GPU.

    python benchmarks/gpu_check.py --out DIR [--parts speedup,latency,mobilenet] [--budget-s 540]
        [--quick]

Each part runs as its own process under a timeout, so a part that fails or hangs costs only its
own share of the budget. Its output is printed as it comes and kept in ``DIR/PART.log``, its rows
in ``DIR/PART.json``; ``DIR/summary.json`` holds the software and device, every part's exit
status and seconds, and the issue's verdicts, which are printed at the end:

- ``speedup``: ResNet-50 at p = 0.37 (``pruned_speedup.py``, bf16, batch 256, widths uniform and
  rounded to 8, BN folded too). Targets: throughput efficiency >= 0.8 rounded to 8, and
  no speed-up below 1.
- ``latency``: a latency table of ResNet-50 on this device (bf16, batch 256, the forward only, 5
  grid points and 5 repetitions: minutes, not the defaults' tens of minutes), then its
  latency-budgeted cut at p = 0.5 timed (``latency_budget.py``). Target: a measured latency
  ratio within 0.05 of 0.5.
- ``mobilenet``: MobileNetV2 at p = 0.65 (bf16, batch 256, uniform and rounded to 8).
  Target: no speed-up below 1.

``--quick`` runs the same parts on the tiny CIFAR model at batch 4 with one repetition: a check
of this script, not a measurement. The parts run in the order given, most wanted first; a part
gets what is left of ``--budget-s`` (at most its own default share).

docs/benchmarks.md ("On a GPU: issue 29's figures in one call") gives the wheels a bare GPU
image needs. The exit status is 1 when a part failed, timed out or was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: name -> (script, its arguments, the JSON rows' model, seconds it may take at most)
PARTS: dict[str, tuple[str, list[str], str, int]] = {
    "speedup": ("pruned_speedup.py", ["--models", "resnet50", "--dtype", "bfloat16", "--batch",
                                      "256", "--round-to", "8", "--reps", "10", "--fold_bn"],
                "resnet50", 240),
    "latency": ("latency_budget.py", ["--model", "resnet50", "--p", "0.5", "--dtype", "bfloat16",
                                      "--batch", "256", "--points", "5", "--reps", "5",
                                      "--no-train"],
                "resnet50", 300),
    "mobilenet": ("pruned_speedup.py", ["--models", "mobilenet_v2", "--dtype", "bfloat16",
                                        "--batch", "256", "--round-to", "8", "--reps", "10"],
                  "mobilenet_v2", 150),
}
QUICK = {"speedup": ["--models", "resnet_cifar_tiny", "--dtype", "bfloat16", "--batch", "4",
                     "--round-to", "8", "--reps", "1", "--fold_bn"],
         "latency": ["--model", "resnet_cifar_tiny", "--p", "0.8", "--dtype", "bfloat16",
                     "--batch", "4", "--points", "2", "--reps", "1", "--no-train"],
         "mobilenet": ["--models", "resnet_cifar_tiny", "--batch", "4", "--round-to", "2",
                       "--reps", "1"]}
EFFICIENCY_TARGET = 0.8   # ResNet-50, rounded to 8, batch 256, bf16 (issue 29, item 6)
LATENCY_TOLERANCE = 0.05  # a latency-budgeted cut's measured ratio within this of p


def _child_env() -> dict:
    """This environment, with the repository on the path (sap_jax need not be installed) and
    the children's output unbuffered."""
    path = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH", "")) if x)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def environment() -> dict:
    """The software and device the figures come from (in a child, so this process never takes
    the accelerator the parts need)."""
    code = ("import json, jax, flax, optax; d = jax.devices()[0]; print(json.dumps({"
            "'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__, "
            "'backend': d.platform, 'device_kind': d.device_kind, "
            "'devices': jax.device_count()}))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, env=_child_env(), timeout=120)
        info = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                {"error": r.stderr.strip().splitlines()[-1:] or ["no output"]})
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:  # the parts still run
        info = {"error": [f"{type(e).__name__}: {e}"]}
    return {**info, "python": platform.python_version(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def run_part(name: str, args: list[str], out: str, seconds: float) -> dict:
    """Run one part's script for at most ``seconds``, echoing and logging its output."""
    script = PARTS[name][0]
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--json",
           os.path.join(out, f"{name}.json")]
    print(f"== {name}: {' '.join(cmd[1:])} (at most {seconds:.0f} s)", flush=True)
    t0 = time.perf_counter()
    env = _child_env()
    log_path = os.path.join(out, f"{name}.log")
    timed_out = False
    # The child writes its log itself; this process echoes it as it grows, and can stop a child
    # that hangs silently.
    with open(log_path, "w") as log, open(log_path) as echo:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=env)
        while proc.poll() is None:
            print(echo.read(), end="", flush=True)
            if time.perf_counter() - t0 > seconds:
                timed_out = True
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
        print(echo.read(), end="", flush=True)
    status = {"returncode": proc.returncode, "timed_out": timed_out,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(f"== {name}: {'TIMED OUT' if timed_out else f'exit {proc.returncode}'} after "
          f"{status['seconds']} s", flush=True)
    return status


def verdicts(name: str, rows, p_latency: float) -> list[str]:
    """The issue's targets, judged from one part's JSON rows."""
    out = []
    if name in ("speedup", "mobilenet"):
        for r in rows:
            for key in ("latency", "throughput"):
                x, (lo, hi) = r[f"{key}_speedup"], r[f"{key}_speedup_iqr"]
                if x < 1:
                    out.append(f"{r['model']} {r['variant']}: {key} speed-up {x:.3f}x "
                               f"(IQR {lo:.2f}-{hi:.2f}) is BELOW 1")
        if name == "speedup":
            for r in rows:
                if r["variant"] == "rounded to 8":
                    eff = r["throughput_efficiency"]
                    met = "meets" if eff >= EFFICIENCY_TARGET else "MISSES"
                    out.append(f"{r['model']} rounded to 8: batch {r['batch']} throughput "
                               f"efficiency {eff:.2f} ({met} >= {EFFICIENCY_TARGET})")
        if not any("BELOW" in v for v in out):
            out.append(f"{name}: every speed-up is at least 1")
    elif name == "latency":
        for r in rows["rows"]:
            if r["cut"].startswith("latency"):
                m = r["measured_ratio"]
                ok = abs(m - p_latency) <= LATENCY_TOLERANCE
                out.append(f"{rows['model']} {r['cut']}: measured latency ratio {m:.3f} for "
                           f"p = {p_latency} (estimated {r['estimated_ratio']:.3f}): "
                           f"{'within' if ok else 'OUTSIDE'} +-{LATENCY_TOLERANCE}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a folder for the logs, rows and summary")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated, in the order to run: {', '.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="seconds for all the parts together")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny model, one repetition: checks this script, measures nothing")
    a = ap.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    summary = {"environment": environment(), "quick": a.quick, "parts": {}, "verdicts": []}
    print(f"environment: {json.dumps(summary['environment'])}", flush=True)
    for name in parts:
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 20:
            summary["parts"][name] = {"skipped": f"{left:.0f} s of the budget left"}
            print(f"== {name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        args = QUICK[name] if a.quick else PARTS[name][1]
        status = run_part(name, args, a.out, min(left, PARTS[name][3]))
        path = os.path.join(a.out, f"{name}.json")
        if status["returncode"] == 0 and os.path.exists(path):
            with open(path) as f:
                rows = json.load(f)
            p = float(args[args.index("--p") + 1]) if "--p" in args else 0.0
            status["verdicts"] = verdicts(name, rows, p)
            summary["verdicts"] += status["verdicts"]
        summary["parts"][name] = status
        with open(os.path.join(a.out, "summary.json"), "w") as f:  # kept after every part
            json.dump(summary, f, indent=1)
    print("verdicts" + (" (--quick: a check of the script, not a measurement)" if a.quick
                        else "") + ":")
    for v in summary["verdicts"]:
        print(f"  {v}")
    failed = [n for n, s in summary["parts"].items()
              if s.get("returncode") not in (0, None) or s.get("timed_out") or "skipped" in s]
    if failed:
        print(f"  parts that failed, timed out or were skipped: {', '.join(failed)} (their logs: "
              f"{a.out}; --parts {','.join(failed)} runs them again)")
    summary["incomplete"] = failed
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["incomplete"] else 0)
