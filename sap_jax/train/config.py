"""A run's config: every mistake reported at once, before anything compiles.

:func:`validate` checks the values; the set of fields is the run spec's
(:func:`sap_jax.train.spec.read`: a field it does not know, such as a renamed one of an older
release, is listed with the rest), and the budget is checked by building what the run builds
from the spec (:func:`~sap_jax.train.spec.cut_policy`, :func:`~sap_jax.train.spec.resource_loss`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
from typing import Any

import jax
import ml_collections

from sap_jax import models, tracing
from sap_jax.method import agn, baselines, latency, resource
from sap_jax.runtime import extras, host_memory
from sap_jax.runtime.errors import ConfigError  # noqa: F401 - re-exported (it lived here)
from sap_jax.train import data as data_lib
from sap_jax.train import spec as spec_lib

DATASETS = ("cifar10", "imagenet2012", "digits", "mnist5k")
# Training examples per dataset (before the validation split is carved out), to check
# val_size and batch_size before anything loads; mnist5k's images are 28 px, not resized.
TRAIN_SIZES = {"digits": 1437, "mnist5k": 4000, "cifar10": 50_000, "imagenet2012": 1_281_167}
FIXED_IMAGE_SIZE = {"mnist5k": 28, "cifar10": 32}
NUM_CLASSES = {"digits": 10, "mnist5k": 10, "cifar10": 10, "imagenet2012": 1000}
SCHEDULES = ("step", "cosine", "constant")
METRICS = ("macs", "latency")
PENALTIES = ("gradient", "proximal")
SELECTORS = ("agn", "norm")
FINAL_ARCH = ("last", "best")
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


def _check_optimizer(o: ml_collections.ConfigDict, name: str, epochs: int,
                     errors: list[str]) -> None:
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


def _check_budget(b: spec_lib.BudgetSpec, errors: list[str]) -> None:
    """The ``budget`` section, through the constructors the run calls on the same spec
    (``spec.cut_policy``, ``spec.resource_loss``), so that validation cannot pass a budget the
    run would refuse."""
    first, bad = len(errors), set()
    for field, ok, want in (
            ("form", _in(b.form, resource.FORMS), f"one of {resource.FORMS}"),
            ("eps", _num(b.eps) and b.eps >= 0, ">= 0"),
            ("lam", _num(b.lam) and b.lam >= 0, ">= 0"),
            ("lam_rate", _num(b.lam_rate) and b.lam_rate >= 0, ">= 0 (0 = a fixed lam)"),
            ("lam_max_scale", _num(b.lam_max_scale) and b.lam_max_scale >= 1, ">= 1"),
            ("measure", _in(b.measure, agn.BUDGET_ON), f"one of {agn.BUDGET_ON}"),
            ("enforce", isinstance(b.enforce, bool), "True or False"),
            ("round_to", _int(b.round_to) and b.round_to >= 0,
             "an integer >= 0 (0 = auto for the backend, 1 = no rounding)"),
            ("metric", _in(b.metric, METRICS), f"one of {METRICS}"),
            ("latency_table", isinstance(b.latency_table, str),
             "a path or \"\" (build one in the workdir)"),
            ("latency_points", _int(b.latency_points) and b.latency_points >= 2, "an integer >= 2"),
            ("latency_reps", _int(b.latency_reps) and b.latency_reps >= 1, "an integer >= 1")):
        if not ok:
            bad.add(field)
            errors.append(f"budget.{field} = {getattr(b, field)!r} must be {want}.")
    if b.metric == "macs" and isinstance(b.latency_table, str) and b.latency_table:
        errors.append(f"budget.latency_table = {b.latency_table!r} is read only with "
                      "budget.metric = \"latency\": set the metric, or leave the table \"\".")
    try:
        # A bad round_to is reported above: the policy would only repeat it.
        spec_lib.cut_policy(dataclasses.replace(b, round_to=1) if "round_to" in bad else b,
                            backend="cpu")
    except (ValueError, TypeError) as e:
        errors.append(f"budget: {e}")
        return  # the generator's target below would repeat a bad p or scope
    if not (_num(b.target_margin) and 0 <= b.target_margin < b.p):
        errors.append(f"budget.target_margin = {b.target_margin!r} must lie in [0, p).")
    if len(errors) == first:  # the rest is sound: what the generator aims at must be too
        try:
            spec_lib.resource_loss(b)
        except ValueError as e:
            errors.append(f"budget: {e}")


def _check_factory(c: ml_collections.ConfigDict, run: spec_lib.RunSpec, errors: list[str]):
    """A user's model: its fields, then the factory called and traced abstractly."""
    first = len(errors)
    try:
        kwargs = json.loads(c.model_kwargs) if isinstance(c.model_kwargs, str) else None
    except json.JSONDecodeError as e:
        kwargs = None
        errors.append(f"model_kwargs = {c.model_kwargs!r} is not valid JSON ({e}).")
    if not isinstance(kwargs, dict) and len(errors) == first:
        errors.append(f"model_kwargs = {c.model_kwargs!r} must be a JSON object, e.g. "
                      "'{\"width\": 16}'.")
    if not _in(c.model_prune, tracing.PRUNE):
        errors.append(f"model_prune = {c.model_prune!r}; use one of {tracing.PRUNE}.")
    if not (isinstance(c.model_ignore, (tuple, list))
            and all(isinstance(x, str) for x in c.model_ignore)):
        errors.append(f"model_ignore = {c.model_ignore!r} must be a tuple of layer paths.")
    if len(errors) > first or not (_int(c.image_size) and c.image_size > 0):
        return None
    try:
        dtype = c.dtype if _in(c.dtype, DTYPES) and c.dtype != "float32" else None
        return models.create_abstract(c.model, num_classes=NUM_CLASSES.get(c.dataset), dtype=dtype,
                                      **spec_lib.model_arguments(run.model, c.image_size))
    except ValueError as e:  # tracing.TraceError included
        errors.append(f"model: {e}")
    except Exception as e:  # noqa: BLE001 - a user's factory may raise anything
        errors.append(f"model: building {c.model} failed: {type(e).__name__}: {e}")
    return None


