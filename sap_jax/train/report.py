"""The end of a run: a summary table, ``results.json`` and PNG plots in the workdir."""

from __future__ import annotations

import json
from typing import Any

from sap_jax.runtime import speed
from sap_jax.runtime.console import human
from sap_jax.structure import flops
from sap_jax.train.spec import RunSpec


def results(spec: RunSpec, meta: dict[str, Any], before: flops.Counts, after: flops.Counts,
            final_acc: float, dense_structure, pruned_structure, *,
            config: dict[str, Any], latency: dict[str, Any] | None = None,
            budget_ratio: float | None = None) -> dict[str, Any]:
    """Everything a run reports, JSON-ready.

    Args:
      spec: the run's spec (model, dataset, budget, selector).
      meta: the run's :class:`~sap_jax.train.state.Progress` as JSON.
      before, after: the dense and the pruned model's counts.
      final_acc: the fine-tuned model's test accuracy.
      dense_structure, pruned_structure: the two models' channel groups.
      config: the run's config as JSON (``config.to_json_dict``), recorded as it was given.
      latency: with budget.metric "latency": ``estimated_ratio`` (the whole forward's),
        ``budget_ratio`` (over budget.scope) and the table's ``device``, ``batch``, ``dtype``,
        ``points`` and ``reps``.
      budget_ratio: the cut model's ratio under the budget's metric and scope, as the cut
        measures it (``cut.widths_ratio``): what p bounds.
    """
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "model": spec.model.name, "dataset": spec.data.dataset, "image_size": spec.image_size,
        "p": spec.budget.p, "budget_scope": spec.budget.scope,
        "budget_metric": spec.budget.metric,  # what p bounds: "macs" or "latency"
        # The cut model's ratio under budget_metric over budget_scope, and whether it is within
        # p: False when no widths the cut may take reach p (one channel per group at least, on
        # budget.round_to's multiples or the latency table's steps) or budget.enforce is off.
        "budget_ratio": budget_ratio,
        "budget_met": None if budget_ratio is None else bool(budget_ratio <= spec.budget.p + 1e-9),
        # The pruned model's forward time over the dense one's, estimated from the latency
        # table (metric "latency"; the measured one is latency_ratio_measured, with speed).
        "latency_ratio_estimated": (latency or {}).get("estimated_ratio"),
        "latency_ratio_measured": None,  # set with the speed measurement (at the table's batch)
        "latency_table": ({k: v for k, v in latency.items() if k != "estimated_ratio"}
                          if latency else None),
        "dense_acc": meta.get("dense_acc"),
        "subnet_acc_at_cut": meta.get("subnet_acc_at_cut"),
        "cut_acc": meta.get("cut_acc"),  # extracted model, BN statistics as trained
        # ... with BN statistics re-estimated (cut.bn_batches)
        "cut_acc_bn": meta.get("cut_acc_bn"),
        "best_subnet_val_acc": meta.get("best_subnet_val_acc"),
        "best_subnet_epoch": meta.get("best_subnet_epoch"),
        "final_acc": final_acc,
        # Which split each number comes from: choices read only "val".
        "splits": {"dense_acc": "test", "cut_acc": "test", "cut_acc_bn": "test",
                   "subnet_acc_at_cut": "test", "final_acc": "test", "best_subnet_val_acc": "val",
                   "history.test_acc": "test", "history.val_acc": "val",
                   "history.subnet_val_acc": "val", "history.subnet_val_acc_bn": "val",
                   "history.ft_test_acc": "test", "history.ft_val_acc": "val"},
        # Alignment: mean norm of the dropped channels over that of the kept ones (0 = a free cut).
        "alignment_ratio_at_cut": meta.get("alignment_ratio_at_cut"),
        # The generator's own (deterministic) ratio, under budget_metric, at the end of the search.
        "generator_ratio": ((meta.get("history", {}).get("budget_ratio")
                             or meta.get("history", {}).get("mac_ratio") or [None])[-1]
                            if spec.sap.selector == "agn" else None),
        "saturated_epochs": meta.get("saturated_epochs", 0),
        # the images fine-tuning draws its batches from: the training split's, and the
        # validation split's too with val_in_finetune (steps_per_epoch may cap an epoch)
        "finetune_examples": meta.get("finetune_examples"),
        # AGN steps that ended with the adaptive lambda at lam * lam_max_scale, of agn_steps
        "lam_capped_steps": meta.get("lam_capped_steps", 0),
        "agn_steps": meta.get("agn_steps", 0),
        "macs_before": before.macs, "macs_after": after.macs,
        "macs_ratio": ratio(after.macs, before.macs),
        "prunable_macs_before": before.prunable_macs, "prunable_macs_after": after.prunable_macs,
        "prunable_macs_ratio": ratio(after.prunable_macs, before.prunable_macs),
        # MAC ratio (over budget_scope) of the architecture chosen for the cut, before any
        # trimming to the budget (budget.enforce) or rounding (budget.round_to)
        "chosen_arch_ratio": meta.get("arch_ratio_chosen"),
        # Where the cut's architecture came from: "generator" (its last v), "generator_best",
        # "generator_last_within_p" (its latest v within p, when the last one was just over) or
        # "norm"; last_arch_ratio is the over-budget ratio it replaced.
        "arch_source": meta.get("arch_source"),
        "last_arch_ratio": meta.get("arch_ratio_last"),
        "budget_enforced": bool(spec.budget.enforce),
        "trimmed_channels": meta.get("trimmed_channels", 0),  # dropped by budget.enforce
        "round_to": meta.get("round_to"),  # kept-width multiple applied at the cut (1 = none)
        "widths_before_rounding": meta.get("widths_before_rounding"),  # after trimming
        "params_before": before.params, "params_after": after.params,
        "params_ratio": ratio(after.params, before.params),
        "group_names": list(dense_structure.group_names),
        "dense_widths": list(dense_structure.widths),
        "widths": list(pruned_structure.widths),
        "times_s": dict(meta.get("times", {})),
        "skipped_steps": meta.get("skipped_steps", 0),
        "history": meta.get("history", {}),
        "config": config,
    }


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def summary(r: dict[str, Any]) -> str:
    """A human-readable table of a run's results."""
    lines = [
        f"SAP {r['model']} on {r['dataset']} ({r['image_size']}px), budget p = {r['p']} "
        f"of {_budget_words(r)}",
        "",
        f"  {'accuracy':<38} {'':>10}",
        f"  {'dense model':<38} {_pct(r['dense_acc']):>10}",
        f"  {'right after the cut (BN as trained)':<38} {_pct(r['cut_acc']):>10}",
        f"  {'right after the cut (BN re-estimated)':<38} {_pct(r.get('cut_acc_bn')):>10}",
        f"  {'final (after fine-tuning)':<38} {_pct(r['final_acc']):>10}",
        "",
        f"  {'':<18} {'before':>10} {'after':>10} {'ratio':>8}",
    ]
    for label, key in (("MACs", "macs"), ("MACs prunable", "prunable_macs"), ("params", "params")):
        b, a = r[f"{key}_before"], r[f"{key}_after"]
        lines.append(f"  {label:<18} {human(b):>10} {human(a):>10} {a / b:>8.1%}")
    if r.get("alignment_ratio_at_cut") is not None:
        lines.append(f"  alignment at the cut: dropped channels' mean norm is "
                     f"{r['alignment_ratio_at_cut']:.3f} of the kept ones'")
    lines += _notes(r)
    if r.get("speed"):
        lines += [""] + speed.summary_lines(r["speed"], r.get("budget_metric") or "macs")
        if r["speed"].get("host_memory"):
            lines.append(f"  host memory: {r['speed']['host_memory']}")
    lines += ["", "  wall time per phase: " + ", ".join(
        f"{k} {v:.1f}s" for k, v in r["times_s"].items())]
    cache = r.get("compile_cache") or {}
    if cache.get("directory"):
        lines.append(f"  compilation cache: {cache['loaded']} of {cache['requests']} programs "
                     f"loaded, {cache['saved_s']:.1f}s of compiling saved "
                     f"({cache['directory']})")
    return "\n".join(lines)


