"""How does the search behave? Run a config's dense training and search (no fine-tuning) and print,
per search epoch, the generator's MAC ratio, its sensitive-band share, the alignment ratio, the
sub-network's validation accuracy and the adaptive lambda; validation-split numbers only (a probe
guides choices, and no choice reads the test split).

    python -m experiments.search_probe NAME [field=value ...] [--config quickstart]
        [--workdir /tmp/sap_probe]

e.g. ``python -m experiments.search_probe lineage budget.p=0.3 budget.lam_rate=0.0 agn.b2=0.999``.
Values are Python literals; strings may be bare. docs/method.md §6 was measured with it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def override(c, assignment: str) -> None:
    key, _, text = assignment.partition("=")
    node = c
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string
    node[last] = value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="*", help="field=value")
    ap.add_argument("--config", default="quickstart", help="a module of configs/")
    ap.add_argument("--workdir", default="/tmp/sap_probe")
    args = ap.parse_intermixed_args(argv)
    from absl import logging

    from sap_jax import train

    logging.set_verbosity(logging.WARNING)
    c = importlib.import_module(f"configs.{args.config}").get_config()
    c.finetune.num_epochs, c.speed.enabled, c.plots = 0, False, False
    c.compile_cache = os.path.join(args.workdir, "compile_cache")
    for a in args.overrides:
        override(c, a)
    wd = os.path.join(args.workdir, args.name)
    shutil.rmtree(wd, ignore_errors=True)
    t0 = time.time()
    r = train.train_and_evaluate(c, wd)
    h = r["history"]
    row = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"{args.name} ({' '.join(args.overrides)}): {time.time() - t0:.0f} s")
    for key in ("mac_ratio", "band_share", "alignment_ratio", "subnet_val_acc", "subnet_val_acc_bn",
                "agn_lam"):
        print(f"  {key:<18} {row(h.get(key, []))}")
    # The validation split only: the probe guides choices, and choices never read the test split.
    print(f"  dense val acc {h['val_acc'][-1]:.4f}, best sub-network val acc "
          f"{r['best_subnet_val_acc']:.4f}, chosen ratio {r['chosen_arch_ratio']:.4f}, "
          f"trimmed {r['trimmed_channels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
