"""The run, start to end: dense training -> search + alignment -> cut -> fine-tuning -> report.

:func:`train_and_evaluate` validates the config and reads it once, into a typed run spec
(:mod:`sap_jax.train.spec`) held by an :class:`Env` (with the data, mesh, writers and
checkpoints), restores or initialises the typed state (:mod:`sap_jax.train.state`), and runs
the phases in order; every phase's epochs go through the one loop of :mod:`sap_jax.train.loop`.
A run can be stopped at any time and resumes from the latest checkpoint in its workdir.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from sap_jax import models, surgery
from sap_jax.method import cut
from sap_jax.runtime import console, host_memory, parallel, provenance, speed, summaries
from sap_jax.runtime.errors import ConfigError, Preempted
from sap_jax.structure import flops
from sap_jax.structure import norms as norms_lib
from sap_jax.structure.codec import ModuleCodec
from sap_jax.surgery import pretrained
from sap_jax.train import bnstats, checkpoints, loop, preflight, report, search, steps, tables
from sap_jax.train import config as config_lib
from sap_jax.train import data as data_lib
from sap_jax.train import spec as spec_lib
from sap_jax.train import state as state_lib
from sap_jax.train.state import Progress

PRUNED_DIR = "pruned_model"
#: The starting weights' accuracy when the run began from ``init_from``.
INIT_FILE = "init_from.json"
#: The data-order "epoch" of the batches that re-estimate BN statistics: far from any training
#: epoch, so they are a fixed draw of their own.
BN_EPOCH = 10**6


@dataclasses.dataclass
class Programs:
    """Everything compiled for one model shape."""

    model: models.PrunableModel
    structure: Any
    codec: ModuleCodec
    eval_step: Callable
    bn_step: Callable
    train_step: Callable | None = None
    tx: optax.GradientTransformation | None = None


def _check_writable(workdir) -> None:
    """Create ``workdir`` and write a file in it, before anything compiles; a ConfigError (exit
    code 2) naming the path if that fails."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".sap_jax_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be written ({type(e).__name__}: "
                          f"{e.strerror or e}): choose a --workdir you can write to.") from e