def brief(r: dict[str, Any], workdir: Any) -> str:
    """What the terminal shows at the end: the headline figures in a few lines (the tables
    are in summary.txt)."""
    bn = r.get("cut_acc_bn")
    acc = (f"dense {_pct(r['dense_acc'])}, after the cut {_pct(r['cut_acc'])}"
           + (f" ({_pct(bn)} with BN re-estimated)" if bn is not None else "")
           + f", final {_pct(r['final_acc'])}")
    size = (f"MACs {human(r['macs_before'])} -> {human(r['macs_after'])} "
            f"({r['macs_after'] / r['macs_before']:.1%}; prunable "
            f"{r['prunable_macs_after'] / r['prunable_macs_before']:.1%}), params "
            f"{human(r['params_before'])} -> {human(r['params_after'])} "
            f"({r['params_after'] / r['params_before']:.1%})")
    if r.get("alignment_ratio_at_cut") is not None:
        size += f"; alignment {r['alignment_ratio_at_cut']:.3f}"
    lines = [f"SAP {r['model']} on {r['dataset']} ({r['image_size']}px), budget p = {r['p']} "
             f"of {_budget_words(r)}", "  accuracy: " + acc, "  " + size, *_notes(r)]
    if r.get("speed"):
        lines.append(speed.brief_line(r["speed"], r.get("budget_metric") or "macs"))
    lines.append("  wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["times_s"].items())
                 + f"; full report: {workdir}/summary.txt")
    return "\n".join(lines)


