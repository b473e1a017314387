"""What the XLA:CPU measures in the library buy: train-step time with each one on or off.

    python benchmarks/cpu_step_variants.py [--models resnet20:64:16,resnet56:128:32]
        [--steps 4] [--rounds 2]

Each model is ``name:batch:image_size``. Variants, all the trainer's own
``make_train_step`` (fp32, no penalty, synthetic data):

- ``xla-defaults``: no fusion barrier in the residual blocks, XLA's default
  CPU options (the library before these measures);
- ``barrier``: ``models.common.materialize`` in the blocks, XLA's defaults;
- ``barrier+ynn-off``: the barrier, and no YNNPACK fusions at all;
- ``library``: the barrier and ``xla_cpu.COMPILER_OPTIONS`` (YNNPACK for
  reductions only), i.e. what the library does on the CPU.

Variants alternate within each round, in one process; every variant is
compiled once and warmed up before timing. Prints the median step time of
each over all rounds and its speed-up over ``xla-defaults``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import optax
from harness import train_step_runner

from sap_jax.models import blocks
from sap_jax.runtime import xla_cpu

VARIANTS = ("xla-defaults", "barrier", "barrier+ynn-off", "library")


@contextmanager
def _variant(name: str):
    saved = (blocks.materialize, dict(xla_cpu.COMPILER_OPTIONS),
             os.environ.get("SAP_JAX_XLA_CPU_DEFAULTS"))
    try:
        if name == "xla-defaults":
            blocks.materialize = lambda x, anchor: x
        if name in ("xla-defaults", "barrier"):
            os.environ["SAP_JAX_XLA_CPU_DEFAULTS"] = "1"
        else:
            os.environ.pop("SAP_JAX_XLA_CPU_DEFAULTS", None)
        if name == "barrier+ynn-off":
            xla_cpu.COMPILER_OPTIONS["xla_cpu_experimental_ynn_fusion_type"] = ""
        yield
    finally:
        blocks.materialize = saved[0]
        xla_cpu.COMPILER_OPTIONS.clear()
        xla_cpu.COMPILER_OPTIONS.update(saved[1])
        if saved[2] is None:
            os.environ.pop("SAP_JAX_XLA_CPU_DEFAULTS", None)
        else:
            os.environ["SAP_JAX_XLA_CPU_DEFAULTS"] = saved[2]


def _runner(name: str, batch: int, size: int, variant: str):
    """A warmed-up closure timing one train step of ``name`` under ``variant``."""
    with _variant(variant):  # the step is jitted, traced and compiled here, under the variant
        run = train_step_runner(name, batch, size, optax.sgd(0.1, momentum=0.9))
        run()

    def timed() -> float:
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    timed()  # warm-up
    return timed


def measure(spec: str, steps: int, rounds: int) -> dict:
    name, batch, size = spec.split(":")
    runs = {v: _runner(name, int(batch), int(size), v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, run in runs.items():
            times[v] += [run() for _ in range(steps)]
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"model": name, "batch": int(batch), "image_size": int(size), "median_s": med,
            "speedup": {v: med["xla-defaults"] / med[v] for v in VARIANTS}}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models",
                    default="resnet20:64:16,resnet56:128:32,mobilenet_v2:16:224,resnet50:16:224")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    out = []
    print(f"{'model':<14} {'batch':>5} {'px':>4} " + " ".join(f"{v:>16}" for v in VARIANTS))
    for spec in args.models.split(","):
        r = measure(spec, args.steps, args.rounds)
        out.append(r)
        print(f"{r['model']:<14} {r['batch']:>5} {r['image_size']:>4} "
              + " ".join(f"{r['median_s'][v]:>9.4f}s x{r['speedup'][v]:<4.2f}" for v in VARIANTS))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