class Env:
    """What every phase reads: the run's spec, data, mesh, writers, checkpoints and hooks.

    The config is read once, into :attr:`spec` (:mod:`sap_jax.train.spec`); below here nothing
    reads it. Its JSON (:attr:`config_json`) is kept only as a record, for results.json. The
    budget's two targets have their own objects: :attr:`cut_policy` (its ``p`` is
    ``budget.p``, what the cut meets) and :attr:`generator_loss` (its ``p`` is
    ``budget.generator_target``, what the generator aims at).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, hooks: loop.Hooks,
                 allow_config_change: bool = False):
        # A process setting that takes effect only before JAX starts its backend, which
        # validation does (it counts devices); the command line has applied it already.
        host_memory.apply_config_value(config.get("host_memory"))
        config_lib.validate(config)
        self.spec = spec = spec_lib.from_config(config)
        self.workdir, self.hooks = parallel.path(workdir), hooks
        problem = None
        if jax.process_index() == 0:
            try:
                _check_writable(self.workdir)
            except ConfigError as e:
                problem = e
            else:
                marker = self.workdir / checkpoints.PREEMPTED_MARKER  # from the previous start
                if marker.exists():
                    marker.unlink()
        # Every process learns of process 0's failure and stops too, instead of waiting for it
        # at the next barrier until the job's time-out.
        if parallel.any_process(problem is not None):
            raise problem or ConfigError(f"workdir {self.workdir} cannot be written (process "
                                         "0 names the reason): choose a --workdir you can write "
                                         "to.")
        # The config itself is the subject here: the workdir's record and the checkpoints' hash.
        accept = checkpoints.check_workdir_config(self.workdir, config,
                                                  allow_change=allow_config_change)
        self.config_json = config_lib.to_json_dict(config)
        self.mesh = parallel.make_mesh()
        d = spec.data
        self.data = data_lib.load(d.dataset, image_size=spec.image_size, seed=spec.seed,
                                  subset_fraction=spec.sap.subset_fraction,
                                  val_size=d.val_size, data_dir=d.data_dir,
                                  shuffle_buffer=d.shuffle_buffer)
        self.dtype = jnp.dtype(spec.dtype)
        self.spe = d.steps_per_epoch or self.data.steps_per_epoch(d.batch_size)
        # Fine-tuning may also train on the validation images (data.val_in_finetune).
        self.ft_with_val = bool(d.val_in_finetune and self.data.info.val_size)
        self.spe_ft = d.steps_per_epoch or self.data.steps_per_epoch(d.batch_size,
                                                                     self.ft_with_val)
        total = spec.optim.num_epochs * self.spe + spec.finetune.num_epochs * self.spe_ft
        self.progress_line = console.ProgressLine(total, enabled=jax.process_index() == 0)
        self.ckpts = checkpoints.Checkpoints(self.workdir, keep=spec.keep_checkpoints,
                                             config_hash=checkpoints.config_hash(config),
                                             accept=accept)
        self.key = jax.random.key(spec.seed)
        # With metric "latency", the table, measured before anything else compiles.
        self.latency_table = tables.for_run(spec, self.workdir, lambda: self.model(None))
        if self.latency_table is not None:
            try:
                self.latency_table.check_matches(self.model_abstract().structure(spec.image_size))
            except ValueError as e:
                raise ConfigError(f"budget.latency_table: {e}") from None
        # The budget's two targets, built once, as validation built them.
        self.cut_policy = spec_lib.cut_policy(spec.budget, backend=jax.default_backend(),
                                              table=self.latency_table)
        self.generator_loss = spec_lib.resource_loss(spec.budget, table=self.latency_table)
        # Last, so nothing above can fail with the writer (a thread, a file) open;
        # train_and_evaluate closes it.
        self.writer = summaries.Summaries(str(self.workdir), enabled=jax.process_index() == 0,
                                          total_steps=total, every_steps=spec.log_every_steps)
        self.report_progress = self.writer.report_progress
        self.watch: checkpoints.PreemptionWatch | None = None  # set while the phases run
        self.cache_stats: parallel.CacheStats | None = None
        self.remeasure_speed = False  # set by train_and_evaluate for a finished run

    def model_metadata(self, stage: str, **extra: Any) -> dict[str, Any]:
        """What a saved model carries so it can be used without this config (model.json):
        its input (size, normalisation, classes), the dataset, the budget and the stage."""
        return {"dataset": self.spec.data.dataset, "p": self.spec.budget.p, "stage": stage,
                "input": self.data.info.model_input(), **extra}

    def model_abstract(self) -> models.PrunableModel:
        """The dense model without arrays (its structure, its config)."""
        return nnx.eval_shape(lambda: self.model(None))

    def model(self, widths: Sequence[int] | None) -> models.PrunableModel:
        return tables.model_for(self.spec, self.data.info.num_classes,
                                None if widths is None else list(widths))

    def programs(self, widths: Sequence[int] | None, phase: str,
                 model: models.PrunableModel | None = None) -> Programs:
        """The compiled steps of the model at ``widths`` for ``phase`` ("search"/"finetune")."""
        spec = self.spec
        # A given model (the extracted one) spares a random initialisation: on CPU that compiles
        # one small program per new parameter shape, ~30 s for a pruned ResNet-20.
        model = self.model(widths) if model is None else model
        structure = model.structure(spec.image_size)
        codec = ModuleCodec(model)
        progs = Programs(model, structure, codec,
                         steps.make_eval_step(codec, self.dtype, structure),
                         bnstats.make_batch_stats_step(codec, self.dtype))
        progs.tx, progs.train_step = steps.make_weight_step(
            codec, structure, spec.optim if phase == "search" else spec.finetune, spec.sap,
            phase=phase, steps_per_epoch=self.spe if phase == "search" else self.spe_ft,
            batch_size=spec.data.batch_size,
            dtype=self.dtype, skip_nonfinite=spec.on_nonfinite == "skip")
        return progs

    def evaluate(self, progs: Programs, params: Any, rest: Any, arch,
                 split: str = "test") -> tuple[float, float]:
        """Accuracy and loss on ``split``: "val" for every choice, "test" only for reporting.
        NaN for an empty split (val_size = 0)."""
        sums = None
        for b in self.data.eval_batches(self.spec.data.eval_batch_size, split):
            out = progs.eval_step(params, rest, parallel.global_batch(b, self.mesh), arch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if sums is None:
            return float("nan"), float("nan")
        s = state_lib.to_host(sums)
        n = max(float(s["count"]), 1.0)
        return float(s["correct"]) / n, float(s["loss"]) / n

    def bn_reestimated(self, progs: Programs, params: Any, rest: Any, arch) -> Any:
        """``rest`` with BN statistics re-estimated on ``cut.bn_batches`` training batches
        (unchanged when that is 0)."""
        n = self.spec.cut.bn_batches
        if not n:
            return rest
        batches = (parallel.global_batch(b, self.mesh)
                   for b in self.data.train_batches(BN_EPOCH, self.spec.data.batch_size, n))
        return bnstats.reestimate(progs.bn_step, params, rest, batches, arch)


# -- the cut ----------------------------------------------------------------------------------

def chosen_arch(env: Env, state: state_lib.SearchState, prog: Progress, structure) -> Any:
    """The architecture the search hands to the cut, and where it came from (``prog``)."""
    s, policy = env.spec.sap, env.cut_policy
    final = state.best_arch if s.final_arch == "best" else state.arch
    prog.arch_source = ("norm" if s.selector == "norm"
                        else {"last": "generator", "best": "generator_best"}[s.final_arch])
    ratio = cut.widths_ratio(structure, [int(np.sum(v)) for v in state_lib.to_host(final)],
                             policy.scope, table=policy.table)
    # A generator that hovers at p may end one channel over it: take its latest in-budget v
    # if that came within the last search epoch (one AGN step per agn_every weight steps).
    age = int(state_lib.to_host(state.fit_age))
    if (prog.arch_source == "generator" and ratio > policy.p
            and age <= max(1, env.spe // s.agn_every)):
        logging.info("the generator's last architecture keeps %.2f%% of %s %s, over p = %s; "
                     "the cut takes its latest one within p, from %d AGN steps earlier",
                     100 * ratio, policy.scope, env.spec.budget.metric, policy.p, age)
        prog.arch_ratio_last, prog.arch_source = ratio, "generator_last_within_p"
        final = state.fit_arch
    return final


def cut_phase(env: Env, dense: Programs, state: state_lib.SearchState,
              prog: Progress) -> tuple[Programs, state_lib.Weights]:
    """Cut the chosen architecture out of the dense model; measure it; save it. Returns the
    pruned model's programs and its fresh fine-tuning weights."""
    t0 = time.perf_counter()
    final = chosen_arch(env, state, prog, dense.structure)
    params, rest, chosen = state_lib.to_host((state.params, state.rest, final))
    policy = env.cut_policy
    arch, rep = cut.final_arch(dense.structure, chosen, lambda: norms_lib.channel_norms(
        params, dense.structure, env.spec.sap.norm), policy)
    prog.arch_ratio_chosen, prog.trimmed_channels, prog.round_to = (
        rep.chosen_ratio, rep.trimmed_channels, rep.round_to)
    prog.widths_before_rounding = list(rep.kept)
    if rep.trimmed_channels:
        logging.warning("the chosen architecture keeps %.2f%% of %s %s, over p = %s: dropped "
                        "its %d lowest-norm kept channels to meet p (budget.enforce)",
                        100 * rep.chosen_ratio, policy.scope, env.spec.budget.metric, policy.p,
                        rep.trimmed_channels)
    if rep.widths != rep.kept:  # hardware-friendly widths, still within the budget
        logging.info("widths rounded (%s): %s -> %s", f"multiples of {rep.round_to}"
                     if rep.round_to else "the latency table's steps", rep.kept, rep.widths)
    changed = any(not np.array_equal(a, h) for a, h in zip(arch, chosen))
    if changed:
        final = parallel.replicate(arch, env.mesh)
    pruned_model = surgery.extract(dense.codec.merge(params, rest), arch)
    widths = list(pruned_model.widths)
    surgery.save(env.workdir / PRUNED_DIR, pruned_model, dense_widths=dense.model.widths,
                 image_size=env.spec.image_size, overwrite=True,
                 metadata=env.model_metadata("after_cut"))
    pruned = env.programs(widths, "finetune", pruned_model)
    ft = parallel.replicate(state_lib.to_host(state_lib.fresh_weights(pruned, env.key)), env.mesh)
    ft = measure_cut(env, dense, pruned, state, ft, final, prog)
    prog.add_time("cut", time.perf_counter() - t0)
    prog.phase, prog.epoch, prog.widths = "finetune", 0, widths
    prog.finetune_examples = env.data.info.training_examples(env.ft_with_val)
    loop.save(env, ft, prog)
    return pruned, ft


