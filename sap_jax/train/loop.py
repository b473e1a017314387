"""One epoch loop for every phase.

:func:`run_epochs` does what every phase shares: the weight steps with their dropout keys,
the non-finite check, step logging and progress, the preemption watch, end-of-epoch
bookkeeping and the checkpoint policy. What differs between phases (the penalty's ``v`` and
gamma, the AGN step, the end-of-epoch evaluation) comes in a :class:`Phase` of hooks.
The state is a typed record (:class:`~sap_jax.train.state.Weights` or its subclass): a step
or a phase hook returns a new one, which the loop rebinds. :class:`Hooks` is the public seam
for code that embeds a run (tests, notebooks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from sap_jax.runtime import parallel
from sap_jax.runtime.errors import NonFiniteLoss, Preempted
from sap_jax.train.state import Progress, Weights

#: Dropout keys are fold_in(fold_in(rng, DROPOUT_STREAM), step), apart from the AGN's noise keys.
DROPOUT_STREAM = 1 << 30


@dataclasses.dataclass
class Hooks:
    """Callbacks a run calls; all optional, none may change the run's state.

    on_step(phase, step, metrics): after every weight step (``phase`` is "dense", "search" or
      "finetune"; ``metrics`` the step's device values: loss, ce, penalty, accuracy, finite).
    on_phase(name): when the run enters "search" (the dense epochs and the search), "cut",
      "finetune" and "finish".

    Every process calls them. The metrics are global arrays: with several processes read a
    value with ``np.asarray(m["loss"].addressable_data(0))`` (``float(m["loss"])`` needs
    every process's data and fails).
    """

    on_step: Callable[[str, int, dict[str, Any]], None] | None = None
    on_phase: Callable[[str], None] | None = None

    def step(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        if self.on_step is not None:
            self.on_step(phase, step, metrics)

    def phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)


def _keep_state(_epoch: int, _start: int, state: Weights) -> Weights:
    return state


def _no_agn_step(_step: int, state: Weights) -> tuple[Weights, None]:
    return state, None


def _no_evaluation(_epoch: int, state: Weights, _loss: float, _agn: list[dict]) -> Weights:
    return state


@dataclasses.dataclass
class Phase:
    """One run of epochs, as :func:`run_epochs` needs it. The hooks that may change the state
    return it (the loop rebinds it); none mutates it."""

    num_epochs: int
    train_step: Callable  # steps.make_train_step's function
    label: Callable[[int], str]  # epoch -> "dense" | "search" | "finetune" (logs, times)
    penalty_arch: Callable[[Weights], Any]  # state -> the v the penalty reads
    gamma: Callable[[int], jax.Array]  # epoch -> the penalty's weight
    must_save: Callable[[int], bool]  # epochs done -> checkpoint now?
    data_epoch_offset: int = 0  # the data order of epoch e is that of epoch offset + e
    with_val: bool = False  # train on the validation images too (fine-tuning, no choice left)
    # (epoch, first step, state) -> state
    start_epoch: Callable[[int, int, Weights], Weights] = _keep_state
    # (step, state) -> (state, AGN metrics or None)
    after_step: Callable[[int, Weights], tuple[Weights, dict | None]] = _no_agn_step
    # (epoch, state, train loss, AGN metrics) -> state
    end_epoch: Callable[[int, Weights, float, list[dict]], Weights] = _no_evaluation


def host_metrics(acc: list[dict]) -> list[dict[str, Any]]:
    """Step metrics as JSON-ready host values (scalars as floats, vectors as lists)."""
    return [{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in m.items()}
            for m in acc]


def _dropout_rng(state: Weights) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), DROPOUT_STREAM)


def _step_args(ph: Phase, state: Weights, batch: Any, gamma: jax.Array, rng: jax.Array,
               step: int) -> tuple:
    """The weight step's arguments: one place, so that the step the pre-flight check compiles
    is the one the loop calls."""
    return (state.params, state.rest, state.opt_state, batch, ph.penalty_arch(state), gamma,
            jax.random.fold_in(rng, step))


def first_step(env, ph: Phase, state: Weights, prog: Progress) -> tuple[Callable, tuple]:
    """The phase's next weight step and its arguments, the batch as shapes on the mesh: what
    the pre-flight check compiles (``fn.lower(*args).compile()``), so that the loop's first
    step finds its program compiled instead of compiling it again."""
    spec = env.data.batch_spec(env.spec.data.batch_size)
    batch = parallel.abstract(spec, parallel.batch_sharding(env.mesh))
    return ph.train_step, _step_args(ph, state, batch, ph.gamma(prog.epoch), _dropout_rng(state),
                                     prog.step)


def run_epochs(env, ph: Phase, state: Weights, prog: Progress) -> Weights:
    """Run the phase's remaining epochs from ``prog`` (mid-epoch after a preemption); returns
    the state at the end."""
    data, every = env.spec.data, env.spec.log_every_steps
    dropout_rng = _dropout_rng(state)
    for epoch in range(prog.epoch, ph.num_epochs):
        t0 = time.perf_counter()
        start, acc, agn_acc = prog.pop_partial()
        label = ph.label(epoch)
        state = ph.start_epoch(epoch, start, state)
        gamma = ph.gamma(epoch)
        for b in env.data.train_batches(ph.data_epoch_offset + epoch, data.batch_size,
                                        data.steps_per_epoch or None, start=start,
                                        with_val=ph.with_val):
            params, rest, opt_state, m = ph.train_step(*_step_args(
                ph, state, parallel.global_batch(b, env.mesh), gamma, dropout_rng, prog.step))
            state = state.replace(params=params, rest=rest, opt_state=opt_state)
            prog.step += 1
            acc.append(m)
            state, am = ph.after_step(prog.step, state)
            if am is not None:
                agn_acc.append(am)
            if prog.step % every == 0:
                log_train(env, prog, label, epoch, acc[-every:])
            env.report_progress(prog.step)
            env.progress_line.update(prog.step, f"{label} epoch {epoch + 1}/{ph.num_epochs}")
            env.hooks.step(label, prog.step, m)
            if env.watch(prog.step):
                env.progress_line.clear()
                rows = log_train(env, prog, label, epoch, acc)  # never save a NaN state
                preempt(env, state, prog, label, epoch, rows, agn_acc, t0)
        env.progress_line.clear()  # whole lines from here: the epoch's
        train_loss = epoch_done(prog, log_train(env, prog, label, epoch, acc))
        state = ph.end_epoch(epoch, state, train_loss, agn_acc)
        prog.add_time(label, time.perf_counter() - t0)
        prog.epoch = epoch + 1
        if ph.must_save(epoch + 1):
            save(env, state, prog)
    return state


def log_train(env, prog: Progress, phase: str, epoch: int, acc: list[dict]) -> list[dict[str, Any]]:
    """Log the mean of ``acc`` (the metrics of the steps up to ``prog.step``); stop on NaN/Inf.
    Returns ``acc`` as host values, for the end-of-epoch and preemption bookkeeping."""
    rows = host_metrics(acc)
    good = [r for r in rows if r["finite"] == 1.0]
    if len(good) < len(rows) and env.spec.on_nonfinite == "stop":
        first = next(i for i, r in enumerate(rows) if r["finite"] != 1.0)
        bad = prog.step - len(rows) + first + 1
        last = env.ckpts.latest_step()
        kept = (f"the last good checkpoint ({last}, in {env.ckpts.dir}) is kept; rerun with the "
                "remedy and --allow_config_change to continue from it" if last is not None else
                "no checkpoint was written yet; rerun with the remedy in the same workdir")
        raise NonFiniteLoss(
            f"loss or gradients became NaN/Inf at step {bad} (phase {phase}, epoch {epoch + 1}): "
            f"{ {k: v for k, v in rows[first].items() if k != 'finite'} }. The run stopped; "
            f"{kept}. Remedies: lower the learning rate (optim.learning_rate / "
            "finetune.learning_rate) or sap.gamma, add warm-up (optim.warmup_epochs), use "
            "dtype=float32, or set on_nonfinite=skip to skip such steps.")
    vals = {k: float(np.mean([r[k] for r in good])) if good else float("nan")
            for k in rows[0] if k != "finite"}
    vals["skipped_steps"] = float(prog.skipped_steps + len(rows) - len(good))
    env.writer.write_scalars(prog.step, {f"train/{k}": v for k, v in vals.items()})
    return rows


def epoch_done(prog: Progress, rows: list[dict[str, Any]]) -> float:
    """Count skipped steps of a finished epoch (host metrics); its mean train loss over good
    steps."""
    good = [r["loss"] for r in rows if r["finite"] == 1.0]
    prog.skipped_steps += len(rows) - len(good)
    if len(good) < len(rows):
        logging.warning("skipped %d non-finite steps this epoch (%d in all)",
                        len(rows) - len(good), prog.skipped_steps)
    return float(np.mean(good)) if good else float("nan")


def save(env, state: Weights, prog: Progress) -> None:
    meta = env.ckpts.save(state, prog.to_json())
    prog.ckpt, prog.config_hash = meta["ckpt"], meta["config_hash"]


def preempt(env, state: Weights, prog: Progress, phase: str, epoch: int,
            rows: list[dict[str, Any]], agn_acc: list[dict], t0: float) -> None:
    """Save mid-epoch (metrics so far included) and stop with :class:`Preempted`."""
    prog.add_time(phase, time.perf_counter() - t0)
    prog.epoch, prog.step_in_epoch = epoch, len(rows)
    prog.partial, prog.partial_agn = rows, host_metrics(agn_acc)
    save(env, state, prog)
    raise Preempted(
        f"{env.watch.reason}: saved checkpoint {prog.ckpt} at step {prog.step} "
        f"(phase {phase}, epoch {epoch + 1}, {len(rows)} steps into it) in "
        f"{env.ckpts.dir}. Rerun the same command to resume.")
