"""The SAP schedule: dense training -> search + alignment -> cut -> fine-tune (docs/method.md §4).

``train_and_evaluate(config, workdir)`` runs the whole method and can be
stopped and restarted at any time: it resumes from the latest checkpoint in
``workdir``. The hot path is three pure, jitted functions built per model
shape (:func:`make_train_step`, :func:`make_eval_step`, :func:`make_agn_step`);
everything else is orchestration on the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx

from sap_jax import agn as agn_lib
from sap_jax import config as config_lib
from sap_jax import data as data_lib
from sap_jax import (baselines, bnstats, flops, models, parallel, penalty, report, resource, speed,
                     surgery, xla_cpu)
from sap_jax.codec import ModuleCodec

Tree = dict[str, Any]
CKPT_DIR = "checkpoints"
PRUNED_DIR = "pruned_model"
#: The data-order "epoch" of the batches that re-estimate BN statistics: far from any training
#: epoch, so they are a fixed draw of their own.
BN_EPOCH = 10**6
#: Dropout keys are fold_in(fold_in(rng, DROPOUT_STREAM), step), apart from the AGN's noise keys.
DROPOUT_STREAM = 1 << 30
#: A generator whose logits have fewer than this share in the sensitive band is saturated.
SATURATED_BAND = 0.01
# fit_age before any architecture within the budget has been seen
NEVER_FIT = 2**30


#: Exit code after a preemption notice (SIGTERM): a checkpoint was saved; rerun to resume.
EXIT_PREEMPTED = 75
#: Exit code when a checkpoint could not be written (disk full, permissions).
EXIT_WRITE_FAILED = 74


class NonFiniteLoss(FloatingPointError):
    """The loss or gradients became NaN or Inf; the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved at the next step boundary."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names it and says what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class _PreemptionWatch:
    """Has a preemption notice (SIGTERM) arrived? Checked at step boundaries.

    A SIGTERM handler sets a local flag. With one process the flag is read at
    every step. With several, the host that got the signal must not stop alone
    (the others would wait in the next collective forever), so every
    ``every_steps`` steps all processes all-gather their flags and stop
    together at the same step. (JAX's own preemption sync point is not used:
    orbax's CheckpointManager consumes it with checkpoint ids as step ids.)
    """

    def __init__(self, every_steps: int):
        self.multi = jax.process_count() > 1
        self.every = every_steps
        self.flag = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _on_term(self, signum, frame) -> None:
        self.flag = True

    def __call__(self, step: int) -> bool:
        if not self.multi:
            return self.flag
        if step % self.every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------

def lr_schedule(o: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int,
                batch_size: int) -> optax.Schedule:
    """The phase's LR per step: linear scaling with the batch, warm-up, then step/cosine/constant."""
    peak = o.learning_rate * batch_size / o.base_batch_size
    total = max(1, num_epochs * steps_per_epoch)
    if o.schedule == "step":
        base = optax.piecewise_constant_schedule(
            peak, {int(round(b * steps_per_epoch)): o.decay for b in o.boundaries})
    elif o.schedule == "cosine":
        base = optax.cosine_decay_schedule(peak, total)
    else:
        base = optax.constant_schedule(peak)
    warm = int(round(o.warmup_epochs * steps_per_epoch))
    if not warm:
        return base
    return lambda step: base(step) * jnp.minimum(1.0, (step + 1) / warm)


def make_optimizer(o: ml_collections.ConfigDict, schedule: optax.Schedule, *,
                   proximal: Callable[[optax.Schedule], optax.GradientTransformation] | None = None
                   ) -> optax.GradientTransformation:
    """SGD with L2 weight decay added to the gradient (PyTorch style), plus an optional proximal link."""
    chain = [optax.add_decayed_weights(o.weight_decay)] if o.weight_decay else []
    chain.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
    if proximal is not None:
        chain.append(proximal(schedule))
    return optax.chain(*chain)


