"""Real speed of extracted models vs their dense originals (a benchmark, not a test).

    python benchmarks/pruned_speedup.py [--models resnet56,resnet50,mobilenet_v2] [--reps 10]
        [--batch 32] [--round-to 8[,16,...]]

For each model at its paper budget (p of the prunable MACs: ResNet-56 0.48 on
CIFAR, ResNet-50 0.37 and MobileNetV2 0.65 on ImageNet) it builds the pruned
model with uniform per-group widths (the widest uniform keep fraction within
the budget; SAP's own widths are non-uniform, but the cost of a layer depends
only on its widths) and, for each M in ``--round-to``, the same widths rounded
to multiples of M within the budget. It times the jitted eval-mode forward pass
with ``sap_jax.runtime.speed.compare`` (dense and pruned alternate rep by rep):
latency at batch 1 and throughput at ``--batch``, medians of ``--reps`` after
warm-up. Efficiency = measured speed-up / (dense MACs / pruned MACs).
"""

from __future__ import annotations

import argparse
import json

import jax

from sap_jax import models
from sap_jax.method import baselines, cut
from sap_jax.runtime import speed
from sap_jax.structure import flops

BUDGETS = {"resnet56": (0.48, 32), "resnet50": (0.37, 224), "mobilenet_v2": (0.65, 224),
           "resnet_cifar_tiny": (0.5, 32)}


def measure(name: str, reps: int, batch: int, round_to: tuple[int, ...]) -> list[dict]:
    p, size = BUDGETS[name]
    dense = models.create(name)
    s = dense.structure(size)
    variants = {"uniform": baselines.uniform_widths(s, p)}
    for m in round_to:
        if m > 1:
            variants[f"rounded to {m}"] = cut.round_widths(s, variants["uniform"], m, p)
    full = flops.count(s)
    rows = []
    for label, widths in variants.items():
        c = flops.count(s, widths)
        r = speed.compare(dense, models.create(name, widths=widths), size, (1, batch),
                          macs=(full.macs, c.macs), reps=reps)
        lat, thr = r["batches"]
        rows.append({"model": name, "p": p, "variant": label, "mac_ratio": c.macs / full.macs,
                     "prunable_mac_ratio": c.prunable_macs / full.prunable_macs,
                     "dense_latency_ms": lat["dense_ms"], "pruned_latency_ms": lat["pruned_ms"],
                     "dense_images_per_s": thr["dense_images_per_s"],
                     "pruned_images_per_s": thr["pruned_images_per_s"], "batch": batch,
                     "latency_speedup": lat["speedup"], "throughput_speedup": thr["speedup"],
                     "latency_efficiency": lat["efficiency"],
                     "throughput_efficiency": thr["efficiency"]})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet56,resnet50,mobilenet_v2")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32,
                    help="throughput batch (256 on an accelerator)")
    ap.add_argument("--round-to", default="8",
                    help="also time widths rounded to each of these multiples (comma-separated)")
    args = ap.parse_args(argv)
    try:
        round_to = tuple(int(m) for m in args.round_to.split(",") if m.strip())
    except ValueError:
        ap.error(f"--round-to must be comma-separated integers, got {args.round_to!r}")
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.reps, args.batch, round_to)
    print(f"{jax.devices()[0].platform}, medians of {args.reps}; "
          "efficiency = speed-up / MAC speed-up")
    print(f"  {'model':<13} {'widths':<14} {'MACs':>6} {'lat. dense ms':>13} {'pruned':>8} "
          f"{'x':>6} {'eff.':>5} | {'img/s dense':>11} {'pruned':>8} {'x':>6} {'eff.':>5}")
    for r in rows:
        print(f"  {r['model']:<13} {r['variant']:<14} {r['mac_ratio']:>6.1%} "
              f"{r['dense_latency_ms']:>13.2f} {r['pruned_latency_ms']:>8.2f} "
              f"{r['latency_speedup']:>6.2f} {r['latency_efficiency']:>5.2f} | "
              f"{r['dense_images_per_s']:>11.1f} {r['pruned_images_per_s']:>8.1f} "
              f"{r['throughput_speedup']:>6.2f} {r['throughput_efficiency']:>5.2f}")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