def measure_cut(env: Env, dense: Programs, pruned: Programs, state: state_lib.SearchState,
                ft: state_lib.Weights, final, prog: Progress) -> state_lib.Weights:
    """Accuracy right after the cut (BN as trained and re-estimated) and the alignment there.
    Returns ``ft`` with the re-estimated BN statistics when ``cut.bn_batches`` is set (the
    extracted model is fine-tuned with them)."""
    ones = [jnp.ones(w) for w in pruned.model.widths]
    prog.cut_acc, _ = env.evaluate(pruned, ft.params, ft.rest, ones)
    prog.subnet_acc_at_cut, _ = env.evaluate(dense, state.params, state.rest, final)
    drop, keep = steps.make_norms(dense.structure, env.spec.sap.include_bn)(state.params, final)
    prog.alignment_ratio_at_cut = float(drop) / max(float(keep), 1e-12)
    if env.spec.cut.bn_batches:  # the extracted model measured, and fine-tuned, with its own
        ft = ft.replace(rest=env.bn_reestimated(pruned, ft.params, ft.rest, ones))  # statistics
        prog.cut_acc_bn, _ = env.evaluate(pruned, ft.params, ft.rest, ones)
    logging.info("cut: widths %s; accuracy %.4f raw, %s with BN re-estimated (gated dense "
                 "%.4f); alignment ratio %.3f", list(pruned.model.widths), prog.cut_acc,
                 "-" if prog.cut_acc_bn is None else f"{prog.cut_acc_bn:.4f}",
                 prog.subnet_acc_at_cut, prog.alignment_ratio_at_cut)
    return ft