def make_agn_optimizer(a: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The generator's AdamW (lineage), from the config's ``agn`` section."""
    return optax.adamw(a.learning_rate, b1=a.b1, b2=a.b2, weight_decay=a.weight_decay)


# --------------------------------------------------------------------------
# Jitted steps
# --------------------------------------------------------------------------

def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(codec: ModuleCodec, structure, tx: optax.GradientTransformation, *,
                    penalty_form: str = "gradient", include_bn: bool = False,
                    dtype: Any = jnp.float32, skip_nonfinite: bool = False) -> Callable:
    """``(params, rest, opt_state, batch, arch, gamma[, key]) -> (params, rest, opt_state, metrics)``.

    The dense model trains ungated; ``gamma * R_w(W; arch)`` joins the loss in
    the gradient form (the proximal form lives in ``tx``). ``arch`` and
    ``gamma`` are traced, so neither a new mask nor the start of the search
    recompiles. ``metrics["finite"]`` is 0 when the loss or a gradient is
    NaN/Inf; with ``skip_nonfinite`` such a step leaves params, BN statistics
    and optimizer state unchanged. ``key`` seeds the model's dropout (stream
    "dropout"); without it the step trains without dropout.
    """
    def step(params, rest, opt_state, batch, arch, gamma, key=None):
        model = codec.merge(params, rest)
        model.train()
        def loss_fn(model):
            # Rngs are made inside the differentiated trace: nnx refuses to advance one from outside.
            rngs = None if key is None else nnx.Rngs(dropout=key)
            logits = model(batch["image"].astype(dtype), rngs=rngs)
            ce = jnp.mean(_ce(logits, batch["label"]))
            if penalty_form == "none":  # fine-tuning, or a plain baseline: no penalty at all
                reg = jnp.zeros((), jnp.float32)
            else:
                reg = penalty.partial_group_lasso(nnx.state(model, nnx.Param), arch, structure,
                                                  include_bn=include_bn)
            loss = ce + gamma * reg if penalty_form == "gradient" else ce
            return loss, (ce, reg, logits)

        (loss, (ce, reg, logits)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grads = codec.params.encode(grads)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, new_opt_state = tx.update(grads, opt_state, params, arch=arch)
        new = (optax.apply_updates(params, updates), codec.rest_of(model), new_opt_state)
        if skip_nonfinite:
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, (params, rest, opt_state))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return *new, {"loss": loss, "ce": ce, "penalty": reg, "accuracy": acc,
                      "finite": finite.astype(jnp.float32)}

    return xla_cpu.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(codec: ModuleCodec, dtype: Any = jnp.float32, structure: Any = None) -> Callable:
    """``(params, rest, batch, arch) -> {"correct", "loss", "count"}`` sums over unmasked examples.

    ``structure`` (the model's ``groups.Structure``) picks the CPU compiler options for inference."""
    def step(params, rest, batch, arch):
        model = codec.merge(params, rest)
        model.eval()
        logits = model(batch["image"].astype(dtype), arch)
        m = batch["mask"]
        return {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m),
                "loss": jnp.sum(_ce(logits, batch["label"]) * m), "count": jnp.sum(m)}

    return xla_cpu.jit(step, inference_of=structure)


def make_agn_step(model_codec: ModuleCodec, agn_codec: ModuleCodec, structure,
                  budget: resource.ResourceLoss, tx: optax.GradientTransformation, *,
                  tau: float, offset: float, deterministic_v: bool,
                  lam_rate: float = 0.0, lam_max_scale: float = 1.0, budget_on: str = "sampled",
                  dtype: Any = jnp.float32) -> Callable:
    """``(agn_params, agn_rest, agn_opt_state, log_lam, params, rest, batch, key) -> (agn_params,
    agn_opt_state, log_lam, arch, metrics)``: one AGN step on the frozen, gated model, then the
    new v.

    ``log_lam`` (a float32 scalar, 0 at the start) scales the resource loss by ``exp(log_lam)``.
    With ``lam_rate > 0`` it is a dual-ascent controller: after each step it grows by
    ``lam_rate * (r - p) / p`` for the new v's MAC ratio ``r``, within ``[0, log lam_max_scale]``.
    A generator held above p by the cross-entropy therefore feels a growing budget pull until it
    meets p, and the pull relaxes back to ``lam`` once it does (docs/method.md, "A generator
    that reaches p"). ``lam_rate = 0`` keeps the lineage's fixed ``lam``.
    """
    def apply_fn(model_state, images, arch):
        model = model_codec.merge(*model_state)
        model.eval()  # BN running statistics; W is frozen
        return model(images.astype(dtype), arch)

    max_log = float(np.log(lam_max_scale))

    def step(agn_params, agn_rest, agn_opt_state, log_lam, params, rest, batch, key):
        gen = agn_codec.merge(agn_params, agn_rest)
        _, metrics, grads = agn_lib.agn_value_and_grad(
            gen, apply_fn, (params, rest), batch, key, structure=structure, resource=budget,
            tau=tau, offset=offset, resource_scale=jnp.exp(log_lam), budget_on=budget_on)
        grads = agn_codec.params.encode(grads)
        updates, agn_opt_state = tx.update(grads, agn_opt_state, agn_params)
        agn_params = optax.apply_updates(agn_params, updates)
        gen = agn_codec.merge(agn_params, agn_rest)
        noise = None if deterministic_v else jax.random.fold_in(key, 1)
        arch = [jax.lax.stop_gradient(v) for v in gen.sample(noise, tau=tau, offset=offset)]
        if lam_rate:
            r = budget.ratio(structure, arch)
            log_lam = jnp.clip(log_lam + lam_rate * (r - budget.p) / budget.p, 0.0, max_log)
        metrics["lam"] = budget.lam * jnp.exp(log_lam)
        return agn_params, agn_opt_state, log_lam, arch, metrics

    return xla_cpu.jit(step, donate_argnums=(0, 2))


def make_fit_tracker(structure, p: float, scope: str) -> Callable:
    """``(fit_arch, fit_age, arch) -> (fit_arch, fit_age)``: the generator's most recent
    architecture within the budget ``p`` and how many AGN steps ago it came.

    A generator that hovers at p flips single channels across it; on a small model one channel
    can be 1% of the MACs, so its very last v may sit just over p. The cut then takes this one
    (SAP's own choice) instead of trimming channels by norm.
    """
    def fn(fit_arch, fit_age, arch):
        ok = flops.mac_ratio(structure, arch, scope) <= p
        fit_arch = [jnp.where(ok, v, f) for v, f in zip(arch, fit_arch)]
        return fit_arch, jnp.where(ok, 0, jnp.minimum(fit_age, NEVER_FIT - 1) + 1).astype(jnp.int32)

    return xla_cpu.jit(fn, donate_argnums=(0,))


