"""How much the partial group lasso adds to a training step (a benchmark, not a test).

    python benchmarks/penalty_overhead.py [--model resnet50] [--batch 32] [--image-size 224]
        [--steps 6]

Times one jitted SGD train step (forward, backward, update, BN statistics) of
the dense model with and without ``gamma * partial_group_lasso`` in the loss
(gradient form), and with the proximal form chained after SGD. Steps are
interleaved so that drift in machine load hits every variant alike; the
medians and the minima are compared. It also times the penalty's value-and-gradient alone.
Prints one line per variant and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sap_jax import models
from sap_jax.method import penalty


def make_step(model, structure, variant: str, gamma: float = 5e-4, lr: float = 0.1):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(lr, momentum=0.9)
    if variant == "proximal":
        tx = optax.chain(tx, penalty.proximal_partial_group_lasso(structure, lr * gamma))

    def step(params, rest, opt_state, x, y, arch):
        m = nnx.merge(graphdef, params, rest)

        def loss_fn(m):
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            if variant == "gradient":
                loss = loss + gamma * penalty.partial_group_lasso(
                    nnx.state(m, nnx.Param), arch, structure)
            return loss

        loss, grads = nnx.value_and_grad(loss_fn)(m)
        extra = {"arch": arch} if variant == "proximal" else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return (optax.apply_updates(params, updates), nnx.state(m, nnx.Not(nnx.Param)),
                opt_state, loss)

    return jax.jit(step, donate_argnums=(0, 1, 2)), params, rest, tx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)),
                    jnp.float32)
    y = jnp.asarray(
        rng.integers(0, 1000, args.batch) % models.create_abstract(args.model).num_classes)
    variants = ["plain", "gradient", "proximal"]
    runs = {}
    for v in variants:
        model = models.create(args.model)
        s = model.structure(args.image_size)
        arch = [jnp.asarray(rng.random(w) < 0.5, jnp.float32) for w in model.widths]
        step, params, rest, tx = make_step(model, s, v)
        state = [params, rest, tx.init(params)]
        t0 = time.perf_counter()
        out = step(*state, x, y, arch)  # compile + first step
        jax.block_until_ready(out)
        state = list(out[:3])
        runs[v] = dict(step=step, state=state, arch=arch, compile_s=time.perf_counter() - t0,
                       times=[])

    for _ in range(args.steps):  # interleave the variants
        for v in variants:
            r = runs[v]
            t0 = time.perf_counter()
            out = r["step"](*r["state"], x, y, r["arch"])
            jax.block_until_ready(out)
            r["times"].append(time.perf_counter() - t0)
            r["state"] = list(out[:3])

    # The penalty's value and gradient alone, on the same parameters.
    model = models.create(args.model)
    s = model.structure(args.image_size)
    params = nnx.state(model, nnx.Param)
    arch = runs["gradient"]["arch"]
    vg = jax.jit(jax.value_and_grad(lambda p, a: penalty.partial_group_lasso(p, a, s)))
    jax.block_until_ready(vg(params, arch))
    alone = []
    for _ in range(max(5, args.steps)):
        t0 = time.perf_counter()
        jax.block_until_ready(vg(params, arch))
        alone.append(time.perf_counter() - t0)

    med = {v: statistics.median(runs[v]["times"]) for v in variants}
    best = {v: min(runs[v]["times"]) for v in variants}  # least disturbed by other load
    result = {"model": args.model, "batch": args.batch, "image_size": args.image_size,
              "device": str(jax.devices()[0].device_kind), "steps": args.steps,
              "median_step_s": med, "min_step_s": best,
              "penalty_value_and_grad_s": statistics.median(alone),
              "gradient_form_ratio": med["gradient"] / med["plain"],
              "proximal_form_ratio": med["proximal"] / med["plain"],
              "gradient_form_ratio_min": best["gradient"] / best["plain"],
              "proximal_form_ratio_min": best["proximal"] / best["plain"],
              "penalty_alone_over_step": statistics.median(alone) / med["plain"]}
    for v in variants:
        print(f"{v:9s} median step {med[v]:.3f}s  (compile+first {runs[v]['compile_s']:.1f}s, "
              f"all {', '.join(f'{t:.3f}' for t in runs[v]['times'])})")
    print(f"penalty value+grad alone: {result['penalty_value_and_grad_s'] * 1e3:.1f} ms "
          f"= {result['penalty_alone_over_step']:.2%} of a plain step")
    print(f"step with gradient-form penalty / plain step = "
          f"{result['gradient_form_ratio']:.4f} (median), "
          f"{result['gradient_form_ratio_min']:.4f} (min)")
    print(f"step with proximal form / plain step         = "
          f"{result['proximal_form_ratio']:.4f} (median), "
          f"{result['proximal_form_ratio_min']:.4f} (min)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
