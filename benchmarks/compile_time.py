"""First-call latency of each jitted function, cold and with the compilation cache (a benchmark).

    python benchmarks/compile_time.py [--model resnet50] [--batch 8] [--image-size 224]

Runs the trainer's jitted functions (the plain / fine-tune step, the SAP
weight step, the AGN step, the evaluation step and the channel-norm monitor)
twice, each time in a fresh process, with one persistent compilation cache
(``sap_jax.runtime.parallel.compilation_cache``, what every run uses):

* cold:  an empty cache, so every function is traced, lowered and compiled;
* warm:  the cache the cold process filled, as a resumed or repeated run sees it.

For each function it prints the first call (compile and one execution), the
second call (execution alone) and whether the program came from the cache,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def worker(model: str, batch: int, image_size: int, cache_dir: str) -> dict:
    """Time the first and second call of each function, in this process, with ``cache_dir``."""
    import jax
    import jax.numpy as jnp
    from step_cost import Steps

    from sap_jax import models, train
    from sap_jax.runtime import parallel
    from sap_jax.structure.codec import ModuleCodec

    with parallel.compilation_cache(cache_dir) as stats:
        steps = Steps(model, image_size, batch, "float32")  # plain, SAP and AGN, state carried
        shape = models.create(model)  # the same class and widths as the steps': codec and groups
        codec, structure = ModuleCodec(shape), shape.structure(image_size)
        ev = train.make_eval_step(codec, structure=structure)
        norms = train.make_norms(structure, include_bn=False)
        eval_batch = {**steps.batch, "mask": jnp.ones(batch, bool)}
        calls = {name: (lambda name=name: steps.call(name)) for name in ("plain", "sap", "agn")}
        calls["eval"] = lambda: ev(*steps.frozen, eval_batch, steps.arch)
        calls["norms"] = lambda: norms(steps.frozen[0], steps.arch)
        out = {}
        for name, call in calls.items():
            loaded = stats.loaded
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - t0)
            out[name] = {"first_s": times[0], "second_s": times[1],
                         "from_cache": stats.loaded > loaded}
    return {"functions": out, "cache": stats.as_dict()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # cache dir: run one process
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.batch, args.image_size, args.worker)))
        return {}
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", args.model,
                                "--batch", str(args.batch), "--image-size", str(args.image_size),
                                "--worker", cache], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{label} process failed:\n{p.stderr[-3000:]}")
            runs[label] = json.loads(p.stdout.strip().splitlines()[-1])
    cold, warm = runs["cold"]["functions"], runs["warm"]["functions"]
    print(f"{args.model}, batch {args.batch}, {args.image_size}px: first call (compile + run) "
          "in a fresh process, cold cache vs warm")
    print(f"  {'function':<8} {'cold s':>8} {'warm s':>8} {'from cache':>11} {'2nd call s':>11}")
    for k in cold:
        print(f"  {k:<8} {cold[k]['first_s']:>8.2f} {warm[k]['first_s']:>8.2f} "
              f"{str(warm[k]['from_cache']):>11} {cold[k]['second_s']:>11.3f}")
    total = {lbl: sum(f["first_s"] for f in runs[lbl]["functions"].values()) for lbl in runs}
    print(f"  total    {total['cold']:>8.2f} {total['warm']:>8.2f}")
    r = {"model": args.model, "batch": args.batch, "image_size": args.image_size, **runs,
         "total_first_s": total}
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
