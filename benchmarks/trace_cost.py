"""What tracing a model's channel groups costs (a benchmark, not a test).

    python benchmarks/trace_cost.py [--models resnet50 mobilenet_v2] [--image-size 224] [--rounds 3]

For each model (a built-in preset, or a factory ``package.module:function`` built abstractly),
times on the host:

1. ``structure``: ``sap_jax.tracing.structure`` from scratch (the jaxpr traced in eval mode,
   the channel analysis, the groups and layers built), the cost a run pays once per model shape;
2. ``gated trace``: tracing a jitted train-mode forward through ``tracing.gated_call`` (the
   model's jaxpr, its labels and the interpreter), paid once per compiled step, next to
   ``plain trace``, the same forward called directly (what a built-in model pays);

each with the tracer's caches cleared, median of ``--rounds``; plus the jaxpr's size. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sap_jax import models, tracing
from sap_jax.tracing import capture


def _timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        capture._program_cached.cache_clear()  # noqa: SLF001 - measure the uncached cost
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, image_size: int, rounds: int) -> dict:
    model = (models.create_abstract(name, image_size=image_size) if models.is_factory_path(name)
             else models.create_abstract(name))
    net = model.net if isinstance(model, models.TracedModel) else model
    ignore = () if isinstance(model, models.TracedModel) else model.trace_ignore()
    sample = (1, image_size, image_size, 3)
    s = tracing.structure(net, sample, ignore=ignore)
    t_structure = _timed(lambda: tracing.structure(net, sample, ignore=ignore), rounds)
    graphdef, state = nnx.split(net)
    x = jax.ShapeDtypeStruct((8, image_size, image_size, 3), jnp.float32)
    arch = [jax.ShapeDtypeStruct((w,), jnp.float32) for w in s.widths]

    def make_gated():  # a new function each round: jit caches traces per function
        def gated(state, x, arch):
            m = nnx.merge(graphdef, state)
            m.train()
            return tracing.gated_call(m, x, arch, s)
        return gated

    def plain(state, x):
        m = nnx.merge(graphdef, state)
        m.train()
        return m(x)

    t_gated = _timed(lambda: jax.jit(make_gated()).trace(state, x, arch), rounds)
    t_plain = _timed(lambda: jax.jit(lambda st, x: plain(st, x)).trace(state, x), rounds)
    prog, _ = capture.program(net, np.zeros(sample, np.float32), "eval", ignore)
    return {"model": name, "image_size": image_size, "groups": s.num_groups,
            "jaxpr_eqns": len(prog.closed.jaxpr.eqns), "structure_s": t_structure,
            "gated_program_s": t_gated, "plain_program_s": t_plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rows = [measure(m, a.image_size, a.rounds) for m in a.models]
    print(f"{'model':<16}{'px':>5}{'groups':>8}{'eqns':>7}{'structure':>12}{'gated trace':>13}"
          f"{'plain trace':>13}")
    for r in rows:
        print(f"{r['model']:<16}{r['image_size']:>5}{r['groups']:>8}{r['jaxpr_eqns']:>7}"
              f"{r['structure_s']:>11.2f}s{r['gated_program_s']:>12.2f}s{r['plain_program_s']:>12.2f}s")
    print(json.dumps({"trace_cost": rows, "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
