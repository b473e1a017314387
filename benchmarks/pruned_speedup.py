"""Real speed of extracted models vs their dense originals (a benchmark, not a test).

    python benchmarks/pruned_speedup.py [--models resnet56,resnet50,mobilenet_v2,WORKDIR,CONFIG]
        [--reps 10] [--batch 32] [--image-size N] [--round-to 8[,16,...]]
        [--dtype float32|bfloat16] [--layers] [--fold_bn] [--floor] [--host-memory retain]
        [--json PATH|-]

For each preset at its paper budget (p of the prunable MACs: ResNet-56 0.48 on
CIFAR, ResNet-50 0.37 and MobileNetV2 0.65 on ImageNet) it builds the pruned
model with uniform per-group widths (the widest uniform keep fraction within
the budget), at its image size (32 or 224; ``--image-size`` sets another). An entry of
``--models`` that is a directory is a run's workdir (or a saved model): its own, non-uniform
widths are timed against its dense widths, at its image size (its rows' ``p`` is the prunable
MAC ratio of those widths, which its ``--round-to`` variants stay within, not the run's own p).
An entry ending in ``.py`` is a config (``configs/*.py``): its model at its image size, cut as a
run with that config cuts on this backend (``budget``: p, scope, trimming and ``round_to``;
``round_to = 0`` rounds for this backend) from random channel scores, which stand in for a
trained model's (the widths, not the values, set the time), computing in ``--dtype``;
``--round-to`` and ``--image-size`` do not apply to it. A speed-up below 1x or whose per-round
IQR includes 1 is flagged.
For each M in ``--round-to``, the same widths rounded to multiples of M within the same
budget are timed too. It times the jitted eval-mode forward pass with
``sap_jax.runtime.speed.compare`` (dense and pruned alternate rep by rep) in ``--dtype``
(the models compute in it): latency at batch 1 and throughput at ``--batch``, medians of
``--reps`` after warm-up. Efficiency = measured speed-up / (dense MACs / pruned MACs).

``--floor`` also times every group at one channel: about the time no cut of these groups
removes (the layers they do not touch, the residual stream, the per-op costs), so its
speed-up is roughly the most a cut can gain on this device (timings at odd widths are not
monotone; one median, not a bound).

``--host-memory retain`` keeps freed host memory in the process
(``sap_jax.runtime.host_memory``), as a CPU inference server would; the default leaves malloc as
it is.

``--layers`` adds a per-layer breakdown (``sap_jax.method.latency.layer_times``): every conv
and linear layer alone, at the dense and at each variant's widths, at ``--batch``; it
lists the layers whose time falls least in proportion to their MACs (where the cut does not
pay) and the layers' share of the dense model's time.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sap_jax import models, surgery
from sap_jax.method import baselines, cut, latency
from sap_jax.runtime import host_memory, speed
from sap_jax.runtime.errors import ConfigError
from sap_jax.structure import flops
from sap_jax.structure import groups as G
from sap_jax.train import config as config_lib
from sap_jax.train import spec as spec_lib
from sap_jax.train import tables
from sap_jax.train.run import PRUNED_DIR

BUDGETS = {"resnet56": (0.48, 32), "resnet50": (0.37, 224), "mobilenet_v2": (0.65, 224),
           "resnet_cifar_tiny": (0.5, 32)}
DTYPES = ("float32", "bfloat16")


def _model_dtype(dtype: str) -> str | None:
    return None if dtype == "float32" else dtype


def candidates(entry: str, dtype: str, image_size: int | None = None
               ) -> tuple[str, float, int, models.PrunableModel, dict[str, list[int]], Callable]:
    """``(name, p, image size, dense model, {variant: widths}, build(widths))`` for a preset
    name (at ``image_size``, default the preset's) or a workdir / saved-model directory."""
    if os.path.isdir(entry):
        path = entry if surgery.is_saved_model(entry) else os.path.join(entry, PRUNED_DIR)
        if not surgery.is_saved_model(path):
            raise SystemExit(f"{entry}: neither a saved model nor a workdir holding "
                             f"{PRUNED_DIR}/ (a run that reached the cut).")
        info = surgery.read_info(path)
        if info["image_size"] is None:
            raise SystemExit(f"{path}: the saved model does not record its image size.")
        config = {**info["config"], "dtype": _model_dtype(dtype)}

        def build(widths):
            return models.from_config(info["class"], {**config, "widths": list(widths)})
        dense = build(info["dense_widths"])
        s = dense.structure(info["image_size"])
        p = flops.count(s, info["widths"]).prunable_macs / flops.count(s).prunable_macs
        return (os.path.basename(os.path.normpath(entry)), p, info["image_size"], dense,
                {"run's widths": list(info["widths"])}, build)
    if entry.endswith(".py"):
        return config_candidates(entry, dtype)
    if entry not in BUDGETS:
        raise SystemExit(f"--models: {entry!r} is neither a directory nor one of "
                         f"{sorted(BUDGETS)}.")
    p, size = BUDGETS[entry]
    size = image_size or size

    def build(widths):
        return models.create(entry, widths=list(widths), dtype=_model_dtype(dtype))
    dense = models.create(entry, dtype=_model_dtype(dtype))
    return entry, p, size, dense, {"uniform": baselines.uniform_widths(
        dense.structure(size), p)}, build


CONFIG_CUT = "config's cut"


def config_candidates(path: str, dtype: str):
    """:func:`candidates` of a config file: its model at its image size, computing in ``dtype``,
    cut as a run with the config cuts on this backend."""
    try:
        config = config_lib.load_file(path)
        config.dtype = dtype
        config_lib.validate(config)
    except ConfigError as e:
        raise SystemExit(f"--models: {e}") from None
    spec = spec_lib.from_config(config)
    if spec.budget.metric != "macs":
        raise SystemExit(f"{path}: a latency budget (budget.metric = {spec.budget.metric!r}); "
                         "time its cut with benchmarks/latency_budget.py.")
    classes = config_lib.NUM_CLASSES.get(spec.data.dataset)

    def build(widths):
        return tables.model_for(spec, classes, None if widths is None else list(widths))
    dense = build(None)
    s = dense.structure(spec.image_size)
    name = os.path.splitext(os.path.basename(path))[0]
    if spec.sap.widths:  # selector "norm" with fixed widths: those are cut, whatever p says
        return (name, spec.budget.p, spec.image_size, dense,
                {"config's sap.widths": list(spec.sap.widths)}, build)
    if not spec.budget.enforce:
        raise SystemExit(f"{path}: budget.enforce = False cuts what the generator chose, which "
                         "only a run knows: time its workdir instead.")
    policy = spec_lib.cut_policy(spec.budget, backend=jax.default_backend())
    rng = np.random.default_rng(0)
    scores = [rng.random(w) for w in s.widths]
    ones = [np.ones(w, np.float32) for w in s.widths]
    _, report = cut.final_arch(s, ones, lambda: scores, policy)
    label = CONFIG_CUT + (f" (rounded to {report.round_to})" if report.round_to > 1 else "")
    return name, spec.budget.p, spec.image_size, dense, {label: report.widths}, build


def fold_gain(model: models.PrunableModel, size: int, batch: int, reps: int, dtype: str,
              macs: int) -> dict:
    """``model`` unfolded against itself with every BatchNorm that follows a conv folded."""
    folded = surgery.fold_bn(model, size)
    r = speed.compare(model, folded, size, (1, batch), macs=(macs, macs), reps=reps,
                      dtype=jnp.dtype(dtype))
    lat, thr = r["batches"]
    return {"folded_batch_norms": len(surgery.folded_batch_norms(folded)),
            "unfolded_latency_ms": lat["dense_ms"], "folded_latency_ms": lat["pruned_ms"],
            "latency_speedup": lat["speedup"], "latency_speedup_iqr": lat["speedup_iqr"],
            "unfolded_images_per_s": thr["dense_images_per_s"],
            "folded_images_per_s": thr["pruned_images_per_s"],
            "throughput_speedup": thr["speedup"], "throughput_speedup_iqr": thr["speedup_iqr"]}


FLOOR = "one per group"


def measure(entry: str, reps: int, batch: int, round_to: tuple[int, ...], *,
            dtype: str = "float32", layers: bool = False, fold_bn: bool = False,
            image_size: int | None = None, floor: bool = False) -> list[dict]:
    name, p, size, dense, variants, build = candidates(entry, dtype, image_size)
    s = dense.structure(size)
    base = next(iter(variants.values()))
    for m in round_to:
        if m > 1 and not entry.endswith(".py"):
            variants[f"rounded to {m}"] = cut.round_widths(s, base, m, p, warn=False)
    if floor:
        variants[FLOOR] = [G.MIN_KEPT] * s.num_groups
    full = flops.count(s)
    rows = []
    dense_fold = fold_gain(dense, size, batch, reps, dtype, full.macs) if fold_bn else None
    for label, widths in variants.items():
        c = flops.count(s, widths)
        pruned = build(widths)
        r = speed.compare(dense, pruned, size, (1, batch), macs=(full.macs, c.macs),
                          reps=reps, dtype=jnp.dtype(dtype))
        lat, thr = r["batches"]
        rows.append({"model": name, "p": p, "variant": label, "dtype": dtype,
                     "widths": [int(w) for w in widths], "mac_ratio": c.macs / full.macs,
                     "prunable_mac_ratio": c.prunable_macs / full.prunable_macs,
                     "dense_latency_ms": lat["dense_ms"], "pruned_latency_ms": lat["pruned_ms"],
                     "dense_images_per_s": thr["dense_images_per_s"],
                     "pruned_images_per_s": thr["pruned_images_per_s"], "batch": batch,
                     "latency_speedup": lat["speedup"], "throughput_speedup": thr["speedup"],
                     "latency_efficiency": lat["efficiency"],
                     "throughput_efficiency": thr["efficiency"],
                     "latency_speedup_iqr": lat["speedup_iqr"],
                     "throughput_speedup_iqr": thr["speedup_iqr"],
                     "latency_within_noise": lat["within_noise"],
                     "throughput_within_noise": thr["within_noise"]})
        if fold_bn:
            rows[-1]["fold_bn"] = {"dense": dense_fold, "pruned": fold_gain(
                pruned, size, batch, reps, dtype, c.macs)}
    if layers:
        per_layer = latency.layer_times(s, [list(s.widths), *variants.values()], batch,
                                        reps=reps, dtype=jnp.dtype(dtype))
        for k, row in enumerate(rows, start=1):
            row["layers"] = [{"path": x["path"], "kind": x["kind"], "prunable": x["prunable"],
                              "dense_ms": x["ms"][0], "pruned_ms": x["ms"][k],
                              "dense_macs": x["macs"][0], "pruned_macs": x["macs"][k]}
                             for x in per_layer]
    return rows


def slower_lines(row: dict) -> list[str]:
    """A line for each of a row's two timings that is slower than dense or whose per-round
    speed-ups (their IQR) include 1."""
    out = []
    for what, key in (("batch 1 latency", "latency"), (f"batch {row['batch']} throughput",
                                                     "throughput")):
        x, (lo, hi) = row[f"{key}_speedup"], row[f"{key}_speedup_iqr"]
        if x < 1 or row[f"{key}_within_noise"]:
            verdict = ("SLOWER than dense" if hi < 1 else
                       "median below 1x, within the noise" if x < 1 else "within the noise")
            out.append(f"  {row['model']} / {row['variant']}: {what} {x:.2f}x (IQR "
                       f"{lo:.2f}-{hi:.2f}): {verdict}")
    return out


def layer_lines(row: dict, top: int = 8) -> list[str]:
    """The per-layer breakdown of one variant: totals, then the layers whose time falls least
    in proportion to their MACs (time kept minus MACs kept, weighted by dense time)."""
    ls = row["layers"]
    dense_ms = sum(x["dense_ms"] for x in ls)
    pruned_ms = sum(x["pruned_ms"] for x in ls)
    out = [f"  {row['model']} / {row['variant']}: conv and linear layers alone, batch "
           f"{row['batch']}: {dense_ms:.2f} ms dense -> {pruned_ms:.2f} ms pruned "
           f"({dense_ms / max(pruned_ms, 1e-12):.2f}x; the whole forward "
           f"{row['throughput_speedup']:.2f}x)"]

    def shortfall(x):  # ms the layer keeps beyond its MAC share
        return x["pruned_ms"] - x["dense_ms"] * x["pruned_macs"] / max(x["dense_macs"], 1)

    worst = sorted((x for x in ls if x["prunable"]), key=shortfall, reverse=True)[:top]
    out.append(f"    {'layer':<34} {'dense ms':>9} {'pruned':>8} {'time kept':>9} "
               f"{'MACs kept':>9}")
    for x in worst:
        out.append(f"    {x['path']:<34} {x['dense_ms']:>9.3f} {x['pruned_ms']:>8.3f} "
                   f"{x['pruned_ms'] / max(x['dense_ms'], 1e-12):>9.1%} "
                   f"{x['pruned_macs'] / max(x['dense_macs'], 1):>9.1%}")
    fixed = sum(x["dense_ms"] for x in ls if not x["prunable"])
    out.append(f"    layers no group touches: {fixed:.2f} ms of the dense {dense_ms:.2f} ms "
               f"({fixed / max(dense_ms, 1e-12):.0%})")
    return out


def column_widths(rows: list[dict]) -> tuple[int, int]:
    """The widths of the model and variant columns of the printed tables."""
    return (max([13] + [len(r["model"]) for r in rows]),
            max([14] + [len(r["variant"]) for r in rows]))


def fold_lines(rows: list[dict]) -> list[str]:
    """One line per model timed unfolded and folded: each entry's dense model once, then its
    variants."""
    mw, vw = column_widths(rows)
    out, seen = [], set()
    for r in rows:
        entries = [("pruned", r["variant"])]
        if r["model"] not in seen:
            seen.add(r["model"])
            entries.insert(0, ("dense", "dense"))
        for key, label in entries:
            f = r["fold_bn"][key]
            out.append(
                f"  {r['model']:<{mw}} {label:<{vw}} {f['folded_batch_norms']:>4} "
                f"{f['unfolded_latency_ms']:>8.2f} {f['folded_latency_ms']:>7.2f} "
                f"{f['latency_speedup']:>5.2f} "
                f"{'{:.2f}-{:.2f}'.format(*f['latency_speedup_iqr']):>11} | "
                f"{f['unfolded_images_per_s']:>8.1f} {f['folded_images_per_s']:>8.1f} "
                f"{f['throughput_speedup']:>5.2f} "
                f"{'{:.2f}-{:.2f}'.format(*f['throughput_speedup_iqr']):>11}")
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet56,resnet50,mobilenet_v2")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32,
                    help="throughput batch (256 on an accelerator)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="the presets' input size (default: 32 for CIFAR models, 224 otherwise)")
    ap.add_argument("--round-to", default="8",
                    help="also time widths rounded to each of these multiples (comma-separated)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="the models compute in this dtype (bfloat16 on an accelerator)")
    ap.add_argument("--layers", action="store_true",
                    help="also time every conv and linear layer alone (a per-layer breakdown)")
    ap.add_argument("--fold_bn", "--fold-bn", action="store_true",
                    help="also time every model with its BatchNorms folded into the convs")
    ap.add_argument("--floor", action="store_true",
                    help="also time every group at one channel (what no cut can remove)")
    ap.add_argument("--host-memory", "--host_memory", default="system",
                    choices=host_memory.MODES,
                    help="retain: keep freed host memory in the process (before JAX starts)")
    ap.add_argument("--json", default="", help="also write the rows to this file (- : stdout)")
    args = ap.parse_args(argv)
    memory = host_memory.apply(args.host_memory)
    try:
        round_to = tuple(int(m) for m in args.round_to.split(",") if m.strip())
    except ValueError:
        ap.error(f"--round-to must be comma-separated integers, got {args.round_to!r}")
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.reps, args.batch, round_to, dtype=args.dtype,
                        layers=args.layers, fold_bn=args.fold_bn, image_size=args.image_size,
                        floor=args.floor)
    for r in rows:
        r["host_memory"] = memory
    print(f"{jax.devices()[0].platform} ({args.dtype}), medians of {args.reps}; "
          f"efficiency = speed-up / MAC speed-up; host memory {memory}")
    mw, vw = column_widths(rows)
    print(f"  {'model':<{mw}} {'widths':<{vw}} {'MACs':>6} {'lat. dense ms':>13} {'pruned':>8} "
          f"{'x':>6} {'eff.':>5} | {'img/s dense':>11} {'pruned':>8} {'x':>6} {'eff.':>5}")
    for r in rows:
        # The floor row's efficiency means nothing: it is not a cut at p.
        lat_eff, thr_eff = (f"{'-':>5}",) * 2 if r["variant"] == FLOOR else (
            f"{r['latency_efficiency']:>5.2f}", f"{r['throughput_efficiency']:>5.2f}")
        print(f"  {r['model']:<{mw}} {r['variant']:<{vw}} {r['mac_ratio']:>6.1%} "
              f"{r['dense_latency_ms']:>13.2f} {r['pruned_latency_ms']:>8.2f} "
              f"{r['latency_speedup']:>6.2f} {lat_eff} | "
              f"{r['dense_images_per_s']:>11.1f} {r['pruned_images_per_s']:>8.1f} "
              f"{r['throughput_speedup']:>6.2f} {thr_eff}")
    for r in rows:
        if r["variant"] == FLOOR:
            print(f"  {r['model']}: with one channel per group the forward still takes "
                  f"{1 / r['throughput_speedup']:.0%} of the dense time at batch {r['batch']} "
                  f"({1 / r['latency_speedup']:.0%} at batch 1): about the most any cut gains "
                  f"here ({r['throughput_speedup']:.2f}x, {r['latency_speedup']:.2f}x)")
    for line in (x for r in rows if r["variant"] != FLOOR for x in slower_lines(r)):
        print(line)
    if args.fold_bn:
        print(f"BatchNorm folded into the conv before it (batch 1 latency, batch {args.batch} "
              "throughput; x: folded speed-up, its IQR over the rounds)")
        print(f"  {'model':<{mw}} {'widths':<{vw}} {'BNs':>4} {'lat. ms':>8} {'folded':>7} "
              f"{'x':>5} {'IQR':>11} | {'img/s':>8} {'folded':>8} {'x':>5} {'IQR':>11}")
        for line in fold_lines(rows):
            print(line)
    for r in rows:
        if "layers" in r:
            print("\n".join(layer_lines(r)))
    if args.json == "-":
        print(json.dumps(rows, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
