"""Measured inference speed: an extracted model against its dense original.

MAC counts say how much arithmetic pruning removed; this module says how much
time it saved on the device at hand. :func:`compare` times the jitted
eval-mode forward pass of both models at each batch size (batch 1 for
latency, a large batch for throughput), alternating the two models rep by rep
so that a noisy machine slows both alike, and reports medians, speed-ups and
the efficiency ``speed-up / (dense MACs / pruned MACs)`` (1.0 = time fell as
much as the arithmetic).

The training program calls it at the end of a run (config block ``speed``);
``benchmarks/pruned_speedup.py`` uses it for the tables in
``docs/benchmarks.md``. Inputs are random and already on the device, so the
figures are compute only (no input pipeline, no host transfer).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sap_jax.runtime import xla_cpu


def eval_forward(model: nnx.Module) -> tuple[Callable, Any]:
    """``(fwd, state)``: ``fwd(state, x)`` is ``model``'s eval-mode forward as a pure function
    of its state (``model`` itself is not changed)."""
    graphdef, state = nnx.split(model)

    def fwd(st, x):
        m = nnx.merge(graphdef, st)
        m.eval()
        return m(x)
    return fwd, state


def forward_fn(model: nnx.Module, image_size: int, batch: int, *, dtype: Any = jnp.float32,
               device: jax.Device | None = None, seed: int = 0) -> Callable[[], jax.Array]:
    """A compiled, ready-to-call eval-mode forward pass of ``model`` on one fixed random batch.

    The model's state and the batch are placed on ``device`` (default: this
    process's first device); the model object itself is not changed.
    """
    device = device or jax.local_devices()[0]
    fwd, state = eval_forward(model)
    compiled = xla_cpu.jit(fwd, inference_of=model.structure(image_size))
    state = jax.device_put(state, device)
    x = np.random.default_rng(seed).normal(size=(batch, image_size, image_size, 3))
    x = jax.device_put(jnp.asarray(x, dtype), device)
    return lambda: compiled(state, x)


def _seconds(fn: Callable[[], jax.Array]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def time_interleaved(fns: Sequence[Callable[[], jax.Array]], reps: int,
                     warmup: int = 1) -> list[list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each (the first compiles),
    then ``reps`` rounds that call every function once in turn."""
    if reps < 1 or warmup < 1:
        raise ValueError(f"reps = {reps} and warmup = {warmup} must both be >= 1.")
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            t.append(_seconds(fn))
    return times


def spread(xs: Sequence[float]) -> tuple[float, float]:
    """The interquartile range (25th and 75th percentiles, linear interpolation) of ``xs``."""
    q25, q75 = np.percentile(np.asarray(xs, np.float64), [25, 75])
    return float(q25), float(q75)


def paired_row(batch: int, t_dense: Sequence[float], t_pruned: Sequence[float],
               mac_speedup: float) -> dict[str, Any]:
    """One batch size's row of :func:`compare` from the seconds of its interleaved rounds.

    Each round times both models back to back, so the speed-up is the median of the rounds'
    own ratios (dense over pruned) and its IQR their spread: the headline figure always lies
    inside its IQR, and a drift of the machine between rounds moves both models alike. (The
    ratio of the two medians can lie outside that IQR when a sitting drifts.)
    """
    if len(t_dense) != len(t_pruned) or not t_dense:
        raise ValueError(f"{len(t_dense)} dense and {len(t_pruned)} pruned timings: the rounds "
                         "must pair up, one or more.")
    d, p = statistics.median(t_dense), statistics.median(t_pruned)
    ratios = [x / y for x, y in zip(t_dense, t_pruned)]
    speedup = statistics.median(ratios)
    q25, q75 = spread(ratios)
    return {
        "batch": batch,
        "dense_ms": 1e3 * d, "pruned_ms": 1e3 * p,
        "dense_min_ms": 1e3 * min(t_dense), "pruned_min_ms": 1e3 * min(t_pruned),
        "dense_iqr_ms": [1e3 * x for x in spread(t_dense)],
        "pruned_iqr_ms": [1e3 * x for x in spread(t_pruned)],
        "dense_images_per_s": batch / d, "pruned_images_per_s": batch / p,
        "speedup": speedup, "efficiency": speedup / mac_speedup,
        "speedup_iqr": [q25, q75],
        # The middle half of the rounds' speed-ups lies on both sides of 1: not a measured gain.
        "within_noise": q25 <= 1.0 <= q75,
    }