# -- fine-tuning and the end ------------------------------------------------------------------

def finetune_phase(env: Env, progs: Programs, prog: Progress) -> loop.Phase:
    n, every = env.spec.finetune.num_epochs, env.spec.checkpoint_every_epochs
    ones = [jnp.ones(w) for w in progs.model.widths]

    def end_epoch(epoch: int, state: state_lib.Weights, train_loss: float,
                  _agn: list) -> state_lib.Weights:
        acc, loss = env.evaluate(progs, state.params, state.rest, ones)
        prog.log(ft_epoch=epoch + 1, ft_test_acc=acc, ft_train_loss=train_loss)
        if not env.ft_with_val and env.data.info.val_size:  # kept out: it can judge the result
            prog.log(ft_val_acc=env.evaluate(progs, state.params, state.rest, ones, "val")[0])
        env.writer.write_scalars(prog.step, {"finetune/test_acc": acc, "finetune/test_loss": loss})
        logging.info("fine-tune epoch %d/%d  test_acc %.4f  test_loss %.4f", epoch + 1, n, acc,
                     loss)
        return state

    return loop.Phase(num_epochs=n, train_step=progs.train_step, label=lambda e: "finetune",
                      penalty_arch=lambda st: ones, gamma=lambda e: jnp.float32(0.0),
                      must_save=lambda done: done == n or done % every == 0,
                      data_epoch_offset=env.spec.optim.num_epochs, end_epoch=end_epoch,
                      with_val=env.ft_with_val)


