"""Inspect a model before (or after) pruning.

    python -m sap_jax.info --model=resnet56 [--image-size 32] [--json]
    python -m sap_jax.info --pruned=DIR [--image-size N] [--json]

The first form lists the prunable channel groups and the dense MACs/params
(total and prunable). The second reads a saved (pruned) model directory and
prints the before/after table: per-group widths, MACs, params and ratios.
MACs are multiply-adds per image of convs and linear layers (see
``sap_jax/structure/flops.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sap_jax import models, surgery
from sap_jax.runtime.console import human
from sap_jax.structure import flops


def model_report(name: str, image_size: int | None = None) -> dict[str, Any]:
    """Groups and dense counts of the preset ``name`` as a JSON-ready dict."""
    preset = models.get_preset(name)
    size = preset.image_size if image_size is None else image_size
    model = models.create_abstract(name)
    s = model.structure(size)
    c = flops.count(s)
    return {"model": name, "class": type(model).__name__, "image_size": size,
            "macs": c.macs, "params": c.params, "prunable_macs": c.prunable_macs,
            "prunable_params": c.prunable_params,
            "groups": list(s.widths), "group_names": list(s.group_names)}


def pruned_report(directory: str, image_size: int | None = None) -> dict[str, Any]:
    """Before/after counts of a saved model directory (or of a run's workdir, which holds it
    in ``pruned_model/``) as a JSON-ready dict."""
    from sap_jax.runtime import parallel

    run_model = parallel.path(directory) / "pruned_model"
    if not surgery.is_saved_model(directory) and surgery.is_saved_model(run_model):
        directory = str(run_model)
    info = surgery.read_info(directory)
    cfg = info["config"]
    after = models.from_config(info["class"], cfg, abstract=True)
    before = models.from_config(info["class"], {**cfg, "widths": info["dense_widths"]},
                                abstract=True)
    size = image_size or info.get("image_size")
    if size is None:
        raise ValueError(f"{directory} does not record its input size; pass --image-size.")
    sb, sa = before.structure(size), after.structure(size)
    cb, ca = flops.count(sb), flops.count(sa)
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"directory": directory, "class": info["class"], "image_size": size,
            "macs": ca.macs, "params": ca.params, "prunable_macs": ca.prunable_macs,
            "prunable_params": ca.prunable_params,
            "dense": cb.as_dict(),
            "macs_ratio": ratio(ca.macs, cb.macs),
            "prunable_macs_ratio": ratio(ca.prunable_macs, cb.prunable_macs),
            "params_ratio": ratio(ca.params, cb.params),
            "groups": list(sa.widths), "dense_groups": list(sb.widths),
            "group_names": list(sa.group_names),
            "input": info.get("metadata", {}).get("input"),
            "metadata": {k: v for k, v in info.get("metadata", {}).items() if k != "input"}}


def format_input(x: dict[str, Any] | None) -> list[str]:
    """How to feed the model: size, layout, pixel range, normalisation and classes."""
    if not x:
        return ["input: not recorded (a model saved before sap_jax recorded its input)"]
    mean = ", ".join(f"{m:.4f}" for m in x["mean"])
    std = ", ".join(f"{s:.4f}" for s in x["std"])
    names = x.get("class_names")
    shown = "" if not names else ": " + ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return [f"input: {x['image_size']}x{x['image_size']} {x['channels']} {x['layout']}, pixels in "
            f"[{x['pixel_range'][0]:g}, {x['pixel_range'][1]:g}], then (x - mean) / std",
            f"  mean ({mean}), std ({std})",
            f"  {x['num_classes']} classes{shown}"]


def format_model(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} ({r['class']}), input {r['image_size']}x{r['image_size']}",
             f"{len(r['groups'])} prunable channel groups:",
             f"  {'#':>3}  {'group':<24} {'size':>6}"]
    lines += [f"  {k:>3}  {n:<24} {w:>6}" for k, (n, w) in
              enumerate(zip(r["group_names"], r["groups"]))]
    lines += ["",
              f"MACs   total {human(r['macs']):>9}  prunable {human(r['prunable_macs']):>9} "
              f"({r['prunable_macs'] / r['macs']:.1%})",
              f"params total {human(r['params']):>9}  prunable {human(r['prunable_params']):>9} "
              f"({r['prunable_params'] / r['params']:.1%})"]
    return "\n".join(lines)


def format_pruned(r: dict[str, Any]) -> str:
    d = r["dense"]
    lines = [f"saved {r['class']} in {r['directory']}, input {r['image_size']}x{r['image_size']}",
             f"  {'#':>3}  {'group':<24} {'before':>7} {'after':>7} {'kept':>7}"]
    lines += [f"  {k:>3}  {n:<24} {b:>7} {a:>7} {a / b:>7.1%}" for k, (n, b, a) in
              enumerate(zip(r["group_names"], r["dense_groups"], r["groups"]))]
    lines += ["", f"  {'':<18} {'before':>10} {'after':>10} {'ratio':>7}"]
    for label, key in (("MACs total", "macs"), ("MACs prunable", "prunable_macs"),
                       ("params total", "params"), ("params prunable", "prunable_params")):
        b, a = d[key], r[key]
        lines.append(f"  {label:<18} {human(b):>10} {human(a):>10} {a / b:>7.1%}")
    lines += [""] + format_input(r.get("input"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sap_jax.info",
                                 description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help=f"a model name: {', '.join(models.names())}")
    src.add_argument("--pruned", metavar="DIR", help="a directory written by sap_jax.surgery.save, "
                     "or a run's workdir (its pruned_model/)")
    ap.add_argument("--image-size", "--image_size", type=int, default=None,
                    help="input height = width (default: the model's own, 32 or 224)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    try:
        if args.model:
            r = model_report(args.model, args.image_size)
            text = format_model(r)
        else:
            r = pruned_report(args.pruned, args.image_size)
            text = format_pruned(r)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
