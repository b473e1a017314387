"""Training throughput and model-FLOPs utilisation on one device (a benchmark, not a test).

    python benchmarks/accelerator.py [--model resnet50] [--image-size 224] [--batch 256]
        [--dtype bfloat16] [--steps 20] [--rounds 3] [--peak-tflops T] [--profile DIR]
        [--epoch-model resnet56] [--epoch-image-size 32] [--epoch-batch 128]
        [--epoch-images 50000] [--agn-every 10]

Meant for a GPU or TPU (issue 6, item 4); it runs anywhere, which is how its
smoke test keeps it working. On the first device, with on-device synthetic
data and the trainer's own jitted steps (``benchmarks/step_cost.py``'s
``build``):

1. images/s of the plain step, the SAP weight step and the AGN step: each
   timed over ``--steps`` back-to-back calls with one wait at the end (the
   way a training loop dispatches), after two warm-up calls, median of
   ``--rounds``;
2. model FLOP/s of the weight steps, 6 x MACs per image x images/s, and the
   model-FLOPs utilisation, that over the device's peak (dense bf16 figures
   from vendor datasheets for known devices, or ``--peak-tflops``); the AGN
   step does no weight gradients, so no MFU is given for it;
3. the wall time of one epoch of ``--epoch-model`` on CIFAR-shaped data:
   ceil(epoch images / batch) SAP weight steps with an AGN step every
   ``--agn-every``, and the same without AGN steps;
4. with ``--profile DIR``, a ``jax.profiler`` trace of a few SAP weight steps
   (open it in TensorBoard's or Perfetto's profile viewer).

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import Steps  # noqa: E402

#: Dense (no sparsity) bf16 peak TFLOP/s by device kind, from the vendors' datasheets. Matched
#: in order against ``jax.Device.device_kind``; the first substring found wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L4", 121.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)

#: The per-accelerator rate of MLPerf's tuned ResNet-50 training runs (issue 6's target).
TARGET_IMAGES_PER_S = 7000.0


def peak_tflops(device: jax.Device, dtype: str, given: float) -> float | None:
    """The device's peak for ``dtype``: ``given`` if set, else the bf16 table; None if unknown."""
    if given > 0:
        return given
    if dtype != "bfloat16":
        return None  # fp32 peaks depend on TF32 and the like: ask for --peak-tflops
    kind = device.device_kind
    return next((t for name, t in BF16_PEAK_TFLOPS if name in kind), None)


def throughput(steps: Steps, n: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each step kind over ``rounds`` runs of ``n`` back-to-back
    calls."""
    for name in steps.fns:  # compile and warm up
        steps.timed([name, name])
    per = {name: [] for name in steps.fns}
    for _ in range(rounds):
        for name in steps.fns:  # interleaved, so drift hits every kind alike
            per[name].append(steps.timed([name] * n) / n)
    return {name: statistics.median(v) for name, v in per.items()}


def epoch_time(steps: Steps, images: int, batch: int, agn_every: int) -> dict[str, float]:
    """One epoch of SAP weight steps, with and without an AGN step every ``agn_every``."""
    n = math.ceil(images / batch)
    steps.timed(["sap", "sap", "agn", "agn"])  # compile and warm up
    with_agn = []
    for i in range(n):
        with_agn += ["sap", "agn"] if (i + 1) % agn_every == 0 else ["sap"]
    return {"steps": n, "weight_steps_s": steps.timed(["sap"] * n),
            "with_agn_s": steps.timed(with_agn)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=20, help="back-to-back calls per timing")
    ap.add_argument("--rounds", type=int, default=3, help="timings per step kind (median)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's peak TFLOP/s for --dtype (default: the bf16 table)")
    ap.add_argument("--profile", default="", help="write a jax.profiler trace of SAP steps here")
    ap.add_argument("--epoch-model", default="resnet56")
    ap.add_argument("--epoch-image-size", type=int, default=32)
    ap.add_argument("--epoch-batch", type=int, default=128)
    ap.add_argument("--epoch-images", type=int, default=50000,
                    help="images per epoch (CIFAR: 50000)")
    ap.add_argument("--agn-every", type=int, default=10, help="weight steps per AGN step")
    args = ap.parse_args(argv)
    for name in ("batch", "steps", "rounds", "epoch_batch", "epoch_images", "agn_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    device = jax.devices()[0]
    steps = Steps(args.model, args.image_size, args.batch, args.dtype)
    sec = throughput(steps, args.steps, args.rounds)
    ips = {k: args.batch / v for k, v in sec.items()}
    peak = peak_tflops(device, args.dtype, args.peak_tflops)
    flops_per_image = 6 * steps.macs  # forward 2 x MACs, backward twice that
    tflops = {k: flops_per_image * ips[k] / 1e12 for k in ("plain", "sap")}  # model FLOP/s
    mfu = {k: t / peak for k, t in tflops.items()} if peak else None
    if args.profile:
        jax.profiler.start_trace(args.profile)
        steps.timed(["sap"] * 3)
        jax.profiler.stop_trace()

    macs = steps.macs
    if (args.epoch_model, args.epoch_image_size, args.epoch_batch) == (args.model, args.image_size,
                                                                        args.batch):
        ep = steps  # the same steps, already compiled
    else:
        del steps  # free its buffers before the second model
        ep = Steps(args.epoch_model, args.epoch_image_size, args.epoch_batch, args.dtype)
    epoch = epoch_time(ep, args.epoch_images, args.epoch_batch, args.agn_every)

    peak_s = f"{peak:.1f} TFLOP/s" if peak else "unknown (--peak-tflops)"
    print(f"{device.device_kind} ({device.platform}), {args.model} {args.image_size}px, batch "
          f"{args.batch}, {args.dtype}, {args.steps} steps x {args.rounds} rounds (median); "
          f"peak {peak_s}")
    print(f"  {'step':<8} {'s/step':>9} {'images/s':>10} {'TFLOP/s':>8} {'MFU':>7}")
    for k in ("plain", "sap", "agn"):
        t = f"{tflops[k]:.3g}" if k in tflops else "-"
        m = f"{100 * mfu[k]:.1f}%" if mfu and k in mfu else "-"
        print(f"  {k:<8} {sec[k]:>9.4f} {ips[k]:>10.1f} {t:>8} {m:>7}")
    print(f"  SAP weight step vs the {TARGET_IMAGES_PER_S:.0f} images/s target: "
          f"{ips['sap'] / TARGET_IMAGES_PER_S:.3g}x")
    print(f"  one epoch of {args.epoch_model} ({args.epoch_images} images at "
          f"{args.epoch_image_size}px, batch {args.epoch_batch}, {epoch['steps']} steps): "
          f"{epoch['weight_steps_s']:.2f} s of SAP weight steps, {epoch['with_agn_s']:.2f} s "
          f"with an AGN step every {args.agn_every}")
    r = {"device": device.device_kind, "platform": device.platform, "model": args.model,
         "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype,
         "steps": args.steps, "rounds": args.rounds, "macs_per_image": macs,
         "peak_tflops": peak, "s_per_step": sec, "images_per_s": ips, "model_tflops": tflops,
         "mfu": mfu,
         "epoch": {"model": args.epoch_model, "image_size": args.epoch_image_size,
                   "batch": args.epoch_batch, "images": args.epoch_images,
                   "agn_every": args.agn_every, **epoch},
         "profile": args.profile or None}
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