def _latency_estimate(env: Env, structure, widths: Sequence[int]) -> dict[str, Any] | None:
    """With a latency table: the pruned widths' estimated forward time over the dense one's."""
    t = env.latency_table
    if t is None:
        return None
    return {"estimated_ratio": float(t.ratio(structure, list(widths), "total")),
            "budget_ratio": float(t.ratio(structure, list(widths), env.spec.budget.scope)),
            "device": t.device, "batch": t.batch, "dtype": t.dtype, "created": t.created,
            "points": t.points, "reps": t.reps}


def _latency_measured(env: Env, s: dict[str, Any]) -> float | None:
    """The measured forward time, pruned over dense, at the latency table's batch: the
    reciprocal of the measured speed-up (the median of the interleaved rounds' ratios)."""
    t = env.latency_table
    row = next((r for r in s["batches"] if t is not None and r["batch"] == t.batch), None)
    return None if row is None else 1 / row["speedup"]


def _speed(env: Env, dense_model, pruned_model) -> dict[str, Any]:
    """The pruned model's inference timed against a dense one (``speed``), both as deployed:
    each BN folded into its conv (``surgery.fold_bn``, as ``sap_jax.export`` does); with a
    latency table, also at the table's batch, so its estimate meets a measurement."""
    size, sp = env.spec.image_size, env.spec.speed
    batches = tuple(sp.batch_sizes)
    if env.latency_table is not None and env.latency_table.batch not in batches:
        batches += (env.latency_table.batch,)
    macs = (flops.model_macs(dense_model, size), flops.model_macs(pruned_model, size))
    dense_model, pruned_model = (surgery.fold_bn(m, size) for m in (dense_model, pruned_model))
    return {"fold_bn": True, "host_memory": host_memory.status(),
            **speed.compare(dense_model, pruned_model, size, batches, macs=macs, reps=sp.reps,
                            dtype=env.dtype)}


def finish(env: Env, dense: Programs, pruned: Programs, state: state_lib.Weights,
           prog: Progress) -> dict[str, Any]:
    """Final accuracy, the fine-tuned model on disk, results.json, plots and the summary."""
    spec = env.spec
    ones = [jnp.ones(w) for w in pruned.model.widths]
    final_acc, _ = env.evaluate(pruned, state.params, state.rest, ones)
    params, rest = state_lib.to_host((state.params, state.rest))
    final_model = pruned.codec.merge(params, rest)
    surgery.save(env.workdir / PRUNED_DIR, final_model, dense_widths=dense.model.widths,
                 image_size=spec.image_size, overwrite=True,
                 metadata=env.model_metadata("fine_tuned", test_accuracy=final_acc))
    before, after = flops.count(dense.structure), flops.count(pruned.structure)
    policy = env.cut_policy  # the cut's own measure of the budget, on the widths it left
    results = report.results(spec, prog.to_json(), before, after, final_acc, dense.structure,
                             pruned.structure, config=env.config_json,
                             latency=_latency_estimate(env, dense.structure, pruned.model.widths),
                             budget_ratio=cut.widths_ratio(dense.structure, pruned.model.widths,
                                                           policy.scope, table=policy.table))
    if spec.speed.enabled:
        # Every process times its own first device (no collectives), so hosts stay in step;
        # process 0's figures are reported. The dense side is a fresh model of the same class
        # (the trained dense weights are gone after fine-tuning; values do not change speed).
        t0 = time.perf_counter()
        results["speed"] = _speed(env, env.model(None), final_model)
        results["times_s"]["speed"] = time.perf_counter() - t0
        results["latency_ratio_measured"] = _latency_measured(env, results["speed"])
    results["compile_cache"] = env.cache_stats.as_dict()  # this process's compilations
    results["config_changes"] = checkpoints.config_changes(env.workdir)
    init = env.workdir / INIT_FILE
    results["init_from"] = json.loads(init.read_text()) if init.exists() else None
    results["provenance"] = provenance.collect()
    results["devices"] = {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                          "count": jax.device_count(), "per_process": jax.local_device_count(),
                          "processes": jax.process_count()}
    if jax.process_index() == 0:
        report.write(env.workdir, results, plots=spec.plots)
    env.writer.flush()
    if jax.process_index() == 0:
        print(report.brief(results, env.workdir), flush=True)
    return results


