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
in ms of ``--reps`` interleaved rounds after a warm-up (``speed.time_interleaved``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys


def child(mode: str, shape: tuple[int, ...], reps: int) -> dict:
    from sap_jax.runtime import host_memory

    status = host_memory.apply(mode)  # before JAX starts its backend
    import jax
    import jax.numpy as jnp

    from sap_jax.runtime import speed, xla_cpu

    fresh = xla_cpu.jit(lambda x, b: jax.nn.relu(x + b))
    reduce = xla_cpu.jit(lambda x, b: jnp.sum(jax.nn.relu(x + b)))
    donated = xla_cpu.jit(lambda x, b: jax.nn.relu(x + b), donate_argnums=0)
    x, b = jnp.ones(shape, jnp.float32), jnp.zeros(shape[-1:], jnp.float32)
    chain = [jnp.ones(shape, jnp.float32)]  # donated: each output is the next call's input

    def donate():
        chain[0] = donated(chain[0], b)
        return chain[0]

    times = speed.time_interleaved([lambda: fresh(x, b), lambda: reduce(x, b), donate], reps)
    ms = {k: 1e3 * statistics.median(t)
          for k, t in zip(("fresh output", "reduce only", "donated"), times)}
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
