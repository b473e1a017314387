"""Markdown rows from ``python -m sap_jax.aot --out=FILE`` results (docs/scaling.md's tables).

    python benchmarks/aot_table.py steps R50_V5E.json MBV2_V5E.json ...   # one row per result
    python benchmarks/aot_table.py scaling R56_*.json                       # plain step by chips

``steps``: per result, the dense (plain) train step's estimated time, images/s per chip and HBM
per chip, SAP's overhead, and the pruned fine-tuning step's estimated speed-up (uniform widths,
and rounded to 128, with their MAC ratios), with the hardware's padding modelled and
without. ``scaling``: how the plain step's HBM, collectives
and time change with the number of chips (compile results at a fixed per-chip batch).
"""

from __future__ import annotations

import json
import sys

GiB = 2**30


def _load(path: str) -> dict:
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def steps_row(r: dict) -> str:
    p = r["steps"]["plain"]
    sp = r.get("pruned_speedup_estimated", {})
    mr = r.get("pruned_macs_ratio", {})
    pruned = " | ".join(f"{sp[k]:.2f}x ({mr[k]:.2f})" if k in sp else "-"
                        for k in ("finetune", "finetune_r128"))
    lg = r.get("pruned_speedup_estimated_logical", {})
    logical = " / ".join(f"{lg[k]:.2f}x" if k in lg else "-" for k in ("finetune", "finetune_r128"))
    hbm = max(s["hbm_bytes"] for s in r["steps"].values()) / GiB
    return (f"| {r['topology']} ({r['chips']} chips) | {p['estimated_s'] * 1e3:.1f} | "
            f"{p['images_per_s']:.0f} | {hbm:.2f} | {r.get('sap_over_plain', float('nan')):.3f}"
            f" | {pruned} | {logical} |")


def scaling_row(r: dict) -> str:
    p = r["steps"]["plain"]
    coll = ", ".join(f"{n} {op}" for op, n in p["collectives"].items())
    return (f"| {r['topology']} | {r['chips']} | {p['hbm_bytes'] / GiB:.3f} | {coll} | "
            f"{p['collectives_s'] * 1e3:.3f} | {p['estimated_s'] * 1e3:.2f} | "
            f"{p['images_per_s']:.0f} |")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("steps", "scaling"):
        print(__doc__, file=sys.stderr)
        return 2
    results = sorted((_load(p) for p in argv[2:]), key=lambda r: (r["topology"].split(":")[0],
                                                                   r["chips"]))
    if argv[1] == "steps":
        print("| slice | dense step ms | images/s per chip | HBM GiB per chip | SAP / plain | "
              "pruned speed-up, uniform (MAC ratio) | pruned speed-up, rounded to 128 | "
              "the same without padding modelled (uniform / 128) |")
        print("|---|---|---|---|---|---|---|---|")
        rows = [steps_row(r) for r in results]
    else:
        print("| slice | chips | HBM GiB per chip | collectives | all-reduce ms | step ms | "
              "images/s per chip |")
        print("|---|---|---|---|---|---|---|")
        rows = [scaling_row(r) for r in results]
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
