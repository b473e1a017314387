"""Validation of a run's config: every mistake reported at once, before anything compiles."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import ml_collections

from sap_jax import flops, models, resource

DATASETS = ("cifar10", "imagenet2012", "digits")
SCHEDULES = ("step", "cosine", "constant")
PENALTIES = ("gradient", "proximal")
FINAL_ARCH = ("last", "best")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field has a value the run cannot use."""


def _num(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_optimizer(o: ml_collections.ConfigDict, name: str, epochs: int, errors: list[str]) -> None:
    if not (_num(o.learning_rate) and o.learning_rate > 0):
        errors.append(f"{name}.learning_rate = {o.learning_rate!r} must be > 0.")
    if not (isinstance(o.base_batch_size, int) and o.base_batch_size > 0):
        errors.append(f"{name}.base_batch_size = {o.base_batch_size!r} must be a positive integer.")
    if o.schedule not in SCHEDULES:
        errors.append(f"{name}.schedule = {o.schedule!r}; use one of {SCHEDULES}.")
    b = list(o.boundaries)
    if b != sorted(b) or any(not _num(x) or x <= 0 for x in b):
        errors.append(f"{name}.boundaries = {tuple(b)} must be increasing positive epochs.")
    if not (_num(o.decay) and o.decay > 0):
        errors.append(f"{name}.decay = {o.decay!r} must be > 0.")
    if not (_num(o.warmup_epochs) and 0 <= o.warmup_epochs <= max(epochs, 0)):
        errors.append(f"{name}.warmup_epochs = {o.warmup_epochs!r} must lie in [0, {epochs}].")
    if not (_num(o.momentum) and 0 <= o.momentum < 1):
        errors.append(f"{name}.momentum = {o.momentum!r} must lie in [0, 1).")
    if not (_num(o.weight_decay) and o.weight_decay >= 0):
        errors.append(f"{name}.weight_decay = {o.weight_decay!r} must be >= 0.")


def validate(c: ml_collections.ConfigDict, *, device_count: int | None = None,
             process_count: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every invalid field of ``c``."""
    errors: list[str] = []
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count

    model = None
    if c.model not in models.PRESETS:
        try:
            models.get_preset(c.model)
        except ValueError as e:
            errors.append(f"model: {e}")
    else:
        model = models.create_abstract(c.model)
    if c.dataset not in DATASETS:
        errors.append(f"dataset = {c.dataset!r} is unknown; use one of {DATASETS}.")
    if model is not None:
        try:
            model.check_image_size(c.image_size)
        except ValueError as e:
            errors.append(f"image_size: {e}")

    for field in ("batch_size", "eval_batch_size"):
        v = c[field]
        if not (isinstance(v, int) and v > 0):
            errors.append(f"{field} = {v!r} must be a positive integer.")
        elif v % device_count or v % process_count:
            errors.append(f"{field} = {v} does not divide by the {device_count} devices "
                          f"({process_count} processes): use a multiple of {device_count}, "
                          f"e.g. {max(device_count, v // device_count * device_count)}.")
    if not (isinstance(c.num_epochs, int) and c.num_epochs > 0):
        errors.append(f"num_epochs = {c.num_epochs!r} must be a positive integer.")
    if not (isinstance(c.steps_per_epoch, int) and c.steps_per_epoch >= 0):
        errors.append(f"steps_per_epoch = {c.steps_per_epoch!r} must be an integer >= 0 (0 = full epoch).")
    if c.dtype not in DTYPES:
        errors.append(f"dtype = {c.dtype!r}; use one of {DTYPES}.")
    _check_optimizer(c.optim, "optim", c.num_epochs if _num(c.num_epochs) else 0, errors)

    s = c.sap
    try:
        resource.check_budget(s.p)
    except ValueError as e:
        errors.append(f"sap.p: {e}")
    if not (isinstance(s.e_start, int) and 0 <= s.e_start < (c.num_epochs if _num(c.num_epochs) else 0)):
        errors.append(f"sap.e_start = {s.e_start!r} must satisfy 0 <= e_start < num_epochs "
                      f"= {c.num_epochs} (search needs at least one epoch).")
    if not (_num(s.gamma) and s.gamma >= 0):
        errors.append(f"sap.gamma = {s.gamma!r} must be >= 0.")
    if s.penalty not in PENALTIES:
        errors.append(f"sap.penalty = {s.penalty!r}; use one of {PENALTIES}.")
    if not (isinstance(s.agn_every, int) and s.agn_every >= 1):
        errors.append(f"sap.agn_every = {s.agn_every!r} must be an integer >= 1.")
    if not (_num(s.subset_fraction) and 0 < s.subset_fraction <= 1):
        errors.append(f"sap.subset_fraction = {s.subset_fraction!r} must lie in (0, 1].")
    if s.final_arch not in FINAL_ARCH:
        errors.append(f"sap.final_arch = {s.final_arch!r}; use one of {FINAL_ARCH}.")

    a = c.agn
    if not (_num(a.tau) and a.tau > 0):
        errors.append(f"agn.tau = {a.tau!r} must be > 0.")
    if not (_num(a.learning_rate) and a.learning_rate > 0):
        errors.append(f"agn.learning_rate = {a.learning_rate!r} must be > 0.")
    if not (isinstance(a.batch_size, int) and a.batch_size > 0) or a.batch_size % device_count:
        errors.append(f"agn.batch_size = {a.batch_size!r} must be a positive multiple of the "
                      f"{device_count} devices.")
    try:
        resource.ResourceLoss(s.p if _num(s.p) and 0 < s.p <= 1 else 1.0, lam=a.lam,
                              form=a.resource_form, eps=a.resource_eps, scope=a.budget_scope)
    except ValueError as e:
        errors.append(f"agn: {e}")
    if a.budget_scope not in flops.SCOPES and not any("scope" in e for e in errors):
        errors.append(f"agn.budget_scope = {a.budget_scope!r}; use one of {flops.SCOPES}.")

    f = c.finetune
    if not (isinstance(f.num_epochs, int) and f.num_epochs >= 0):
        errors.append(f"finetune.num_epochs = {f.num_epochs!r} must be an integer >= 0.")
    _check_optimizer(f, "finetune", f.num_epochs if _num(f.num_epochs) else 0, errors)
    for field in ("log_every_steps", "checkpoint_every_epochs", "keep_checkpoints"):
        if not (isinstance(c[field], int) and c[field] >= 1):
            errors.append(f"{field} = {c[field]!r} must be an integer >= 1.")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def to_json_dict(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-ready nested dicts (tuples become lists)."""
    import json
    return json.loads(c.to_json())