def _notes(r: dict[str, Any]) -> list[str]:
    """What a reader must know about how the cut met the budget."""
    lines = []
    chosen = r.get("chosen_arch_ratio")
    if chosen is not None and chosen > r["p"]:
        trimmed = r.get("trimmed_channels", 0)
        toward = "toward" if r.get("budget_met") is False else "to meet"
        lines.append(f"  the chosen architecture kept {chosen:.1%} of {_budget_words(r)}, "
                     "over p; "
                     + (f"its {trimmed} lowest-norm kept channels were dropped at the cut "
                        f"{toward} p" if r.get("budget_enforced")
                        else "cut as chosen (budget.enforce = False)"))
    if r.get("budget_met") is False:
        why = ("budget.enforce = False" if not r.get("budget_enforced") else
               "no widths the cut may take reach it: one channel per group at least, on "
               + ("the latency table's steps" if r.get("round_to") == 0 else
                  f"multiples of {r['round_to']}" if (r.get("round_to") or 1) > 1 else
                  "whole channels")
               + (" (a lower p is beyond this model on the table's device)"
                  if r.get("budget_metric") == "latency" else ""))
        lines.append(f"  warning: the cut model keeps {r['budget_ratio']:.1%} of "
                     f"{_budget_words(r)}, OVER the budget p = {r['p']}: {why}")
    if r.get("arch_source") == "generator_last_within_p":
        lines.append(f"  the generator's last architecture kept {r['last_arch_ratio']:.1%} of "
                     f"{_budget_words(r)}, just over p: the cut took its latest one within p")
    if r.get("saturated_epochs"):
        lines.append(f"  warning: the generator was saturated above p in {r['saturated_epochs']} "
                     "search epochs (see the log)")
    if r.get("lam_capped_steps"):
        lines.append(f"  the adaptive lambda sat at its cap (budget.lam_max_scale) after "
                     f"{r['lam_capped_steps']} of {r.get('agn_steps', 0)} generator steps")
    if (r.get("round_to") or 1) > 1:
        lines.append(f"  kept widths rounded to multiples of {r['round_to']} (budget.round_to)")
    elif r.get("round_to") == 0:
        lines.append("  kept widths moved to where the latency table's time steps up "
                     "(budget.round_to = 0)")
    if r.get("latency_ratio_estimated") is not None:
        measured = r.get("latency_ratio_measured")
        est = r["latency_ratio_estimated"]
        lines.append(f"  forward time, pruned over dense: estimated {est:.1%}"
                     + (f", measured {measured:.1%}" if measured is not None else "")
                     + f" (table: {r['latency_table']['device']['kind']}, batch "
                     f"{r['latency_table']['batch']})")
    return lines


def _budget_words(r: dict[str, Any]) -> str:
    """What p is a fraction of: "prunable MACs", "total estimated latency", ..."""
    if r.get("budget_metric") == "latency":
        return f"{r['budget_scope']} estimated latency"
    return f"{r['budget_scope']} MACs"