# -- the driver -------------------------------------------------------------------------------

def _start(env: Env) -> Progress:
    meta = env.ckpts.latest_meta()
    if meta is None:
        logging.info("starting a new run in %s", env.workdir)
        return Progress()
    prog = Progress.from_json(meta)
    logging.info("resuming from checkpoint %d: phase %s, %d epochs and %d steps done",
                 prog.ckpt, prog.phase, prog.epoch, prog.step_in_epoch)
    return prog


def _finished(env: Env, prog: Progress) -> dict[str, Any] | None:
    """The results of a run that already finished in this workdir (its last checkpoint is the
    end of fine-tuning and results.json is written), else None."""
    path = env.workdir / "results.json"
    if (prog.phase != "finetune" or prog.epoch < env.spec.finetune.num_epochs
            or not path.exists()):
        return None
    return json.loads(path.read_text())


def _remeasure_speed(env: Env, done: dict[str, Any]) -> dict[str, Any]:
    """A finished run's results with the speed measured again; earlier figures are kept in
    ``speed_earlier`` (most recent last)."""
    pruned = surgery.load(env.workdir / PRUNED_DIR)
    new = _speed(env, env.model(None), pruned)
    earlier = done.get("speed_earlier") or []
    measured = ({"latency_ratio_measured": _latency_measured(env, new)}
                if env.latency_table is not None else {})
    done = {**done, "speed": new, **measured,
            "speed_earlier": earlier + ([done["speed"]] if done.get("speed") else [])}
    if jax.process_index() == 0:
        report.write(env.workdir, done, plots=False)
    return done


