"""Cost of SAP's steps next to a plain training step (a benchmark, not a test).

    python benchmarks/step_cost.py [--model resnet50] [--batch 32] [--image-size 224] [--steps 5]
        [--agn-every 10]

Times the trainer's own jitted steps (``sap_jax.train.make_train_step`` and
``make_agn_step``) on synthetic on-device data, interleaved so that load drift
hits every variant alike, warm-up (compilation) excluded:

* plain:  dense weight step, no penalty (what fine-tuning runs);
* sap:    weight step with ``gamma * R_w(W; v)`` (gradient form), v random;
* agn:    one AGN step on the frozen gated model.

Prints images/s, the SAP/plain time ratio and the AGN overhead amortised over
``agn_every`` weight steps, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sap_jax import models, train
from sap_jax.method import agn as agn_lib
from sap_jax.method import resource
from sap_jax.structure import flops
from sap_jax.structure.codec import ModuleCodec


def build(model_name: str, image_size: int, batch: int, dtype: str = "float32"):
    model = models.create(model_name, dtype=None if dtype == "float32" else dtype)
    structure = model.structure(image_size)
    codec = ModuleCodec(model)
    tx = optax.sgd(0.01, momentum=0.9)
    dt = jnp.dtype(dtype)
    steps = {
        "plain": train.make_train_step(codec, structure, tx, penalty_form="none", dtype=dt),
        "sap": train.make_train_step(codec, structure, tx, penalty_form="gradient", dtype=dt),
    }
    gen = agn_lib.AGN(model.widths)
    agn_codec = ModuleCodec(gen)
    agn_tx = optax.adamw(1e-3)
    steps["agn"] = train.make_agn_step(codec, agn_codec, structure, resource.ResourceLoss(0.5),
                                       agn_tx, tau=0.4, offset=3.0, deterministic_v=True, dtype=dt)
    rng = np.random.default_rng(0)
    n_cls = model.num_classes
    batch_d = {"image": jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)),
                                    jnp.float32),
               "label": jnp.asarray(rng.integers(0, n_cls, batch), jnp.int32)}
    arch = [jnp.asarray(rng.random(w) < 0.5, jnp.float32) for w in model.widths]
    params, rest = codec.split(model)
    agn_params, agn_rest = agn_codec.split(gen)
    states = {k: [params, rest, tx.init(params)] for k in ("plain", "sap")}
    states = jax.tree.map(jnp.array, states)  # separate buffers: steps donate them
    states["agn"] = [agn_params, agn_rest, agn_tx.init(agn_params)]
    return steps, states, (params, rest), batch_d, arch


class Steps:
    """The trainer's plain, SAP and AGN steps for one model, with state carried between calls."""

    def __init__(self, model: str, image_size: int, batch: int, dtype: str):
        self.fns, self.states, frozen, self.batch, self.arch = build(
            model, image_size, batch, dtype)
        self.frozen = jax.tree.map(jnp.array, frozen)
        self.key, self.gamma = jax.random.key(0), jnp.float32(5e-4)
        self.macs = flops.count(models.create_abstract(model).structure(image_size)).macs

    def call(self, name: str):
        """Dispatch one step without waiting for it; returns its outputs."""
        s = self.states[name]
        if name == "agn":
            out = self.fns["agn"](s[0], s[1], s[2], jnp.float32(0), *self.frozen, self.batch,
                                  self.key)
            self.states["agn"] = [out[0], s[1], out[1]]
        else:
            out = self.fns[name](*s, self.batch, self.arch, self.gamma)
            self.states[name] = list(out[:3])
        return out

    def timed(self, names: list[str]) -> float:
        """Seconds to dispatch ``names`` in order and wait for the last result."""
        t0 = time.perf_counter()
        out = None
        for name in names:
            out = self.call(name)
        jax.block_until_ready(out)
        return time.perf_counter() - t0


