"""The run spec: a run's config read once, into frozen typed records.

The ml_collections config is what a user writes and what the workdir records; it is read in
one place, :func:`from_config`, right after :func:`sap_jax.train.config.validate`. Everything
below that (the driver's ``Env``, the epoch loop, the search, the steps, the cut) takes a
:class:`RunSpec` or plain arguments, so a newcomer can see what each part reads, a typo'd field
cannot be read as a default, and a field the spec does not know (a renamed one of an older
release, e.g. ``sap.p``) is refused instead of silently ignored.

Field names are the config's, section by section, with these exceptions: the model's fields
(``model``, ``model_kwargs``, ``model_prune``, ``model_ignore``, ``init_from``) form
:class:`ModelSpec`; the data's top-level fields form :class:`DataSpec`; ``num_epochs`` is
``optim.num_epochs`` (the dense + search phase) beside ``finetune.num_epochs``.

The budget's two targets have distinct names: :attr:`BudgetSpec.p` is what the cut meets;
:attr:`BudgetSpec.generator_target` (``p - target_margin``) is what the generator aims at.
:func:`cut_policy` and :func:`resource_loss` build the maths objects of :mod:`sap_jax.method`
from them; validation calls the same two, so it cannot accept what the run would refuse.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from sap_jax import models
from sap_jax.method import cut, resource
from sap_jax.runtime.errors import ConfigError, close_fields
from sap_jax.structure import flops


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The network to prune (config: ``model``, ``model_kwargs``, ``model_prune``,
    ``model_ignore``, ``init_from``)."""

    name: str  # a preset's name, or a factory "package.module:function"
    kwargs: str  # JSON of a factory's further arguments
    prune: str  # a factory's groups: "inner" or "all"
    ignore: tuple[str, ...]  # a factory's layers whose output channels are never pruned
    init_from: str  # starting weights ("torchvision:PATH", "sap_jax:PATH"); "" = random


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The dataset and its batches (config: the top-level data fields)."""

    dataset: str
    data_dir: str
    batch_size: int  # global training batch
    eval_batch_size: int
    steps_per_epoch: int  # 0 = one pass over the training split
    val_size: int  # training examples held out as the validation split
    val_in_finetune: bool  # fine-tuning also trains on the validation images
    shuffle_buffer: int


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One phase's SGD and schedule: ``optim`` (dense + search) or ``finetune``."""

    num_epochs: int  # config: num_epochs for optim, finetune.num_epochs for finetune
    learning_rate: float  # at base_batch_size; scaled linearly with the batch
    base_batch_size: int
    schedule: str  # "step", "cosine" or "constant"
    boundaries: tuple[float, ...]
    decay: float
    warmup_epochs: float
    momentum: float
    nesterov: bool
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """The FLOPs budget (config: ``budget``): the cut meets :attr:`p`; the generator aims at
    :attr:`generator_target`."""

    p: float  # fraction of the metric over `scope` the pruned model keeps: what the cut meets
    metric: str  # "macs" or "latency" (estimated from a latency table)
    latency_table: str  # a table's path; "" = build one in the workdir (metric "latency")
    latency_points: int
    latency_reps: int
    scope: str  # "prunable" or "total"; always "total" with metric "latency" (see _budget)
    enforce: bool
    round_to: int
    form: str
    eps: float
    lam: float
    lam_rate: float
    lam_max_scale: float
    measure: str
    target_margin: float

    @property
    def generator_target(self) -> float:
        """What the generator's resource loss aims at: ``p - target_margin``, so that its
        wobble around the target stays within ``p``."""
        return self.p - self.target_margin


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """SAP's search and alignment (config: ``sap``)."""

    e_start: int
    gamma: float
    penalty: str
    include_bn: bool
    agn_every: int
    subset_fraction: float
    selector: str
    final_arch: str
    penalty_scope: str
    norm: str
    widths: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """The architecture generator and its AdamW (config: ``agn``)."""

    learning_rate: float
    weight_decay: float
    b1: float
    b2: float
    batch_size: int
    tau: float
    offset: float
    z_dim: int
    hidden: int
    deterministic_v: bool


@dataclasses.dataclass(frozen=True)
class CutSpec:
    """BN re-estimation at the cut (config: ``cut``)."""

    bn_batches: int
    bn_in_search: bool


@dataclasses.dataclass(frozen=True)
class SpeedSpec:
    """The inference timing at the end (config: ``speed``)."""

    enabled: bool
    batch_sizes: tuple[int, ...]
    reps: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run reads from its config."""

    model: ModelSpec
    data: DataSpec
    image_size: int  # the model's input and the data's resolution
    seed: int
    dtype: str  # compute dtype: "float32" or "bfloat16"
    optim: OptimSpec
    finetune: OptimSpec
    budget: BudgetSpec
    sap: SearchSpec
    agn: GeneratorSpec
    cut: CutSpec
    speed: SpeedSpec
    # Non-finite steps, logging, checkpoints, plots and the compile cache.
    on_nonfinite: str
    log_every_steps: int
    checkpoint_every_epochs: int
    keep_checkpoints: int
    preemption_check_every_steps: int
    plots: bool
    compile_cache: str
    host_memory: str  # applied by the command line before JAX starts (runtime.host_memory)
    preflight: bool  # a trial cut, save/load and the steps traced on the mesh before training


# -- the maths objects of the budget ------------------------------------------------------------

def cut_policy(budget: BudgetSpec, backend: str, table: Any = None) -> cut.CutPolicy:
    """How the cut meets ``budget.p`` on JAX backend ``backend`` (for ``round_to = 0``); with
    metric "latency", ``table`` is the run's latency table."""
    return cut.CutPolicy(p=budget.p, scope=budget.scope, enforce_budget=budget.enforce,
                         round_to=budget.round_to, backend=backend, table=table)