def make_norms(structure, include_bn: bool) -> Callable:
    """``(params, arch) -> (mean dropped, mean kept)`` per-channel norm, summed over a group's tensors."""
    def fn(params, arch):
        drop = jnp.sum(penalty.group_penalties(params, arch, structure, include_bn=include_bn))
        keep = jnp.sum(penalty.group_penalties(params, [1 - v for v in arch], structure,
                                               include_bn=include_bn))
        nd = sum(jnp.sum(1 - v) for v in arch)
        nk = sum(jnp.sum(v) for v in arch)
        return drop / jnp.maximum(nd, 1), keep / jnp.maximum(nk, 1)

    return xla_cpu.jit(fn)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

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


def _to_host(tree: Any) -> Any:
    """Replicated global arrays -> NumPy (works when arrays span several processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                        else np.asarray(x), tree)


def _host_metrics(acc: list[dict]) -> list[dict[str, Any]]:
    """Step metrics as JSON-ready host values (scalars as floats, vectors as lists)."""
    return [{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in m.items()}
            for m in acc]


class Run:
    """One SAP run in a workdir (host-side orchestration of the jitted steps)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        self.c, self.workdir = config, parallel.path(workdir)
        if jax.process_index() == 0:
            self.workdir.mkdir(parents=True, exist_ok=True)
        parallel.sync("workdir")
        self._check_workdir_config()
        self.mesh = parallel.make_mesh()
        self.data = data_lib.load(config)
        self.dtype = jnp.dtype(config.dtype)
        self.spe = config.steps_per_epoch or self.data.steps_per_epoch(config.batch_size)
        self.total_steps = (config.num_epochs + config.finetune.num_epochs) * self.spe
        self.writer = metric_writers.create_default_writer(
            str(self.workdir), just_logging=jax.process_index() > 0, asynchronous=False)
        self.progress = periodic_actions.ReportProgress(
            num_train_steps=self.total_steps, writer=self.writer,
            every_steps=config.log_every_steps)
        self.ckpt = ocp.CheckpointManager(
            self.workdir / CKPT_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
            item_names=("state", "meta"))
        self.key = jax.random.key(config.seed)
        self.config_hash = hashlib.sha256(json.dumps(config_lib.result_fields(
            config_lib.to_json_dict(config)), sort_keys=True).encode()).hexdigest()[:16]
        self.preempted = _PreemptionWatch(config.preemption_check_every_steps)

    # -- config / workdir ------------------------------------------------------
    def _check_workdir_config(self) -> None:
        path = self.workdir / "config.json"
        mine = config_lib.to_json_dict(self.c)
        if path.exists():
            try:
                theirs = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise config_lib.ConfigError(
                    f"{path} is not valid JSON ({e}); the workdir is damaged. Use a new "
                    "--workdir, or delete that file to resume with the current config.") from e
            diff = sorted(_diff_keys(config_lib.result_fields(theirs), config_lib.result_fields(mine)))
            if diff:
                raise config_lib.ConfigError(
                    f"workdir {self.workdir} holds a run with a different config "
                    f"(fields {', '.join(diff)} differ). Use a new --workdir, or restore the "
                    f"original values to resume.")
        parallel.sync("config-checked")  # nobody reads while process 0 writes
        if jax.process_index() == 0 and not path.exists():
            parallel.write_text_atomic(path, json.dumps(mine, indent=2))

    # -- model / programs --------------------------------------------------------
    def _model(self, widths: Sequence[int] | None) -> models.PrunableModel:
        c = self.c
        return models.create(c.model, seed=c.seed, num_classes=self.data.info.num_classes,
                             widths=widths, dtype=None if c.dtype == "float32" else c.dtype)

    def _programs(self, widths: Sequence[int] | None, phase: str,
                  model: models.PrunableModel | None = None) -> Programs:
        c = self.c
        # A given model (the extracted one) spares a random initialisation: on CPU that compiles
        # one small program per new parameter shape, ~30 s for a pruned ResNet-20.
        model = self._model(widths) if model is None else model
        structure = model.structure(c.image_size)
        codec = ModuleCodec(model)
        progs = Programs(model, structure, codec, make_eval_step(codec, self.dtype, structure),
                         bnstats.make_batch_stats_step(codec, self.dtype))
        o = c.optim if phase == "search" else c.finetune
        epochs = c.num_epochs if phase == "search" else c.finetune.num_epochs
        sched = lr_schedule(o, self.spe, epochs, c.batch_size)
        prox = None
        if phase == "search" and c.sap.penalty == "proximal":
            start = c.sap.e_start * self.spe
            prox = lambda lr: penalty.proximal_partial_group_lasso(  # noqa: E731
                structure, lambda n: lr(n) * c.sap.gamma * (n >= start), include_bn=c.sap.include_bn)
        progs.tx = make_optimizer(o, sched, proximal=prox)
        progs.train_step = make_train_step(codec, structure, progs.tx,
                                           penalty_form=c.sap.penalty if phase == "search" else "none",
                                           include_bn=c.sap.include_bn, dtype=self.dtype,
                                           skip_nonfinite=c.on_nonfinite == "skip")
        return progs

    def _fresh_search_state(self, progs: Programs) -> tuple[Tree, Any]:
        c = self.c
        gen = agn_lib.AGN(progs.model.widths, z_dim=c.agn.z_dim, hidden=c.agn.hidden, seed=c.seed + 1)
        self.agn_codec = ModuleCodec(gen)
        self.agn_tx = make_agn_optimizer(c.agn)
        params, rest = progs.codec.split(progs.model)
        agn_params, agn_rest = self.agn_codec.split(gen)
        ones = [np.ones(w, np.float32) for w in progs.model.widths]
        state = {"params": params, "rest": rest, "opt_state": progs.tx.init(params),
                 "agn_params": agn_params, "agn_rest": agn_rest,
                 "agn_opt_state": self.agn_tx.init(agn_params), "log_lam": np.float32(0.0),
                 "arch": ones, "best_arch": ones, "prev_arch": ones,
                 "fit_arch": ones, "fit_age": np.int32(NEVER_FIT),
                 "rng": jax.random.key_data(self.key)}
        return state, gen

    def _fresh_finetune_state(self, progs: Programs) -> Tree:
        params, rest = progs.codec.split(progs.model)
        return {"params": params, "rest": rest, "opt_state": progs.tx.init(params),
                "rng": jax.random.key_data(self.key)}

    # -- checkpoints ---------------------------------------------------------------
    def _save(self, state: Tree, meta: dict[str, Any]) -> None:
        meta = {**meta, "ckpt": meta.get("ckpt", 0) + 1, "config_hash": self.config_hash}
        try:
            self.ckpt.save(meta["ckpt"], args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
            self.ckpt.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and the file system raise many types
            prev = self.ckpt.latest_step()
            kept = (f"checkpoint {prev} in {self.workdir / CKPT_DIR} is intact" if prev is not None
                    else "no earlier checkpoint exists")
            raise CheckpointWriteError(
                f"could not write checkpoint {meta['ckpt']} to {self.workdir / CKPT_DIR}: "
                f"{type(e).__name__}: {e}. The run stopped; {kept}. Free disk space or fix "
                "permissions, then rerun the same command to resume.") from e
        self.meta = meta

    def _ckpt_path(self, step: int | None = None) -> str:
        return str(self.workdir / CKPT_DIR / str(self.ckpt.latest_step() if step is None else step))

    def _damaged(self, e: Exception) -> CheckpointError:
        path = self._ckpt_path()
        return CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). It is damaged or "
            f"was not written by this run. Delete {path} to resume from the checkpoint before "
            "it, or start again with a new --workdir.")

    def _restore(self, template: Tree) -> Tree:
        sharding = parallel.param_sharding(self.mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                                               if not isinstance(x, jax.Array) else x.dtype,
                                                               sharding=sharding), template)
        try:
            out = self.ckpt.restore(self.ckpt.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable data
            raise self._damaged(e) from e
        return out["state"]

    def _latest_meta(self) -> dict[str, Any] | None:
        step = self.ckpt.latest_step()
        if step is None:
            return None
        try:
            meta = dict(self.ckpt.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"])
            meta["phase"], meta["epoch"], meta["step"]  # noqa: B018 - must exist
        except Exception as e:  # noqa: BLE001
            raise self._damaged(e) from e
        if meta.get("config_hash") != self.config_hash:
            raise config_lib.ConfigError(
                f"checkpoint {self._ckpt_path(step)} was written by a run with a different "
                "config. Use a new --workdir, or rerun with the config that wrote it.")
        return meta

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, progs: Programs, params: Tree, rest: Tree, arch,
                 split: str = "test") -> tuple[float, float]:
        """Accuracy and loss on ``split``: "val" for every choice, "test" only for reporting.
        NaN for an empty split (val_size = 0)."""
        sums = None
        for b in self.data.eval_batches(self.c.eval_batch_size, split):
            out = progs.eval_step(params, rest, parallel.global_batch(b, self.mesh), arch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if sums is None:
            return float("nan"), float("nan")
        s = _to_host(sums)
        n = max(float(s["count"]), 1.0)
        return float(s["correct"]) / n, float(s["loss"]) / n

    def bn_reestimated(self, progs: Programs, params: Tree, rest: Tree, arch) -> Tree:
        """``rest`` with BN statistics re-estimated on ``cut.bn_batches`` training batches
        (unchanged when that is 0)."""
        if not self.c.cut.bn_batches:
            return rest
        batches = (parallel.global_batch(b, self.mesh) for b in self.data.train_batches(
            BN_EPOCH, self.c.batch_size, self.c.cut.bn_batches))
        return bnstats.reestimate(progs.bn_step, params, rest, batches, arch)

    # -- phases ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cache = self.c.compile_cache
        cache = self.workdir / "compile_cache" if cache == "workdir" else cache
        try:
            with parallel.compilation_cache(cache) as self.cache_stats:
                return self._run()
        finally:
            self.preempted.close()

    def _run(self) -> dict[str, Any]:
        meta = self._latest_meta()
        if meta is None:
            meta = {"phase": "search", "epoch": 0, "step": 0, "agn_steps": 0,
                    "history": {}, "times": {}, "dense_widths": None, "skipped_steps": 0}
            logging.info("starting a new run in %s", self.workdir)
        else:
            logging.info("resuming from checkpoint %d: phase %s, %d epochs and %d steps done",
                         meta["ckpt"], meta["phase"], meta["epoch"], meta.get("step_in_epoch", 0))
        self.meta = meta

        dense = self._programs(None, "search")
        self.dense = dense
        template, _ = self._fresh_search_state(dense)
        meta["dense_widths"] = list(dense.model.widths)
        if meta["phase"] == "search":
            state = self._restore(template) if "ckpt" in meta else parallel.replicate(template, self.mesh)
            state = self._search(dense, state, meta)
            pruned, state = self._cut(dense, state, self.meta)
        else:
            pruned = self._programs(self.meta["widths"], "finetune")
            state = self._restore(_to_host(self._fresh_finetune_state(pruned)))
        state = self._finetune(pruned, state, self.meta)
        return self._finish(dense, pruned, state, self.meta)

    def _log_train(self, phase: str, epoch: int, step: int, acc: list[dict]) -> list[dict[str, Any]]:
        """Log the mean of ``acc`` (the metrics of the steps up to ``step``); stop on NaN/Inf.
        Returns ``acc`` as host values, for the end-of-epoch and preemption bookkeeping."""
        rows = _host_metrics(acc)
        good = [r for r in rows if r["finite"] == 1.0]
        if len(good) < len(rows) and self.c.on_nonfinite == "stop":
            first = next(i for i, r in enumerate(rows) if r["finite"] != 1.0)
            bad = step - len(rows) + first + 1
            raise NonFiniteLoss(
                f"loss or gradients became NaN/Inf at step {bad} (phase {phase}, epoch {epoch + 1}): "
                f"{ {k: v for k, v in rows[first].items() if k != 'finite'} }. The run stopped; the "
                f"last good checkpoint ({self.ckpt.latest_step()}, in {self.workdir / CKPT_DIR}) is "
                "kept. Remedies: lower the learning rate (optim.learning_rate / "
                "finetune.learning_rate) or sap.gamma, add warm-up (optim.warmup_epochs), use "
                "dtype=float32, or set on_nonfinite=skip to skip such steps.")
        vals = {k: float(np.mean([r[k] for r in good])) if good else float("nan")
                for k in rows[0] if k != "finite"}
        vals["skipped_steps"] = float(self.meta.get("skipped_steps", 0) + len(rows) - len(good))
        self.writer.write_scalars(step, {f"train/{k}": v for k, v in vals.items()})
        return rows

    def _epoch_done(self, rows: list[dict[str, Any]]) -> float:
        """Count skipped steps of a finished epoch (host metrics); its mean train loss over good steps."""
        good = [r["loss"] for r in rows if r["finite"] == 1.0]
        self.meta["skipped_steps"] = self.meta.get("skipped_steps", 0) + len(rows) - len(good)
        if len(good) < len(rows):
            logging.warning("skipped %d non-finite steps this epoch (%d in all)",
                            len(rows) - len(good), self.meta["skipped_steps"])
        return float(np.mean(good)) if good else float("nan")

    def _preempt(self, state: Tree, meta: dict[str, Any], phase: str, epoch: int, step: int,
                 rows: list[dict[str, Any]], agn_acc: list[dict], t0: float, agn_steps: int) -> None:
        """Save mid-epoch (metrics so far included) and stop with :class:`Preempted`."""
        meta["times"][phase] = meta["times"].get(phase, 0.0) + time.perf_counter() - t0
        meta.update(epoch=epoch, step=step, agn_steps=agn_steps, step_in_epoch=len(rows),
                    partial=rows, partial_agn=_host_metrics(agn_acc))
        self._save(state, meta)
        raise Preempted(
            f"preemption notice (SIGTERM): saved checkpoint {self.meta['ckpt']} at step {step} "
            f"(phase {phase}, epoch {epoch + 1}, {len(rows)} steps into it) in "
            f"{self.workdir / CKPT_DIR}. Rerun the same command to resume.")

    @staticmethod
    def _resume_epoch(meta: dict[str, Any]) -> tuple[int, list[dict], list[dict]]:
        """Steps already done in the current epoch and their metrics (after a preemption)."""
        start = meta.pop("step_in_epoch", 0)
        return start, meta.pop("partial", []), meta.pop("partial_agn", [])

    def _search(self, progs: Programs, state: Tree, meta: dict[str, Any]) -> Tree:
        c, s = self.c, self.c.sap
        budget = resource.ResourceLoss.from_config(c)
        agn_step = make_agn_step(progs.codec, self.agn_codec, progs.structure, budget, self.agn_tx,
                                 tau=c.agn.tau, offset=c.agn.offset,
                                 deterministic_v=c.agn.deterministic_v, lam_rate=c.agn.lam_rate,
                                 lam_max_scale=c.agn.lam_max_scale, budget_on=c.agn.budget_on,
                                 dtype=self.dtype)
        norms = make_norms(progs.structure, s.include_bn)
        track_fit = make_fit_tracker(progs.structure, s.p, c.agn.budget_scope)
        initial_arch = xla_cpu.jit(lambda p, r: self.agn_codec.merge(p, r).sample(
            None, tau=c.agn.tau, offset=c.agn.offset))
        ones = [jnp.ones(w) for w in progs.model.widths]
        use_agn = s.final_arch in ("last", "best")  # "norm": a norm-based baseline, no AGN
        zeros = [jnp.zeros(w) for w in progs.model.widths]
        rng = jax.random.wrap_key_data(state["rng"])
        dropout_rng = jax.random.fold_in(rng, DROPOUT_STREAM)
        hist = meta["history"]
        step, agn_steps = meta["step"], meta["agn_steps"]
        for epoch in range(meta["epoch"], c.num_epochs):
            t0 = time.perf_counter()
            start, acc, agn_acc = self._resume_epoch(meta)
            searching = epoch >= s.e_start
            phase = "search" if searching else "dense"
            if epoch == s.e_start and start == 0 and use_agn:  # v starts from the (nearly full) AGN output
                state["arch"] = initial_arch(state["agn_params"], state["agn_rest"])
                state["prev_arch"] = state["arch"]
            gamma = jnp.float32(s.gamma if searching else 0.0)
            for b in self.data.train_batches(epoch, c.batch_size, c.steps_per_epoch or None, start=start):
                # "all": v = 0 marks every channel as dropped, i.e. a plain group lasso.
                pen_arch = zeros if s.penalty_scope == "all" else state["arch"]
                state["params"], state["rest"], state["opt_state"], m = progs.train_step(
                    state["params"], state["rest"], state["opt_state"],
                    parallel.global_batch(b, self.mesh), pen_arch, gamma,
                    jax.random.fold_in(dropout_rng, step))
                step += 1
                acc.append(m)
                if searching and use_agn and step % s.agn_every == 0:
                    sb = parallel.global_batch(self.data.subset_batch(agn_steps, c.agn.batch_size), self.mesh)
                    (state["agn_params"], state["agn_opt_state"], state["log_lam"], state["arch"],
                     am) = agn_step(state["agn_params"], state["agn_rest"], state["agn_opt_state"],
                                    state["log_lam"], state["params"], state["rest"], sb,
                                    jax.random.fold_in(rng, agn_steps))
                    state["fit_arch"], state["fit_age"] = track_fit(
                        state["fit_arch"], state["fit_age"], state["arch"])
                    agn_steps += 1
                    agn_acc.append(am)
                if step % c.log_every_steps == 0:
                    self._log_train(phase, epoch, step, acc[-c.log_every_steps:])
                self.progress(step)
                if self.preempted(step):
                    rows = self._log_train(phase, epoch, step, acc)  # never save a NaN state
                    self._preempt(state, meta, phase, epoch, step, rows, agn_acc, t0, agn_steps)
            rows = self._log_train(phase, epoch, step, acc)
            # ---- end of epoch: evaluate, compare architectures, log, checkpoint
            row = {"epoch": epoch + 1, "phase": phase, "train_loss": self._epoch_done(rows)}
            row["test_acc"], row["test_loss"] = self.evaluate(progs, state["params"], state["rest"], ones)
            row["val_acc"], _ = self.evaluate(progs, state["params"], state["rest"], ones, "val")
            if searching and not use_agn:  # the baseline's current choice, to log like v
                state["arch"] = self._norm_arch(progs, state["params"], budget.scope)
            if searching:
                arch_np = [np.asarray(v) for v in _to_host(state["arch"])]
                prev_np = [np.asarray(v) for v in _to_host(state["prev_arch"])]
                total = sum(v.size for v in arch_np)
                row["hamming"] = float(sum(np.sum(a != p) for a, p in zip(arch_np, prev_np)) / total)
                row["subnet_val_acc"], _ = self.evaluate(progs, state["params"], state["rest"],
                                                         state["arch"], "val")
                if c.cut.bn_in_search and c.cut.bn_batches and c.val_size:
                    bn_rest = self.bn_reestimated(progs, state["params"], state["rest"], state["arch"])
                    row["subnet_val_acc_bn"], _ = self.evaluate(progs, state["params"], bn_rest,
                                                                state["arch"], "val")
                row["mac_ratio"] = float(flops.mac_ratio(progs.structure, arch_np, budget.scope))
                row["mac_ratio_total"] = float(flops.mac_ratio(progs.structure, arch_np, "total"))
                row["kept_fraction"] = float(np.mean(np.concatenate(arch_np)))
                row["penalty"] = float(penalty.partial_group_lasso(
                    state["params"], state["arch"], progs.structure, include_bn=s.include_bn))
                row["dropped_norm"], row["kept_norm"] = map(float, norms(state["params"], state["arch"]))
                # Alignment: how small the channels to be cut are next to the kept ones (0 = free cut).
                row["alignment_ratio"] = row["dropped_norm"] / max(row["kept_norm"], 1e-12)
                if agn_acc:
                    mean = lambda k: float(np.mean([float(m[k]) for m in agn_acc]))  # noqa: E731
                    row["agn_loss"] = mean("loss")
                    row["agn_resource_loss"] = mean("resource_loss")
                    row["agn_ce"] = mean("ce")
                    row["agn_mac_ratio_sampled"] = mean("mac_ratio_sampled")  # with Gumbel noise
                    row["band_share"] = float(agn_acc[-1]["band_share"])
                    row["agn_lam"] = float(agn_acc[-1]["lam"])
                # "best": judged on the validation split, with re-estimated BN where measured.
                judged = row.get("subnet_val_acc_bn", row["subnet_val_acc"])
                if judged > meta.get("best_subnet_val_acc", -1.0):
                    meta["best_subnet_val_acc"] = judged
                    meta["best_subnet_epoch"] = epoch + 1
                    state["best_arch"] = state["arch"]
                if use_agn and row["mac_ratio"] > s.p and (
                        row.get("band_share", 1.0) < SATURATED_BAND):
                    meta["saturated_epochs"] = meta.get("saturated_epochs", 0) + 1
                    logging.warning(
                        "epoch %d: the generator is saturated above its budget (MAC ratio %.3f, p = "
                        "%s; %.1f%% of its logits in the sensitive band): its decisions have stopped "
                        "moving. Lower agn.learning_rate or agn.b2, or raise agn.tau (docs/method.md).",
                        epoch + 1, row["mac_ratio"], s.p, 100 * row["band_share"])
                state["prev_arch"] = state["arch"]
            for k, v in row.items():
                hist.setdefault(k, []).append(v)
            self.writer.write_scalars(step, {f"epoch/{k}": v for k, v in row.items()
                                             if isinstance(v, float)})
            logging.info("epoch %d/%d [%s] %s", epoch + 1, c.num_epochs, phase,
                         "  ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
            meta["times"][phase] = meta["times"].get(phase, 0.0) + time.perf_counter() - t0
            meta.update(epoch=epoch + 1, step=step, agn_steps=agn_steps,
                        skipped_steps=self.meta.get("skipped_steps", 0))
            boundary = epoch + 1 in (s.e_start, c.num_epochs)
            if boundary or (epoch + 1) % c.checkpoint_every_epochs == 0:
                self._save(state, meta)
            meta = self.meta
        meta["dense_acc"] = hist["test_acc"][-1]
        self.meta = meta
        return state

    def _norm_arch(self, progs: Programs, params: Tree, scope: str) -> list[jax.Array]:
        """Keep the largest-norm channels (sap.norm), to sap.widths or else the budget p."""
        s = self.c.sap
        norms = baselines.channel_norms(_to_host(params), progs.structure, s.norm)
        arch = baselines.arch_by_norm(norms, progs.structure, widths=list(s.widths) or None,
                                      p=None if s.widths else s.p, scope=scope)
        return parallel.replicate(arch, self.mesh)

    def _cut(self, dense: Programs, state: Tree, meta: dict[str, Any]) -> tuple[Programs, Tree]:
        c = self.c
        t0 = time.perf_counter()
        final = state["best_arch"] if c.sap.final_arch == "best" else state["arch"]
        host = _to_host({"params": state["params"], "rest": state["rest"], "arch": final})
        scope, chosen = c.agn.budget_scope, host["arch"]
        ratio = baselines.widths_ratio(dense.structure, [int(np.sum(v)) for v in chosen], scope)
        meta["arch_source"] = {"last": "generator", "best": "generator_best"}.get(
            c.sap.final_arch, "norm")
        # A generator that hovers at p may end one channel over it: take its latest in-budget v
        # if that came within the last search epoch (one AGN step per agn_every weight steps).
        age = int(_to_host(state["fit_age"])) if "fit_age" in state else NEVER_FIT
        if c.sap.final_arch == "last" and ratio > c.sap.p and age <= max(1, self.spe // c.sap.agn_every):
            logging.info("the generator's last architecture keeps %.2f%% of %s MACs, over p = %s; "
                         "the cut takes its latest one within p, from %d AGN steps earlier",
                         100 * ratio, scope, c.sap.p, age)
            meta["arch_ratio_last"], meta["arch_source"] = ratio, "generator_last_within_p"
            final = state["fit_arch"]
            host["arch"] = chosen = _to_host(final)
            ratio = baselines.widths_ratio(dense.structure, [int(np.sum(v)) for v in chosen], scope)
        meta["arch_ratio_chosen"] = ratio
        norms = None  # channel scores, computed once if trimming or rounding needs them
        if c.sap.enforce_budget and ratio > c.sap.p:  # e.g. an AGN that has not reached p yet
            norms = baselines.channel_norms(host["params"], dense.structure, c.sap.norm)
            host["arch"] = baselines.arch_by_norm(norms, dense.structure, p=c.sap.p, scope=scope,
                                                  start=chosen)
        kept = [int(np.sum(v)) for v in host["arch"]]
        meta["trimmed_channels"] = sum(int(np.sum(v)) for v in chosen) - sum(kept)
        if meta["trimmed_channels"]:
            logging.warning("the chosen architecture keeps %.2f%% of %s MACs, over p = %s: dropped "
                            "its %d lowest-norm kept channels to meet p (sap.enforce_budget)",
                            100 * ratio, scope, c.sap.p, meta["trimmed_channels"])
        # Rounding stays within p, or within the chosen ratio when that is over p and kept so.
        budget = c.sap.p if c.sap.enforce_budget else max(c.sap.p, ratio)
        if c.sap.round_to == 0:  # auto: the backend's multiple (none on CPU)
            multiple, widths = baselines.auto_round_widths(dense.structure, kept, budget,
                                                           jax.default_backend(), scope=scope)
        else:
            multiple = c.sap.round_to
            widths = (baselines.round_widths(dense.structure, kept, multiple, budget, scope=scope)
                      if multiple > 1 else kept)
        meta["round_to"] = multiple
        if widths != kept:  # hardware-friendly widths, still within the budget
            if norms is None:
                norms = baselines.channel_norms(host["params"], dense.structure, c.sap.norm)
            host["arch"] = baselines.resize_arch(host["arch"], widths, norms)
            logging.info("widths rounded to multiples of %d: %s -> %s", multiple, kept, widths)
        if host["arch"] is not chosen:
            final = parallel.replicate(host["arch"], self.mesh)
        model = dense.codec.merge(host["params"], host["rest"])
        pruned_model = surgery.extract(model, host["arch"])
        widths = list(pruned_model.widths)
        surgery.save(self.workdir / PRUNED_DIR, pruned_model,
                     dense_widths=dense.model.widths, image_size=c.image_size, overwrite=True,
                     metadata={"dataset": c.dataset, "p": c.sap.p, "stage": "after_cut"})
        pruned = self._programs(widths, "finetune", pruned_model)
        params, rest = pruned.codec.split(pruned_model)
        ft = {"params": params, "rest": rest, "opt_state": pruned.tx.init(params),
              "rng": jax.random.key_data(self.key)}
        ft = parallel.replicate(_to_host(ft), self.mesh)
        ones = [jnp.ones(w) for w in widths]
        meta["cut_acc"], _ = self.evaluate(pruned, ft["params"], ft["rest"], ones)
        meta["subnet_acc_at_cut"], _ = self.evaluate(dense, state["params"], state["rest"], final)
        drop, keep = make_norms(dense.structure, c.sap.include_bn)(state["params"], final)
        meta["alignment_ratio_at_cut"] = float(drop) / max(float(keep), 1e-12)
        if c.cut.bn_batches:  # the extracted model measured, and fine-tuned, with its own statistics
            ft["rest"] = self.bn_reestimated(pruned, ft["params"], ft["rest"], ones)
            meta["cut_acc_bn"], _ = self.evaluate(pruned, ft["params"], ft["rest"], ones)
        logging.info("cut: widths %s; accuracy %.4f raw, %s with BN re-estimated (gated dense "
                     "%.4f); alignment ratio %.3f", widths, meta["cut_acc"],
                     "%.4f" % meta["cut_acc_bn"] if "cut_acc_bn" in meta else "-",
                     meta["subnet_acc_at_cut"], meta["alignment_ratio_at_cut"])
        meta["times"]["cut"] = time.perf_counter() - t0
        meta.update(phase="finetune", epoch=0, widths=widths)
        self._save(ft, meta)
        return pruned, ft

    def _finetune(self, progs: Programs, state: Tree, meta: dict[str, Any]) -> Tree:
        c = self.c
        ones = [jnp.ones(w) for w in progs.model.widths]
        hist = meta["history"]
        step = meta["step"]
        zero = jnp.float32(0.0)
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), DROPOUT_STREAM)
        for epoch in range(meta["epoch"], c.finetune.num_epochs):
            t0 = time.perf_counter()
            start, acc, _ = self._resume_epoch(meta)
            for b in self.data.train_batches(c.num_epochs + epoch, c.batch_size, c.steps_per_epoch or None,
                                             start=start):
                state["params"], state["rest"], state["opt_state"], m = progs.train_step(
                    state["params"], state["rest"], state["opt_state"],
                    parallel.global_batch(b, self.mesh), ones, zero,
                    jax.random.fold_in(dropout_rng, step))
                step += 1
                acc.append(m)
                if step % c.log_every_steps == 0:
                    self._log_train("finetune", epoch, step, acc[-c.log_every_steps:])
                self.progress(step)
                if self.preempted(step):
                    rows = self._log_train("finetune", epoch, step, acc)
                    self._preempt(state, meta, "finetune", epoch, step, rows, [], t0,
                                  meta.get("agn_steps", 0))
            train_loss = self._epoch_done(self._log_train("finetune", epoch, step, acc))
            a, l = self.evaluate(progs, state["params"], state["rest"], ones)
            hist.setdefault("ft_epoch", []).append(epoch + 1)
            hist.setdefault("ft_test_acc", []).append(a)
            hist.setdefault("ft_train_loss", []).append(train_loss)
            self.writer.write_scalars(step, {"finetune/test_acc": a, "finetune/test_loss": l})
            logging.info("fine-tune epoch %d/%d  test_acc %.4f  test_loss %.4f", epoch + 1,
                         c.finetune.num_epochs, a, l)
            meta["times"]["finetune"] = meta["times"].get("finetune", 0.0) + time.perf_counter() - t0
            meta.update(epoch=epoch + 1, step=step, skipped_steps=self.meta.get("skipped_steps", 0))
            if epoch + 1 == c.finetune.num_epochs or (epoch + 1) % c.checkpoint_every_epochs == 0:
                self._save(state, meta)
            meta = self.meta
        return state

    def _finish(self, dense: Programs, pruned: Programs, state: Tree, meta: dict[str, Any]) -> dict[str, Any]:
        c = self.c
        ones = [jnp.ones(w) for w in pruned.model.widths]
        final_acc, _ = self.evaluate(pruned, state["params"], state["rest"], ones)
        host = _to_host({"params": state["params"], "rest": state["rest"]})
        final_model = pruned.codec.merge(host["params"], host["rest"])
        surgery.save(self.workdir / PRUNED_DIR, final_model,
                     dense_widths=dense.model.widths, image_size=c.image_size, overwrite=True,
                     metadata={"dataset": c.dataset, "p": c.sap.p, "stage": "fine_tuned",
                               "test_accuracy": final_acc})
        before, after = flops.count(dense.structure), flops.count(pruned.structure)
        results = report.results(c, meta, before, after, final_acc, dense.structure, pruned.structure)
        if c.speed.enabled:
            # Every process times its own first device (no collectives), so hosts stay in step;
            # process 0's figures are reported. The dense side is a fresh model of the same class
            # (the trained dense weights are gone after fine-tuning; values do not change speed).
            t0 = time.perf_counter()
            results["speed"] = speed.compare(self._model(None), final_model, c.image_size,
                                             tuple(c.speed.batch_sizes), reps=c.speed.reps,
                                             dtype=self.dtype)
            results["times_s"]["speed"] = time.perf_counter() - t0
        results["compile_cache"] = self.cache_stats.as_dict()  # this process's compilations
        if jax.process_index() == 0:
            report.write(self.workdir, results, plots=c.plots)
        self.writer.flush()
        if jax.process_index() == 0:
            print(report.summary(results), flush=True)
        return results


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) the whole SAP method; returns the results dict also written to results.json."""
    return Run(config, workdir).run()