def measure(model: str, batch: int, image_size: int, steps: int, dtype: str = "float32") -> dict:
    s = Steps(model, image_size, batch, dtype)
    compile_s = {name: s.timed([name]) for name in s.fns}
    times = {name: [] for name in s.fns}
    for _ in range(steps):
        for name in s.fns:
            times[name].append(s.timed([name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model, "batch": batch, "image_size": image_size, "dtype": dtype,
            "steps": steps,
            "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
            "first_call_s": compile_s, "images_per_s": {k: batch / v for k, v in med.items()},
            "sap_over_plain": med["sap"] / med["plain"],
            "sap_over_plain_min": min(times["sap"]) / min(times["plain"])}


def loop_overhead(epochs: int, repeats: int, agn_every: int = 0, agn_batch: int = 0) -> dict:
    """The quickstart's training loop over real digits batches: plain epochs vs search-and-align
    epochs (weight steps with the penalty, plus an AGN step every agn_every steps on the
    sub-dataset). Per-epoch evaluation is left out of both: it is logging, not training.
    ``agn_every`` or ``agn_batch`` = 0 keeps the quickstart's own value."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import quickstart
    from sap_jax.train import data as data_lib

    c = quickstart.get_config()
    agn_every = agn_every or c.sap.agn_every
    agn_batch = agn_batch or c.agn.batch_size
    d = data_lib.digits(c.seed, c.sap.subset_fraction, c.image_size)
    model = models.create(c.model, num_classes=10)
    structure = model.structure(c.image_size)
    codec = ModuleCodec(model)
    tx = optax.sgd(0.01, momentum=0.9)
    plain = train.make_train_step(codec, structure, tx, penalty_form="none")
    sap = train.make_train_step(codec, structure, tx, penalty_form="gradient")
    gen = agn_lib.AGN(model.widths)
    agn_codec = ModuleCodec(gen)
    agn_tx = optax.adamw(c.agn.learning_rate)
    agn_step = train.make_agn_step(codec, agn_codec, structure, resource.ResourceLoss(c.budget.p),
                                   agn_tx, tau=0.4, offset=3.0, deterministic_v=True)
    params, rest = codec.split(model)
    a_params, a_rest = agn_codec.split(gen)
    arch = [jnp.ones(w) for w in model.widths]

    def epochs_of(kind: str) -> float:
        st = jax.tree.map(jnp.array, [params, rest, tx.init(params)])
        ag = jax.tree.map(jnp.array, [a_params, a_rest, agn_tx.init(a_params)])
        v, n, key = arch, 0, jax.random.key(0)
        t0 = time.perf_counter()
        for e in range(epochs):
            for b in d.train_batches(e, c.batch_size):
                b = {k: jnp.asarray(x) for k, x in b.items()}
                if kind == "plain":
                    st = list(plain(*st, b, v, jnp.float32(0))[:3])
                else:
                    st = list(sap(*st, b, v, jnp.float32(c.sap.gamma))[:3])
                    n += 1
                    if n % agn_every == 0:
                        sb = {k: jnp.asarray(x) for k, x in d.subset_batch(n, agn_batch).items()}
                        ag0, ag2, _, v, _ = agn_step(ag[0], ag[1], ag[2], jnp.float32(0), st[0],
                                                     st[1], sb, jax.random.fold_in(key, n))
                        ag = [ag0, ag[1], ag2]
        jax.block_until_ready(st)
        return time.perf_counter() - t0

    for kind in ("plain", "sap"):  # compile
        epochs_of(kind)
    t = {"plain": [], "sap": []}
    for _ in range(repeats):
        for kind in t:
            t[kind].append(epochs_of(kind))
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"epochs": epochs, "repeats": repeats, "agn_every": agn_every, "agn_batch": agn_batch,
            "median_s": med, "ratio": med["sap"] / med["plain"],
            "ratio_min": min(t["sap"]) / min(t["plain"])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions per variant")
    ap.add_argument("--agn-every", type=int, default=10,
                    help="weight steps per AGN step (sap.agn_every)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--loop-epochs", type=int, default=0,
                    help="instead: time this many quickstart epochs, plain vs search-and-align")
    ap.add_argument("--loop-repeats", type=int, default=3)
    ap.add_argument("--loop-agn-every", type=int, default=0,
                    help="AGN step interval in the loop (default: the quickstart's sap.agn_every)")
    ap.add_argument("--loop-agn-batch", type=int, default=0,
                    help="AGN batch size in the loop (default: the quickstart's agn.batch_size)")
    args = ap.parse_args(argv)
    if args.loop_epochs:
        r = loop_overhead(args.loop_epochs, args.loop_repeats, args.loop_agn_every,
                          args.loop_agn_batch)
        print(f"quickstart loop, {args.loop_epochs} epochs of digits, AGN every {r['agn_every']} "
              f"steps (batch {r['agn_batch']}), "
              f"median of {args.loop_repeats}: "
              f"plain {r['median_s']['plain']:.2f} s, "
              f"search-and-align {r['median_s']['sap']:.2f} s, "
              f"ratio {r['ratio']:.3f} (minima {r['ratio_min']:.3f})")
        print(json.dumps(r))
        return r
    r = measure(args.model, args.batch, args.image_size, args.steps, args.dtype)
    r["agn_every"] = args.agn_every
    r["agn_amortised_overhead"] = r["median_s"]["agn"] / (args.agn_every * r["median_s"]["plain"])
    print(f"{args.model}, batch {args.batch}, {args.image_size}px, {args.dtype}, "
          f"{jax.devices()[0].platform}, median of {args.steps}")
    print(f"  {'step':<8} {'median s':>10} {'images/s':>10} {'first call s':>13}")
    for k in ("plain", "sap", "agn"):
        print(f"  {k:<8} {r['median_s'][k]:>10.4f} {r['images_per_s'][k]:>10.1f} "
              f"{r['first_call_s'][k]:>13.2f}")
    print(f"  SAP weight step / plain: {r['sap_over_plain']:.3f} "
          f"(minima: {r['sap_over_plain_min']:.3f})")
    print(f"  AGN step amortised over {args.agn_every} weight steps: "
          f"+{100 * r['agn_amortised_overhead']:.2f}% of plain")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
