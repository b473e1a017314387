"""Does a latency budget deliver the time it promises? The cut of a latency-budgeted run, timed.

    python benchmarks/latency_budget.py --model resnet56 --p 0.5 --batch 64 [--table PATH]
        [--dtype float32|bfloat16] [--no-train]

Builds (or reads) the model's latency table on this machine, then cuts the dense model as a run
with ``budget.metric = "latency"`` does: channels dropped by norm (random weights stand in for
trained ones; the widths, not the values, set the time) until the table's estimate meets ``p``,
widths snapped to the table's steps (``budget.round_to = 0``) or left as trimmed. The pruned and
the dense models are then timed (``sap_jax.runtime.speed.compare``, interleaved rounds) and the
measured latency ratio is printed next to the estimate, with the MAC-budgeted cut at the same
MAC count for comparison. The models, the table and the timings compute in ``--dtype`` (a table
read with ``--table`` must have been built in it).
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from sap_jax import models, surgery
from sap_jax.method import cut, latency
from sap_jax.runtime import speed
from sap_jax.structure import flops


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--points", type=int, default=9)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--table", default="", help="read this table instead of building one")
    ap.add_argument("--save-table", default="", help="write the built table here")
    ap.add_argument("--no-train", "--no_train", action="store_true",
                    help="the table times the forward only (what a latency budget bounds), not "
                         "also the forward plus backward: about half the build")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the models compute in this dtype (bfloat16 on an accelerator)")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    a = ap.parse_args(argv)
    size = a.image_size or models.get_preset(a.model).image_size
    dtype = jnp.dtype(a.dtype)
    dense = models.create(a.model, dtype=None if a.dtype == "float32" else a.dtype)
    s = dense.structure(size)
    t0 = time.perf_counter()
    table = (latency.LatencyTable.load(a.table) if a.table else
             latency.build_table(dense, size, a.batch, dtype=dtype, points=a.points,
                                 reps=a.reps, train=not a.no_train))
    built = time.perf_counter() - t0
    table.check_matches(s)
    if table.dtype != dtype.name:
        ap.error(f"the table was built in {table.dtype}, the models compute in {dtype.name}: "
                 f"pass --dtype {table.dtype} or build a table in {dtype.name}")
    if a.save_table:
        table.save(a.save_table)
    c = table.check or {}
    print(f"{a.model} {size}px batch {table.batch}: table {'read' if a.table else 'built'} in "
          f"{built:.0f} s; dense {table.model_ms:.2f} ms; check at widths "
          f"{c.get('widths')}: measured {c.get('measured_ratio', float('nan')):.3f}, "
          f"estimated {c.get('estimated_ratio', float('nan')):.3f}")
    # Random channel scores: which channels go does not change the time, only how many.
    norms = [np.random.default_rng(k).random(c) for k, c in enumerate(s.widths)]
    rows = []
    for label, tab, round_to in (("latency, snapped", table, 0), ("latency, as trimmed", table, 1),
                                 ("MACs at the same MAC count", None, 1)):
        if tab is None:  # the MAC budget that removes as many MACs as the first cut did
            p = rows[0]["mac_ratio"]
        else:
            p = a.p
        # A latency budget bounds the whole forward; the MAC cut matches its whole-model MACs.
        policy = cut.CutPolicy(p=p, scope="total", round_to=round_to, table=tab)
        arch, rep = cut.final_arch(s, [np.ones(c, np.float32) for c in s.widths],
                                   lambda: norms, policy)
        pruned = surgery.extract(dense, arch)
        macs = (flops.count(s).macs, flops.model_macs(pruned, size))
        sp = speed.compare(dense, pruned, size, (table.batch,), macs=macs, reps=a.reps,
                           dtype=dtype)
        r = sp["batches"][0]
        c = flops.count(s, rep.widths)
        rows.append({"cut": label, "widths": rep.widths,
                     "mac_ratio": c.macs / flops.count(s).macs,
                     "prunable_mac_ratio": c.prunable_macs / flops.count(s).prunable_macs,
                     "estimated_ratio": float(table.ratio(s, rep.widths, "total")),
                     # the median of the rounds' ratios, as the speed-up is
                     "measured_ratio": 1 / r["speedup"],
                     "measured_iqr": [1 / x for x in reversed(r["speedup_iqr"])],
                     "dense_ms": r["dense_ms"], "pruned_ms": r["pruned_ms"]})
        x = rows[-1]
        print(f"  {label:<28} MACs {x['mac_ratio']:.3f}  latency estimated "
              f"{x['estimated_ratio']:.3f}  measured {x['measured_ratio']:.3f} "
              f"[{x['measured_iqr'][0]:.3f}-{x['measured_iqr'][1]:.3f}]  widths {x['widths']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "p": a.p, "dtype": dtype.name, "batch": table.batch,
                       "train": not a.no_train,
                       "table_seconds": built,
                       "check": table.check, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