def _check_init_from(c: ml_collections.ConfigDict, model, errors: list[str]) -> None:
    """``init_from``: its form, that the file or directory exists, and what reads it."""
    from sap_jax.surgery import pretrained

    if c.init_from == "":
        return
    if not isinstance(c.init_from, str):
        errors.append(f"init_from = {c.init_from!r} must be a string.")
        return
    try:
        kind, path = pretrained.parse(c.init_from)
    except ValueError as e:
        errors.append(str(e))
        return
    if kind == "torchvision":
        if not os.path.isfile(path):
            errors.append(f"init_from: {path} is not a file (a torchvision state_dict, .pth or "
                          ".safetensors).")
        elif (fmt := pretrained.file_format(path)) is None:
            errors.append(f"init_from: {path} is neither a PyTorch .pth (zip) file nor "
                          ".safetensors.")
        elif fmt == "pth-legacy":
            errors.append(f"init_from: {path} is in PyTorch's pre-1.6 format; re-save it with a "
                          "current torch or convert it to .safetensors.")
        if model is not None and not isinstance(model, (models.ResNet, models.MobileNetV2)):
            errors.append(f"init_from = {c.init_from!r}: torchvision weights convert to the "
                          f"ImageNet ResNets and MobileNetV2, not to model = {c.model!r}.")
    elif not os.path.isdir(path):
        errors.append(f"init_from: {path} is not a directory (a saved model or a run's workdir).")


