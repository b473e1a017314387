"""What a fresh output buffer costs on this host, with malloc as shipped and with freed memory kept.

    python benchmarks/host_memory.py [--shape 32,56,56,256] [--reps 15]

Times one element-wise XLA:CPU program, ``relu(x + b)`` over a float32 array of ``--shape``
(default: a ResNet-50 stage-1 activation at batch 32, 103 MB), three ways in a fresh process
per malloc mode (``sap_jax.runtime.host_memory``: ``system`` and ``retain``):

* ``fresh output``: each call returns a new array (XLA allocates it; the previous call's array
  is freed as the call returns);
* ``reduce only``: the same arithmetic summed to a scalar (reads the input, writes nothing big);
* ``donated``: the input buffer is donated, so the output reuses it (no allocation).

The gap between ``fresh output`` and ``donated`` is what allocating the buffer costs. Medians
in ms after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def child(mode: str, shape: tuple[int, ...], reps: int) -> dict:
    from sap_jax.runtime import host_memory

    status = host_memory.apply(mode)  # before JAX starts its backend
    import jax
    import jax.numpy as jnp

    from sap_jax.runtime import xla_cpu

    fresh = xla_cpu.jit(lambda x, b: jax.nn.relu(x + b))
    reduce = xla_cpu.jit(lambda x, b: jnp.sum(jax.nn.relu(x + b)))
    donated = xla_cpu.jit(lambda x, b: jax.nn.relu(x + b), donate_argnums=0)
    b = jnp.zeros(shape[-1:], jnp.float32)

    def median_ms(fn, x, chain):
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            y = jax.block_until_ready(fn(x, b))
            if i:
                times.append(time.perf_counter() - t0)
            if chain:
                x = y  # the donated input is gone; the output is the next input
        return 1e3 * statistics.median(times)

    x = jnp.ones(shape, jnp.float32)
    ms = {"fresh output": median_ms(fresh, x, False), "reduce only": median_ms(reduce, x, False)}
    ms["donated"] = median_ms(donated, x, True)
    return {"mode": mode, "status": status, "shape": list(shape), "ms": ms}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="32,56,56,256")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    if a.child:
        print(json.dumps(child(a.child, shape, a.reps)))
        return []
    rows = []
    env = {k: v for k, v in os.environ.items()  # malloc as shipped, JAX on the CPU
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    env["JAX_PLATFORMS"] = "cpu"
    for mode in ("system", "retain"):
        out = subprocess.run([sys.executable, __file__, "--shape", a.shape, "--reps", str(a.reps),
                              "--child", mode], capture_output=True, text=True, check=True,
                             env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 4 * math.prod(shape) / 1e6
    print(f"relu(x + b) over float32 {shape} ({mb:.0f} MB), median ms of {a.reps}")
    print(f"  {'host memory':<12} {'fresh output':>13} {'reduce only':>12} {'donated':>8}")
    for r in rows:
        print(f"  {r['mode']:<12} " + " ".join(f"{r['ms'][k]:>{w}.2f}" for k, w in (
            ("fresh output", 13), ("reduce only", 12), ("donated", 8))) + f"  ({r['status']})")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
