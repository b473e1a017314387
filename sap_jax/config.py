"""Validation of a run's config: every mistake reported at once, before anything compiles."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import ml_collections

from sap_jax import agn, baselines, flops, models, resource
from sap_jax.errors import ConfigError  # noqa: F401 - defined here before sap_jax.errors

DATASETS = ("cifar10", "imagenet2012", "digits", "mnist5k")
# Training examples per dataset (before the validation split is carved out), to check
# val_size and batch_size before anything loads; mnist5k's images are 28 px, not resized.
TRAIN_SIZES = {"digits": 1437, "mnist5k": 4000, "cifar10": 50_000, "imagenet2012": 1_281_167}
FIXED_IMAGE_SIZE = {"mnist5k": 28, "cifar10": 32}
SCHEDULES = ("step", "cosine", "constant")
PENALTIES = ("gradient", "proximal")
FINAL_ARCH = ("last", "best", "norm")
PENALTY_SCOPES = ("partial", "all")
DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")


def _num(x: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _in(x: Any, options: tuple) -> bool:
    return isinstance(x, str) and x in options


def _check_optimizer(o: ml_collections.ConfigDict, name: str, epochs: int, errors: list[str]) -> None:
    if not (_num(o.learning_rate) and o.learning_rate > 0):
        errors.append(f"{name}.learning_rate = {o.learning_rate!r} must be > 0.")
    if not (_int(o.base_batch_size) and o.base_batch_size > 0):
        errors.append(f"{name}.base_batch_size = {o.base_batch_size!r} must be a positive integer.")
    if not _in(o.schedule, SCHEDULES):
        errors.append(f"{name}.schedule = {o.schedule!r}; use one of {SCHEDULES}.")
    b = o.boundaries
    if (not isinstance(b, (tuple, list)) or any(not _num(x) or x <= 0 for x in b)
            or list(b) != sorted(b)):
        errors.append(f"{name}.boundaries = {b!r} must be a tuple of increasing positive epochs.")
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
    if not isinstance(c.model, str):
        errors.append(f"model = {c.model!r} must be a model name (see sap_jax.models.names()).")
    elif c.model not in models.PRESETS:
        try:
            models.get_preset(c.model)
        except ValueError as e:
            errors.append(f"model: {e}")
    else:
        model = models.create_abstract(c.model)
    if not _in(c.dataset, DATASETS):
        errors.append(f"dataset = {c.dataset!r} is unknown; use one of {DATASETS}.")
    if not (_int(c.image_size) and c.image_size > 0):
        errors.append(f"image_size = {c.image_size!r} must be a positive integer.")
    elif model is not None:
        try:
            model.check_image_size(c.image_size)
        except ValueError as e:
            errors.append(f"image_size: {e}")

    for field in ("batch_size", "eval_batch_size"):
        v = c[field]
        if not (_int(v) and v > 0):
            errors.append(f"{field} = {v!r} must be a positive integer.")
        elif v % device_count or v % process_count:
            errors.append(f"{field} = {v} does not divide by the {device_count} devices "
                          f"({process_count} processes): use a multiple of {device_count}, "
                          f"e.g. {max(device_count, v // device_count * device_count)}.")
    if not (_int(c.num_epochs) and c.num_epochs > 0):
        errors.append(f"num_epochs = {c.num_epochs!r} must be a positive integer.")
    if not (_int(c.steps_per_epoch) and c.steps_per_epoch >= 0):
        errors.append(f"steps_per_epoch = {c.steps_per_epoch!r} must be an integer >= 0 (0 = full epoch).")
    if not _in(c.dtype, DTYPES):
        errors.append(f"dtype = {c.dtype!r}; use one of {DTYPES}.")
    if not (_int(c.val_size) and c.val_size >= 0):
        errors.append(f"val_size = {c.val_size!r} must be an integer >= 0 (training examples held "
                      "out as the validation split).")
    elif _in(c.dataset, DATASETS) and _int(c.batch_size):
        left = TRAIN_SIZES[c.dataset] - c.val_size
        if left < c.batch_size:
            errors.append(f"val_size = {c.val_size} leaves {left} of {c.dataset}'s "
                          f"{TRAIN_SIZES[c.dataset]} training examples, fewer than one batch "
                          f"(batch_size = {c.batch_size}).")
    if (_in(c.dataset, DATASETS) and c.dataset in FIXED_IMAGE_SIZE
            and c.image_size != FIXED_IMAGE_SIZE[c.dataset]):
        errors.append(f"image_size = {c.image_size!r}: {c.dataset} images are "
                      f"{FIXED_IMAGE_SIZE[c.dataset]} px (they are not resized).")
    if not _in(c.on_nonfinite, ON_NONFINITE):
        errors.append(f"on_nonfinite = {c.on_nonfinite!r}; use one of {ON_NONFINITE}.")
    _check_optimizer(c.optim, "optim", c.num_epochs if _num(c.num_epochs) else 0, errors)

    s = c.sap
    try:
        resource.check_budget(s.p)
    except ValueError as e:
        errors.append(f"sap.p: {e}")
    if not (_int(s.e_start) and 0 <= s.e_start < (c.num_epochs if _num(c.num_epochs) else 0)):
        errors.append(f"sap.e_start = {s.e_start!r} must satisfy 0 <= e_start < num_epochs "
                      f"= {c.num_epochs} (search needs at least one epoch).")
    if not (_num(s.gamma) and s.gamma >= 0):
        errors.append(f"sap.gamma = {s.gamma!r} must be >= 0.")
    if not _in(s.penalty, PENALTIES):
        errors.append(f"sap.penalty = {s.penalty!r}; use one of {PENALTIES}.")
    if not (_int(s.agn_every) and s.agn_every >= 1):
        errors.append(f"sap.agn_every = {s.agn_every!r} must be an integer >= 1.")
    if not (_num(s.subset_fraction) and 0 < s.subset_fraction <= 1):
        errors.append(f"sap.subset_fraction = {s.subset_fraction!r} must lie in (0, 1].")
    if not _in(s.final_arch, FINAL_ARCH):
        errors.append(f"sap.final_arch = {s.final_arch!r}; use one of {FINAL_ARCH}.")
    if not (_int(s.round_to) and s.round_to >= 0):
        errors.append(f"sap.round_to = {s.round_to!r} must be an integer >= 0 "
                      "(0 = auto for the backend, 1 = no rounding).")
    if not isinstance(s.enforce_budget, bool):
        errors.append(f"sap.enforce_budget = {s.enforce_budget!r} must be True or False.")
    if not _in(s.penalty_scope, PENALTY_SCOPES):
        errors.append(f"sap.penalty_scope = {s.penalty_scope!r}; use one of {PENALTY_SCOPES}.")
    if not _in(s.norm, baselines.NORMS):
        errors.append(f"sap.norm = {s.norm!r}; use one of {baselines.NORMS}.")
    w = s.widths
    if not isinstance(w, (tuple, list)) or any(not _int(x) for x in w):
        errors.append(f"sap.widths = {w!r} must be a tuple of integers (or () for none).")
    elif w and s.final_arch != "norm":
        errors.append("sap.widths is only used with sap.final_arch='norm'.")
    elif w and model is not None and (len(w) != model.num_groups or any(
            not 1 <= x <= c for x, c in zip(w, model.widths))):
        errors.append(f"sap.widths = {tuple(w)} must give one width in [1, C_k] per group; "
                      f"{c.model} has groups of {list(model.widths)} channels.")

    a = c.agn
    if not (_num(a.tau) and a.tau > 0):
        errors.append(f"agn.tau = {a.tau!r} must be > 0.")
    if not (_num(a.learning_rate) and a.learning_rate > 0):
        errors.append(f"agn.learning_rate = {a.learning_rate!r} must be > 0.")
    for field in ("b1", "b2"):
        if not (_num(a[field]) and 0 <= a[field] < 1):
            errors.append(f"agn.{field} = {a[field]!r} must lie in [0, 1).")
    if not (_num(a.lam_rate) and a.lam_rate >= 0):
        errors.append(f"agn.lam_rate = {a.lam_rate!r} must be >= 0 (0 = a fixed lam).")
    if not (_num(a.lam_max_scale) and a.lam_max_scale >= 1):
        errors.append(f"agn.lam_max_scale = {a.lam_max_scale!r} must be >= 1.")
    if not _in(a.budget_on, agn.BUDGET_ON):
        errors.append(f"agn.budget_on = {a.budget_on!r}; use one of {agn.BUDGET_ON}.")
    if not (_int(a.batch_size) and a.batch_size > 0) or a.batch_size % device_count:
        errors.append(f"agn.batch_size = {a.batch_size!r} must be a positive multiple of the "
                      f"{device_count} devices.")
    p_ok = _num(s.p) and 0 < s.p <= 1
    if not (_num(a.target_margin) and 0 <= a.target_margin < (s.p if p_ok else 1.0)):
        errors.append(f"agn.target_margin = {a.target_margin!r} must lie in [0, p).")
    else:
        try:
            resource.ResourceLoss.from_config(c) if p_ok else resource.ResourceLoss(
                1.0, lam=a.lam, form=a.resource_form, eps=a.resource_eps, scope=a.budget_scope)
        except ValueError as e:
            errors.append(f"agn: {e}")
    if not _in(a.budget_scope, flops.SCOPES) and not any("scope" in e for e in errors):
        errors.append(f"agn.budget_scope = {a.budget_scope!r}; use one of {flops.SCOPES}.")

    if s.final_arch == "best" and _int(c.val_size) and c.val_size == 0:
        errors.append("sap.final_arch = 'best' judges sub-networks on the validation split: set "
                      "val_size > 0 (the test split is never used for choices).")
    cut = c.cut
    if not (_int(cut.bn_batches) and cut.bn_batches >= 0):
        errors.append(f"cut.bn_batches = {cut.bn_batches!r} must be an integer >= 0 (0 = no BN "
                      "re-estimation).")
    if not isinstance(cut.bn_in_search, bool):
        errors.append(f"cut.bn_in_search = {cut.bn_in_search!r} must be True or False.")

    f = c.finetune
    if not (_int(f.num_epochs) and f.num_epochs >= 0):
        errors.append(f"finetune.num_epochs = {f.num_epochs!r} must be an integer >= 0.")
    _check_optimizer(f, "finetune", f.num_epochs if _num(f.num_epochs) else 0, errors)
    for field in ("log_every_steps", "checkpoint_every_epochs", "keep_checkpoints",
                  "preemption_check_every_steps"):
        if not (_int(c[field]) and c[field] >= 1):
            errors.append(f"{field} = {c[field]!r} must be an integer >= 1.")
    sp = c.speed
    if not isinstance(sp.enabled, bool):
        errors.append(f"speed.enabled = {sp.enabled!r} must be True or False.")
    b = sp.batch_sizes
    if not (isinstance(b, (tuple, list)) and b and all(_int(x) and x >= 1 for x in b)):
        errors.append(f"speed.batch_sizes = {b!r} must be a non-empty tuple of positive integers.")
    if not (_int(sp.reps) and sp.reps >= 1):
        errors.append(f"speed.reps = {sp.reps!r} must be an integer >= 1.")
    if not isinstance(c.compile_cache, str):
        errors.append(f"compile_cache = {c.compile_cache!r} must be a string: \"workdir\", a "
                      "directory, or \"\" (JAX's own setting).")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


#: Fields that change where a run keeps things, not what it computes: a run may resume with
#: other values (another machine's cache directory).
NOT_RESULT_FIELDS = ("compile_cache",)


def result_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A config's JSON dict without :data:`NOT_RESULT_FIELDS` (what resuming must match)."""
    return {k: v for k, v in d.items() if k not in NOT_RESULT_FIELDS}


def to_json_dict(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-ready nested dicts (tuples become lists)."""
    import json
    return json.loads(c.to_json())