def write(workdir: str, r: dict[str, Any], *, plots: bool = True) -> None:
    """``results.json`` (atomically) and, if asked, the PNG plots."""
    from sap_jax.runtime import parallel

    root = parallel.path(workdir)
    parallel.write_text_atomic(root / "results.json", json.dumps(r, indent=2))
    parallel.write_text_atomic(root / "summary.txt", summary(r) + "\n")
    if plots:
        write_plots(workdir, r)


def _save(fig, workdir: str, name: str) -> str:
    """Save a figure as PNG into ``workdir`` (local or remote) and return its path."""
    import io

    from sap_jax.runtime import parallel

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    target = parallel.path(workdir) / name
    target.write_bytes(buf.getvalue())
    return str(target)


def write_plots(workdir: str, r: dict[str, Any]) -> list[str]:
    """accuracy.png, hamming.png and widths.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for draw, name, size in ((_plot_accuracy, "accuracy.png", (7, 4)),
                             (_plot_hamming, "hamming.png", (7, 4)),
                             (_plot_widths, "widths.png",
                              (max(6, 0.25 * len(r["widths"]) + 2), 4.5))):
        fig, ax = plt.subplots(figsize=size)
        draw(ax, r)
        out.append(_save(fig, workdir, name))
        plt.close(fig)
    return out


def _plot_accuracy(ax, r: dict[str, Any]) -> None:
    h = r["history"]
    if h.get("test_acc"):
        ax.plot(h["epoch"], h["test_acc"], label="dense model")
    for key, label in (("subnet_val_acc", "sub-network (gated by v), validation"),
                       ("subnet_val_acc_bn", "sub-network, BN re-estimated, validation")):
        if h.get(key):
            e0 = len(h["epoch"]) - len(h[key])
            ax.plot(h["epoch"][e0:], h[key], label=label)
    if h.get("ft_test_acc"):
        last = h["epoch"][-1] if h.get("epoch") else 0
        ax.plot([last + e for e in h["ft_epoch"]], h["ft_test_acc"],
                label="pruned model, fine-tuning")
    e_start = (r.get("config") or {}).get("sap", {}).get("e_start")
    if e_start is not None and h.get("epoch"):
        for x, text, style in ((e_start + 0.5, "search starts", dict(color="grey", ls=":")),
                               (h["epoch"][-1] + 0.5, "cut", dict(color="black", ls="--"))):
            ax.axvline(x, lw=1, **style)
            ax.annotate(text, (x, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=8, color=style["color"], ha="right", va="top")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{r['model']} on {r['dataset']}, p = {r['p']}")
    ax.legend()
    ax.grid(alpha=0.3)


def _plot_hamming(ax, r: dict[str, Any]) -> None:
    h = r["history"]
    if h.get("hamming"):
        e0 = len(h["epoch"]) - len(h["hamming"])
        ax.plot(h["epoch"][e0:], h["hamming"], marker="o")
    ax.axhline(0.05, color="grey", ls="--", lw=1, label="5%: the architecture counts as settled")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of channels whose keep/drop\nchanged since the previous epoch")
    ax.set_title("how much the chosen architecture still moves")
    ax.legend()
    ax.grid(alpha=0.3)


def _plot_widths(ax, r: dict[str, Any]) -> None:
    k = range(len(r["widths"]))
    ax.bar(k, r["dense_widths"], color="lightgrey", label="original")
    ax.bar(k, r["widths"], color="tab:blue", label="kept")
    names = r.get("group_names") or []
    if names and len(names) <= 32:  # every group by name
        ax.set_xticks(list(k), names, rotation=90, fontsize=7)
    elif names:  # many groups: one tick per stage (the name up to its last part)
        stages = [n.rsplit(".", 1)[0] for n in names]
        first = [i for i, st in enumerate(stages) if i == 0 or st != stages[i - 1]]
        ax.set_xticks(first, [stages[i] for i in first], rotation=90, fontsize=7)
    ax.set_xlabel("channel group")
    ax.set_ylabel("channels")
    ax.set_title(f"kept widths: MACs {r['macs_ratio']:.1%} of dense")
    ax.legend()