def _check_model(c: ml_collections.ConfigDict, run: spec_lib.RunSpec, errors: list[str]):
    """The model name and its image size; the abstract model (None if the name is bad)."""
    model = None
    if not isinstance(c.model, str):
        errors.append(f"model = {c.model!r} must be a model name (see sap_jax.models.names()).")
    elif models.is_factory_path(c.model):
        model = _check_factory(c, run, errors)
    elif c.model not in models.PRESETS:
        try:
            models.get_preset(c.model)
        except ValueError as e:
            errors.append(f"model: {e}")
    else:
        model = models.create_abstract(c.model)
    if not _in(c.dataset, DATASETS):
        errors.append(f"dataset = {c.dataset!r} is unknown; use one of {DATASETS}.")
    elif c.dataset in data_lib.DATASET_EXTRAS:
        extra = data_lib.DATASET_EXTRAS[c.dataset]
        if not extras.available(extra):
            errors.append(extras.message(extra, f"dataset = {c.dataset!r}"))
    if not (_int(c.image_size) and c.image_size > 0):
        errors.append(f"image_size = {c.image_size!r} must be a positive integer.")
    elif model is not None:
        try:
            model.check_image_size(c.image_size)
        except ValueError as e:
            errors.append(f"image_size: {e}")

    return model


def _check_data(c: ml_collections.ConfigDict, errors: list[str], device_count: int,
                process_count: int) -> None:
    """Batches, epochs, dtype, the validation split and the dense phase's optimizer."""
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
        errors.append(f"steps_per_epoch = {c.steps_per_epoch!r} must be an integer >= 0 "
                      "(0 = full epoch).")
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
    if not isinstance(c.val_in_finetune, bool):
        errors.append(f"val_in_finetune = {c.val_in_finetune!r} must be True or False.")
    if (_in(c.dataset, DATASETS) and c.dataset in FIXED_IMAGE_SIZE
            and c.image_size != FIXED_IMAGE_SIZE[c.dataset]):
        errors.append(f"image_size = {c.image_size!r}: {c.dataset} images are "
                      f"{FIXED_IMAGE_SIZE[c.dataset]} px (they are not resized).")
    if not _in(c.on_nonfinite, ON_NONFINITE):
        errors.append(f"on_nonfinite = {c.on_nonfinite!r}; use one of {ON_NONFINITE}.")
    _check_optimizer(c.optim, "optim", c.num_epochs if _num(c.num_epochs) else 0, errors)



def _check_latency_table(run: spec_lib.RunSpec, model, errors: list[str]) -> None:
    """A given latency table must load and describe this model at this input size."""
    b = run.budget
    if b.metric != "latency" or not b.latency_table or not isinstance(b.latency_table, str):
        return
    try:
        table = latency.LatencyTable.load(b.latency_table)
        if model is not None:
            table.check_matches(model.structure(run.image_size))
    except ValueError as e:
        errors.append(f"budget.latency_table: {e}")


def _check_sap(c: ml_collections.ConfigDict, model, errors: list[str]) -> None:
    """The search: schedule, penalty, selector and the norm baselines' fields."""
    s = c.sap
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
    if not _in(s.selector, SELECTORS):
        errors.append(f"sap.selector = {s.selector!r}; use one of {SELECTORS}.")
    if not _in(s.final_arch, FINAL_ARCH):
        errors.append(f"sap.final_arch = {s.final_arch!r}; use one of {FINAL_ARCH}.")
    if not _in(s.penalty_scope, PENALTY_SCOPES):
        errors.append(f"sap.penalty_scope = {s.penalty_scope!r}; use one of {PENALTY_SCOPES}.")
    if not _in(s.norm, baselines.NORMS):
        errors.append(f"sap.norm = {s.norm!r}; use one of {baselines.NORMS}.")
    w = s.widths
    if not isinstance(w, (tuple, list)) or any(not _int(x) for x in w):
        errors.append(f"sap.widths = {w!r} must be a tuple of integers (or () for none).")
    elif w and s.selector != "norm":
        errors.append("sap.widths is only used with sap.selector = 'norm'.")
    elif w and model is not None and (len(w) != model.num_groups or any(
            not 1 <= x <= c for x, c in zip(w, model.widths))):
        errors.append(f"sap.widths = {tuple(w)} must give one width in [1, C_k] per group; "
                      f"{c.model} has groups of {list(model.widths)} channels.")

    if s.final_arch == "best" and _int(c.val_size) and c.val_size == 0:
        errors.append("sap.final_arch = 'best' judges sub-networks on the validation split: set "
                      "val_size > 0 (the test split is never used for choices; the paper "
                      "configs hold none out, since final_arch = 'last' chooses nothing on it).")