def compare(dense: nnx.Module, pruned: nnx.Module, image_size: int, batch_sizes: Sequence[int], *,
            macs: tuple[int, int], reps: int = 10, dtype: Any = jnp.float32,
            device: jax.Device | None = None) -> dict[str, Any]:
    """Inference speed of ``pruned`` vs ``dense`` (both ``PrunableModel`` s), JSON-ready.

    ``macs`` is (dense, pruned) multiply-accumulates per image
    (:func:`sap_jax.structure.flops.model_macs`): the efficiency compares against their ratio.

    Returns the device, dtype, repetitions, the MAC speed-up and one row per
    batch size (:func:`paired_row`) with the median (and minimum) milliseconds per forward pass
    of each model, images/s, the speed-up (the median over the rounds of dense time / pruned
    time) with its IQR, and the efficiency (speed-up / MAC speed-up).
    """
    device = device or jax.local_devices()[0]
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes = {tuple(batch_sizes)} must be one or more positive "
                         "integers.")
    full, small = (int(m) for m in macs)
    mac_speedup = full / small
    rows = []
    for b in batch_sizes:
        fns = [forward_fn(m, image_size, int(b), dtype=dtype, device=device)
               for m in (dense, pruned)]
        t_dense, t_pruned = time_interleaved(fns, reps)
        rows.append(paired_row(int(b), t_dense, t_pruned, mac_speedup))
    return {"device": device.device_kind, "platform": device.platform,
            "dtype": jnp.dtype(dtype).name,
            "reps": reps, "image_size": image_size, "macs_dense": full, "macs_pruned": small,
            "mac_speedup": mac_speedup, "batches": rows,
            # what "speedup" is (before 2026-12-06: the ratio of the two medians)
            "speedup_statistic": "median of the rounds' ratios"}


def summary_lines(s: dict[str, Any], metric: str = "macs") -> list[str]:
    """The speed table of a run's summary (``metric``: what the run's budget bounded)."""
    lines = [f"  inference on {s['device']} ({s['dtype']}), medians of {s['reps']} rounds "
             f"(speed-up: the rounds' own ratios, median and IQR); MACs "
             f"{s['mac_speedup']:.2f}x fewer",
             f"  {'':<18} {'dense':>11} {'pruned':>11} {'speed-up':>9} {'IQR':>11} "
             f"{'efficiency':>11}"]
    noisy = []
    for r in s["batches"]:
        iqr = r.get("speedup_iqr")
        iqr_text = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "-"
        if r.get("within_noise"):
            noisy.append(str(r["batch"]))
        if r["batch"] == 1:
            lines.append(f"  {'batch 1 latency':<18} {r['dense_ms']:>8.2f} ms "
                         f"{r['pruned_ms']:>8.2f} ms "
                         f"{r['speedup']:>8.2f}x {iqr_text:>11} {r['efficiency']:>11.2f}")
        else:
            label = f"batch {r['batch']} img/s"
            lines.append(f"  {label:<18} {r['dense_images_per_s']:>11.1f} "
                         f"{r['pruned_images_per_s']:>11.1f} "
                         f"{r['speedup']:>8.2f}x {iqr_text:>11} {r['efficiency']:>11.2f}")
    if noisy:
        lines.append(f"  at batch {', '.join(noisy)} the speed-up is within the noise: its IQR "
                     "includes 1 (more speed.reps, or a quieter machine, would tell)")
    return lines + slower_lines(s, metric)


def slower_lines(s: dict[str, Any], metric: str = "macs") -> list[str]:
    """A plain warning for the batch sizes at which the pruned model ran slower than the dense
    one (the median speed-up below 1), with what to try for a run whose budget was on
    ``metric`` ("macs" or "latency")."""
    slow = [r for r in s["batches"] if r["speedup"] < 1]
    if not slow:
        return []
    at = ", ".join(f"batch {r['batch']} ({r['speedup']:.2f}x"
                   + (", within the noise" if r.get("within_noise") else "") + ")" for r in slow)
    verdict = ("no faster than" if all(r.get("within_noise") for r in slow)
               else "SLOWER than")
    if metric == "latency":
        advice = ("The latency table's estimate did not hold here: build the table on an idle "
                  "machine, with more repetitions (budget.latency_reps), at the batch the model "
                  "will serve (python -m sap_jax.latency --batch) and on the device it will run "
                  "on.")
    else:
        advice = ("Fewer MACs did not mean less time here: cut with budget.metric = \"latency\" "
                  "(p then bounds the forward time estimated from per-layer times measured on "
                  "this device, widths snapped to where the time steps), or round the widths to "
                  "a coarser multiple (budget.round_to = 16 or 32; 0, the default, uses 8 on "
                  "CPUs and GPUs).")
    return [f"  warning: the pruned model ran {verdict} the dense one on {s['device']} at {at}. "
            + advice]


def brief_line(s: dict[str, Any], metric: str = "macs") -> str:
    """The speed-ups in one line: pruned over dense per batch size, with their IQR (and the
    warning of :func:`slower_lines`)."""
    parts = []
    for r in s["batches"]:
        iqr = r.get("speedup_iqr")
        spread = (f" [{iqr[0]:.2f}-{iqr[1]:.2f}"
                  f"{', within noise' if r.get('within_noise') else ''}]" if iqr else "")
        parts.append(f"batch {r['batch']} {r['speedup']:.2f}x{spread}")
    return "\n".join([f"  speed-up on {s['device']} ({s['dtype']}, median of {s['reps']}, IQR): "
                      + ", ".join(parts) + f"; MACs {s['mac_speedup']:.2f}x fewer",
                      *slower_lines(s, metric)])
