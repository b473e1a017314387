"""The jitted hot path and its optimizers: pure functions built once per model shape.

``make_train_step`` (weights, with the partial group lasso), ``make_eval_step``,
``make_agn_step`` (the generator, on the frozen gated model), plus the small jitted helpers
the search reads each AGN step or epoch (``make_fit_tracker``, ``make_norms``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sap_jax.method import agn as agn_lib
from sap_jax.method import penalty, resource
from sap_jax.runtime import xla_cpu
from sap_jax.structure.codec import ModuleCodec
from sap_jax.train.spec import GeneratorSpec, OptimSpec, SearchSpec

#: fit_age before any architecture within the budget has been seen.
NEVER_FIT = 2**30


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------

def lr_schedule(o: OptimSpec, steps_per_epoch: int, num_epochs: int,
                batch_size: int) -> optax.Schedule:
    """The phase's LR per step: linear scaling with the batch, warm-up, then step/cosine/constant.

    ``o``: the phase's optimizer spec (its ``learning_rate``, ``base_batch_size``, ``schedule``,
    ``boundaries``, ``decay`` and ``warmup_epochs`` are read)."""
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


def make_optimizer(o: OptimSpec, schedule: optax.Schedule, *,
                   proximal: Callable[[optax.Schedule], optax.GradientTransformation] | None = None
                   ) -> optax.GradientTransformation:
    """SGD with L2 weight decay added to the gradient (PyTorch style), plus an optional
    proximal link (``o``: its ``weight_decay``, ``momentum`` and ``nesterov`` are read)."""
    chain = [optax.add_decayed_weights(o.weight_decay)] if o.weight_decay else []
    chain.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
    if proximal is not None:
        chain.append(proximal(schedule))
    return optax.chain(*chain)


def make_agn_optimizer(a: GeneratorSpec) -> optax.GradientTransformation:
    """The generator's AdamW (lineage), from its spec (``learning_rate``, ``b1``, ``b2``,
    ``weight_decay``)."""
    return optax.adamw(a.learning_rate, b1=a.b1, b2=a.b2, weight_decay=a.weight_decay)


# --------------------------------------------------------------------------
# Jitted steps
# --------------------------------------------------------------------------

def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(codec: ModuleCodec, structure, tx: optax.GradientTransformation, *,
                    penalty_form: str = "gradient", include_bn: bool = False,
                    dtype: Any = jnp.float32, skip_nonfinite: bool = False) -> Callable:
    """``(params, rest, opt_state, batch, arch, gamma[, key]) -> (params, rest, opt_state,
    metrics)``.

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
            # Rngs are made inside the differentiated trace: nnx refuses to advance one from
            # outside.
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


def make_weight_step(codec: ModuleCodec, structure, o: OptimSpec, s: SearchSpec, *,
                     phase: str, steps_per_epoch: int, batch_size: int, dtype: Any,
                     skip_nonfinite: bool) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, step)``: the weight optimizer and train step of ``phase``, as a run compiles them.

    "search": the dense/search step, its penalty (``s.penalty``: in the loss, or proximal in
    ``tx`` from epoch ``s.e_start``); "plain": the same step without any penalty (a baseline's);
    "finetune": the pruned model's step (``o`` is then the fine-tuning spec).
    """
    sched = lr_schedule(o, steps_per_epoch, o.num_epochs, batch_size)
    prox = None
    if phase == "search" and s.penalty == "proximal":
        start = s.e_start * steps_per_epoch
        prox = lambda lr: penalty.proximal_partial_group_lasso(  # noqa: E731
            structure, lambda n: lr(n) * s.gamma * (n >= start), include_bn=s.include_bn)
    tx = make_optimizer(o, sched, proximal=prox)
    step = make_train_step(codec, structure, tx,
                           penalty_form=s.penalty if phase == "search" else "none",
                           include_bn=s.include_bn, dtype=dtype, skip_nonfinite=skip_nonfinite)
    return tx, step


def make_eval_step(codec: ModuleCodec, dtype: Any = jnp.float32, structure: Any = None) -> Callable:
    """``(params, rest, batch, arch) -> {"correct", "loss", "count"}`` sums over unmasked examples.

    ``structure`` (the model's ``groups.Structure``) picks the CPU compiler options for
    inference."""
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
    meets p, and the pull relaxes back to ``lam`` once it is well under (docs/method.md, "A
    generator that reaches p"). ``lam_rate = 0`` keeps the lineage's fixed ``lam``.

    Nothing is integrated inside the two-sided loss's dead band
    (:func:`sap_jax.method.resource.adapt_log_lam`). ``metrics["lam_capped"]`` is 1 at the cap.
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
            log_lam = resource.adapt_log_lam(log_lam, budget.ratio(structure, arch), budget.p,
                                             rate=lam_rate, eps=budget.dead_band,
                                             max_log=max_log)
        metrics["lam"] = budget.lam * jnp.exp(log_lam)
        metrics["lam_capped"] = ((log_lam >= max_log).astype(jnp.float32)
                                 if lam_rate and max_log > 0 else jnp.float32(0.0))
        return agn_params, agn_opt_state, log_lam, arch, metrics

    return xla_cpu.jit(step, donate_argnums=(0, 2))


def make_fit_tracker(ratio: Callable[[Any], jax.Array], p: float) -> Callable:
    """``(fit_arch, fit_age, arch) -> (fit_arch, fit_age)``: the generator's most recent
    architecture within the budget ``p`` (``ratio(arch)``: its MAC or estimated latency ratio)
    and how many AGN steps ago it came.

    A generator that hovers at p flips single channels across it; on a small model one channel
    can be 1% of the MACs, so its very last v may sit just over p. The cut then takes this one
    (SAP's own choice) instead of trimming channels by norm.
    """
    def fn(fit_arch, fit_age, arch):
        ok = ratio(arch) <= p
        fit_arch = [jnp.where(ok, v, f) for v, f in zip(arch, fit_arch)]
        return fit_arch, jnp.where(ok, 0, jnp.minimum(fit_age, NEVER_FIT - 1) + 1).astype(jnp.int32)

    return xla_cpu.jit(fn, donate_argnums=(0,))


def make_norms(structure, include_bn: bool) -> Callable:
    """``(params, arch) -> (mean dropped, mean kept)`` per-channel norm, summed over a group's
    tensors."""
    def fn(params, arch):
        drop = jnp.sum(penalty.group_penalties(params, arch, structure, include_bn=include_bn))
        keep = jnp.sum(penalty.group_penalties(params, [1 - v for v in arch], structure,
                                               include_bn=include_bn))
        nd = sum(jnp.sum(1 - v) for v in arch)
        nk = sum(jnp.sum(v) for v in arch)
        return drop / jnp.maximum(nd, 1), keep / jnp.maximum(nk, 1)

    return xla_cpu.jit(fn)