def _phases(env: Env) -> dict[str, Any]:
    prog = _start(env)
    done = _finished(env, prog)
    if done is not None:  # rerunning a finished run redoes nothing and rewrites nothing
        if env.remeasure_speed:
            logging.info("%s holds a finished run: measuring its speed again", env.workdir)
            done = _remeasure_speed(env, done)
        else:
            logging.info("%s holds a finished run: nothing to do (--remeasure_speed times it "
                         "again; delete its results.json to evaluate it again)", env.workdir)
        if jax.process_index() == 0:
            print(report.brief(done, env.workdir), flush=True)
        return done
    dense = env.programs(None, "search")
    if isinstance(dense.model, models.TracedModel):  # say what the tracer chose, and why
        for layer, why in dense.model.status().items():
            logging.info("traced %s: %s", layer, why)
    gen = search.make_generator(env.spec.agn, dense.model.widths, env.spec.seed)
    new_run = prog.phase == "search" and not prog.ckpt
    init_from = env.spec.model.init_from
    if new_run and init_from:
        n = pretrained.load_into(dense.model, init_from)
        logging.info("started from %s (%d tensors)", init_from, n)
    template = state_lib.fresh_search_state(dense, gen, env.key)
    prog.dense_widths = list(dense.model.widths)
    if prog.phase == "search":
        state = (env.ckpts.restore(template, env.mesh) if prog.ckpt
                 else parallel.replicate(template, env.mesh))
        phase = search.Search(env, dense, gen, prog, state.rng).phase()
        if env.spec.preflight:  # the cut is still ahead: try it now
            steps_left = prog.epoch < phase.num_epochs  # else resumed right before the cut
            times = preflight.check(
                env.spec, dense.model, env.mesh, env.workdir, env.data.info.num_classes,
                (lambda: loop.first_step(env, phase, state, prog)) if steps_left else None)
            logging.info("pre-flight: trial cut %.1f s, save and reload %.1f s, trial step "
                         "traced on the mesh %.1f s, first step compiled %.1f s",
                         times["cut_s"], times["save_load_s"], times["mesh_s"],
                         times.get("compile_s", 0.0))
        if new_run and init_from:
            _record_init(env, dense, state)
        env.hooks.phase("search")
        state = loop.run_epochs(env, phase, state, prog)
        prog.dense_acc = prog.history["test_acc"][-1]
        env.hooks.phase("cut")
        pruned, state = cut_phase(env, dense, state, prog)
        _stop_if_asked(env, prog, "after the cut")
    else:
        pruned = env.programs(prog.widths, "finetune")
        state = env.ckpts.restore(state_lib.to_host(state_lib.fresh_weights(pruned, env.key)),
                                  env.mesh)
    env.hooks.phase("finetune")
    state = loop.run_epochs(env, finetune_phase(env, pruned, prog), state, prog)
    _stop_if_asked(env, prog, "after fine-tuning, before the final evaluation")
    env.hooks.phase("finish")
    return finish(env, dense, pruned, state, prog)


def _record_init(env: Env, dense: Programs, state: state_lib.Weights) -> None:
    """The starting weights' accuracy, before any training step (results.json's init_from)."""
    ones = [jnp.ones(w) for w in dense.model.widths]
    test_acc, _ = env.evaluate(dense, state.params, state.rest, ones, "test")
    val_acc, _ = env.evaluate(dense, state.params, state.rest, ones, "val")
    logging.info("starting weights: test accuracy %.4f, val %.4f", test_acc, val_acc)
    if jax.process_index() == 0:
        parallel.write_text_atomic(env.workdir / INIT_FILE, json.dumps(
            {"source": env.spec.model.init_from, "test_acc": test_acc, "val_acc": val_acc}))


def _stop_if_asked(env: Env, prog: Progress, where: str) -> None:
    """A stop request that came outside the training steps (during the cut, the last
    evaluation): the phase just saved a checkpoint, so stop there."""
    if env.watch.agreed():
        raise Preempted(f"{env.watch.reason}: stopped {where}; checkpoint {prog.ckpt} in "
                        f"{env.ckpts.dir} holds it. Rerun the same command to resume.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: loop.Hooks | None = None, *,
                       allow_config_change: bool = False,
                       remeasure_speed: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole SAP method; returns the results dict also written to results.json.

    ``hooks`` (:class:`~sap_jax.train.loop.Hooks`) are called after every weight step and at
    every phase; they observe the run without changing it. ``allow_config_change``: continue a
    started run whose config changes a result-affecting field (recorded in results.json's
    ``config_changes``); otherwise such a workdir is refused. ``remeasure_speed``: on a
    finished run, time the models again (the earlier figures stay in ``speed_earlier``)."""
    env = Env(config, workdir, hooks or loop.Hooks(), allow_config_change)
    env.remeasure_speed = remeasure_speed
    cache = env.spec.compile_cache
    cache = env.workdir / "compile_cache" if cache == "workdir" else cache
    with checkpoints.PreemptionWatch(env.spec.preemption_check_every_steps) as env.watch, \
            parallel.compilation_cache(cache) as env.cache_stats, env.writer:
        return _phases(env)