def resource_loss(budget: BudgetSpec, table: Any = None) -> resource.ResourceLoss:
    """The generator's resource loss: it aims at ``budget.generator_target``, not ``p``; with
    metric "latency" it reads ``table``."""
    return resource.ResourceLoss(budget.generator_target, lam=budget.lam, form=budget.form,
                                 eps=budget.eps, scope=budget.scope, table=table)


def model_arguments(model: ModelSpec, image_size: int) -> dict[str, Any]:
    """What ``models.create(model.name, ...)`` needs beyond a preset's arguments: for a factory
    ``"package.module:function"``, the input size, its JSON arguments and the group choice."""
    if not models.is_factory_path(model.name):
        return {}
    return dict(image_size=image_size, factory_kwargs=json.loads(model.kwargs),
                prune=model.prune, ignore=tuple(model.ignore))


# -- reading the config -------------------------------------------------------------------------

def _value(x: Any) -> Any:
    """A config value as the spec holds it: lists become tuples (the records are frozen)."""
    return tuple(x) if isinstance(x, list) else x


def _fields(cls: type, *, without: tuple[str, ...] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in without]


def _section(get: Callable[[str], Any], name: str, cls: type, **given: Any) -> Any:
    """``cls`` from config section ``name``, field for field (``given`` fields excepted)."""
    return cls(**given, **{f: get(f"{name}.{f}") for f in _fields(cls, without=tuple(given))})


def budget_scope(metric: Any, scope: Any) -> Any:
    """The scope a budget with config fields ``metric`` and ``scope`` is read over: a latency
    budget over the whole forward ("total"), whatever ``scope`` says (layers timed alone do not
    add up to the model's time: ``cut.budget_scope``); else ``scope``. A bad scope is kept, for
    validation to refuse."""
    return "total" if metric == "latency" and scope in flops.SCOPES else scope


def _budget(b: BudgetSpec) -> BudgetSpec:
    return dataclasses.replace(b, scope=budget_scope(b.metric, b.scope))


def _build(get: Callable[[str], Any]) -> RunSpec:
    """The spec, each field read through ``get(dotted_path)``: the one map from config
    fields to spec fields (what it reads is what the config may hold)."""
    return RunSpec(
        model=ModelSpec(name=get("model"), kwargs=get("model_kwargs"), prune=get("model_prune"),
                        ignore=get("model_ignore"), init_from=get("init_from")),
        data=DataSpec(**{f: get(f) for f in _fields(DataSpec)}),
        image_size=get("image_size"), seed=get("seed"), dtype=get("dtype"),
        optim=_section(get, "optim", OptimSpec, num_epochs=get("num_epochs")),
        finetune=_section(get, "finetune", OptimSpec),
        budget=_budget(_section(get, "budget", BudgetSpec)),
        sap=_section(get, "sap", SearchSpec),
        agn=_section(get, "agn", GeneratorSpec),
        cut=_section(get, "cut", CutSpec),
        speed=_section(get, "speed", SpeedSpec),
        **{f: get(f) for f in ("on_nonfinite", "log_every_steps", "checkpoint_every_epochs",
                               "keep_checkpoints", "preemption_check_every_steps", "plots",
                               "compile_cache", "host_memory", "preflight")})


def _is_section(x: Any) -> bool:
    return isinstance(x, (ml_collections.ConfigDict, dict))


def _leaves(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted path of every field (non-section value) of a config."""
    for k, v in node.items():
        if _is_section(v):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def read(config: ml_collections.ConfigDict) -> tuple[RunSpec | None, list[str]]:
    """The spec of ``config`` and what is wrong with its set of fields: one message per field
    the spec does not know (with close matches) or misses. The spec is None when a field is
    missing; its values are as given (``config.validate`` checks them)."""
    read_paths: list[str] = []
    missing: list[str] = []

    def get(path: str) -> Any:
        read_paths.append(path)
        node = config
        for k in path.split("."):
            if not _is_section(node) or k not in node:
                missing.append(path)
                return None
            node = node[k]
        return _value(node)

    spec = _build(get)
    errors = []
    for name in _leaves(config):
        if name not in read_paths:
            close = close_fields(name, dict.fromkeys(read_paths))
            hint = f"; did you mean {' or '.join(close)}?" if close else "."
            errors.append(f"{name} is not a field of a run's config{hint}")
    errors += [f"{name} is missing from the config (configs/default.py sets every field)."
               for name in missing]
    return (None if missing else spec), errors


def from_config(config: ml_collections.ConfigDict) -> RunSpec:
    """The run's spec, read once from its (validated) config; a :class:`ConfigError` listing
    every field the spec does not know or misses."""
    spec, errors = read(config)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return spec