def _check_agn(c: ml_collections.ConfigDict, errors: list[str], device_count: int) -> None:
    """The generator's optimizer, temperature and batch."""
    a = c.agn
    if not (_num(a.tau) and a.tau > 0):
        errors.append(f"agn.tau = {a.tau!r} must be > 0.")
    if not (_num(a.learning_rate) and a.learning_rate > 0):
        errors.append(f"agn.learning_rate = {a.learning_rate!r} must be > 0.")
    for field in ("b1", "b2"):
        if not (_num(a[field]) and 0 <= a[field] < 1):
            errors.append(f"agn.{field} = {a[field]!r} must lie in [0, 1).")
    if not (_int(a.batch_size) and a.batch_size > 0) or a.batch_size % device_count:
        errors.append(f"agn.batch_size = {a.batch_size!r} must be a positive multiple of the "
                      f"{device_count} devices.")



def _check_rest(c: ml_collections.ConfigDict, errors: list[str]) -> None:
    """The cut, fine-tuning, logging, checkpoints, speed and the compile cache."""
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
    if not isinstance(c.preflight, bool):
        errors.append(f"preflight = {c.preflight!r} must be True or False.")
    if not isinstance(c.compile_cache, str):
        errors.append(f"compile_cache = {c.compile_cache!r} must be a string: \"workdir\", a "
                      "directory, or \"\" (JAX's own setting).")
    if c.host_memory not in host_memory.MODES:
        errors.append(f"host_memory = {c.host_memory!r} must be one of "
                      f"{', '.join(map(repr, host_memory.MODES))}.")

def load_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file ``path`` (a ``configs/NAME.py``; its repository root
    goes on ``sys.path`` so it can import ``configs``). Raises :class:`ConfigError` naming the
    problem when the file is missing or does not load."""
    import sys

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist (--config=configs/NAME.py).")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    spec = importlib.util.spec_from_file_location("_sap_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # noqa: BLE001 - whatever the user's config file raises
        raise ConfigError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from e


def _invalid(errors: list[str]) -> str:
    """One line for one error (what a script greps); a list for several."""
    if len(errors) == 1:
        return f"invalid config: {errors[0]}"
    return "invalid config:\n  - " + "\n  - ".join(errors)


def validate(c: ml_collections.ConfigDict, *, device_count: int | None = None,
             process_count: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every invalid field of ``c``: unknown ones (with close
    matches) and bad values alike. A config missing a field is refused with only that (its
    values cannot be checked)."""
    run, errors = spec_lib.read(c)
    if run is None:
        raise ConfigError(_invalid(errors))
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    model = _check_model(c, run, errors)
    _check_data(c, errors, device_count, process_count)
    _check_budget(run.budget, errors)
    _check_latency_table(run, model, errors)
    _check_sap(c, model, errors)
    _check_agn(c, errors, device_count)
    _check_rest(c, errors)
    _check_init_from(c, model, errors)
    if errors:
        raise ConfigError(_invalid(errors))


#: Fields that change where a run keeps or reads things, what it logs and plots, how often it
#: saves, how the process allocates host memory, the speed measurement and the pre-flight
#: check, never what it computes: a run may resume with other values (another machine's cache
#: or data directory, more logging, a speed re-measurement).
NOT_RESULT_FIELDS = ("compile_cache", "host_memory", "data_dir", "log_every_steps", "plots",
                     "speed", "preflight", "checkpoint_every_epochs", "keep_checkpoints",
                     "preemption_check_every_steps")


def result_fields(d: dict[str, Any],
                  exclude: tuple[str, ...] = NOT_RESULT_FIELDS) -> dict[str, Any]:
    """A config's JSON dict without the fields in ``exclude`` (what resuming must match). A
    latency budget's ``budget.scope`` is read as the run reads it (``spec.budget_scope``)."""
    out = {k: v for k, v in d.items() if k not in exclude}
    b = out.get("budget")
    if isinstance(b, dict):
        out["budget"] = {**b, "scope": spec_lib.budget_scope(b.get("metric"), b.get("scope"))}
    return out


def to_json_dict(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-ready nested dicts (tuples become lists)."""
    import json
    return json.loads(c.to_json())
