"""Compile a run's steps for a TPU slice that is not there, and say what they would cost.

Every jitted step a run compiles is lowered with the run's own mesh (one ``data`` axis over all
chips), shardings (weights replicated, batches split), global batch and dtype, onto the
compile-only devices of a topology (:mod:`sap_jax.runtime.tpu`), and compiled by the XLA TPU
compiler on this host. Each compiled program gives its memory per chip, its collectives, and a
roofline estimate of its time (:func:`sap_jax.runtime.tpu.analyse`). These are compiler
estimates, not measurements.

The steps (:data:`STEPS`): the dense/search weight step with SAP's penalty ("sap") and the same
step without it ("plain", a baseline's), the generator's step ("agn"), evaluation ("eval"), and
the fine-tuning step of the model pruned to ``budget.p`` with uniform widths ("finetune") and
with those widths rounded to multiples of 128, the MXU's width ("finetune_r128").
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sap_jax.method import baselines, cut
from sap_jax.runtime import parallel, tpu
from sap_jax.runtime.errors import ConfigError
from sap_jax.structure import flops
from sap_jax.structure.codec import ModuleCodec
from sap_jax.train import config as config_lib
from sap_jax.train import search, steps, tables
from sap_jax.train import spec as spec_lib

STEPS = ("plain", "sap", "agn", "eval", "finetune", "finetune_r128")
#: The MXU's width: kept widths rounded to it fill the systolic array.
TPU_MULTIPLE = 128


@dataclasses.dataclass
class Compiled:
    """One step compiled for the slice: what it costs and how many images it handles."""

    name: str
    images: int  # per step, whole slice
    compile_s: float
    cost: dict[str, Any]

    def row(self, chips: int) -> dict[str, Any]:
        c = self.cost
        if "refused" in c:  # the compiler ran out of HBM: no program, only what it needed
            return {"estimated_s": None, "images_per_s": None, "hbm_bytes": c["hbm_bytes"],
                    "collectives": {}, "compile_s": self.compile_s, "refused": c["refused"]}
        return {"estimated_s": c["estimated_s"],
                "images_per_s": self.images / c["estimated_s"] / chips if c["estimated_s"] > 0
                else None,
                "hbm_bytes": c["hbm_bytes"], "collectives": c["collectives"],
                "compile_s": self.compile_s, "compute_s": c["compute_s"],
                "collectives_s": c["collectives_s"], "flops": c["flops"], "bytes": c["bytes"],
                "estimated_s_logical": c["estimated_s_logical"],
                "flops_padded": c["flops_padded"], "bytes_padded": c["bytes_padded"],
                "memory": c["memory"], "control_flow": c["control_flow"],
                "xla_cost": c["xla_cost"]}


_SIZE = re.compile(r"\b([0-9]+(?:\.[0-9]+)?)([KMGT])\b")


def out_of_memory(error: Exception) -> dict[str, Any] | None:
    """What a compile the TPU compiler refused for lack of HBM needed, or None for any other
    error. ``hbm_bytes`` is the first size its message names ("... required for HLO temporaries
    (22.02G) exceeds available HBM (15.75G)", or "Used 17.25G of 15.48G hbm"): a lower bound
    (temporaries alone leave out the arguments), None when the message names no size."""
    msg = str(error)
    if "RESOURCE_EXHAUSTED" not in msg:
        return None
    sizes = [float(v) * 1024 ** " KMGT".index(u) for v, u in _SIZE.findall(msg)]
    line = next((x for x in msg.splitlines() if "RESOURCE_EXHAUSTED" in x), msg)
    return {"hbm_bytes": sizes[0] if sizes else None, "refused": line.strip()}


class Planner:
    """The abstract arguments of a run's steps on ``mesh``, for a model at any widths."""

    def __init__(self, spec: spec_lib.RunSpec, mesh: Mesh, num_classes: int):
        self.spec, self.mesh, self.num_classes = spec, mesh, num_classes
        self.rep = parallel.param_sharding(mesh)
        self.split = parallel.batch_sharding(mesh)
        self.dtype = jnp.dtype(spec.dtype)
        train_size = config_lib.TRAIN_SIZES.get(spec.data.dataset, 0)
        self.spe = spec.data.steps_per_epoch or max(1, train_size // spec.data.batch_size)

    def model(self, widths: Sequence[int] | None = None) -> Any:
        """The config's model (dense, or at ``widths``) without arrays."""
        ws = None if widths is None else list(widths)
        return nnx.eval_shape(lambda: tables.model_for(self.spec, self.num_classes, ws))

    def batch(self, size: int, mask: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
        s = self.spec.image_size
        b = {"image": jax.ShapeDtypeStruct((size, s, s, 3), jnp.float32, sharding=self.split),
             "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=self.split)}
        if mask:
            b["mask"] = jax.ShapeDtypeStruct((size,), jnp.float32, sharding=self.split)
        return b

    def arch(self, widths: Sequence[int]) -> list[jax.ShapeDtypeStruct]:
        return [jax.ShapeDtypeStruct((w,), jnp.float32, sharding=self.rep) for w in widths]

    def scalar(self, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), dtype, sharding=self.rep)

    def key(self) -> jax.ShapeDtypeStruct:
        k = jax.eval_shape(lambda: jax.random.key(0))
        return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=self.rep)

    def state(self, module: Any, tx: Any = None) -> tuple[Any, ...]:
        """``module``'s ``(params, rest)`` and, with ``tx``, its optimizer state: replicated,
        as the run places them."""
        params, rest = ModuleCodec(module).split(module)
        trees = (params, rest) if tx is None else (params, rest, jax.eval_shape(tx.init, params))
        return tuple(parallel.abstract(t, self.rep) for t in trees)

    def weight_step(self, model: Any, phase: str) -> tuple[Callable, tuple]:
        spec = self.spec
        structure = model.structure(spec.image_size)
        o = spec.finetune if phase == "finetune" else spec.optim
        tx, step = steps.make_weight_step(
            ModuleCodec(model), structure, o, spec.sap, phase=phase, steps_per_epoch=self.spe,
            batch_size=spec.data.batch_size, dtype=self.dtype,
            skip_nonfinite=spec.on_nonfinite == "skip")
        args = (*self.state(model, tx), self.batch(spec.data.batch_size),
                self.arch(model.widths), self.scalar(), self.key())
        return step, args

    def eval_step(self, model: Any) -> tuple[Callable, tuple]:
        step = steps.make_eval_step(ModuleCodec(model), self.dtype,
                                    model.structure(self.spec.image_size))
        return step, (*self.state(model), self.batch(self.spec.data.eval_batch_size, mask=True),
                      self.arch(model.widths))

    def agn_step(self, model: Any) -> tuple[Callable, tuple]:
        spec = self.spec
        structure = model.structure(spec.image_size)
        gen = search.make_generator(spec.agn, model.widths, spec.seed)
        # The generator's budget reads MACs here: a latency table changes only the few scalar
        # ops of its resource loss, not what the step costs.
        budget = spec_lib.resource_loss(dataclasses.replace(spec.budget, metric="macs"))
        a, b = spec.agn, spec.budget
        step = steps.make_agn_step(
            ModuleCodec(model), gen.codec, structure, budget, gen.tx, tau=a.tau, offset=a.offset,
            deterministic_v=a.deterministic_v, lam_rate=b.lam_rate,
            lam_max_scale=b.lam_max_scale, budget_on=b.measure, dtype=self.dtype)
        return step, (*self.state(gen.module, gen.tx), self.scalar(), *self.state(model),
                      self.batch(spec.agn.batch_size), self.key())


def pruned_widths(structure: Any, p: float, scope: str) -> dict[str, list[int]]:
    """The widths the fine-tuning steps are compiled at: uniform at ``p`` and those rounded to
    multiples of :data:`TPU_MULTIPLE` within ``p`` (a group narrower than 128 stays whole)."""
    uniform = baselines.uniform_widths(structure, p, scope)
    rounded = cut.round_widths(structure, uniform, TPU_MULTIPLE, p, scope=scope, warn=False)
    return {"finetune": uniform, "finetune_r128": rounded}


def mesh_of(topology: tpu.Topology) -> Mesh:
    """The run's mesh (:func:`sap_jax.runtime.parallel.make_mesh`) over the slice's devices."""
    return parallel.make_mesh(topology.devices)


def compile_steps(spec: spec_lib.RunSpec, topology: tpu.Topology, *,
                  names: Sequence[str] = STEPS,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compile the run's ``names`` steps for ``topology``; the report :func:`summary` reads."""
    log = log or logging.getLogger(__name__).info
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ConfigError(f"unknown steps {unknown}; choose from {', '.join(STEPS)}.")
    num_classes = config_lib.NUM_CLASSES.get(spec.data.dataset)
    planner = Planner(spec, mesh_of(topology), num_classes)
    dense = planner.model()
    structure = dense.structure(spec.image_size)
    widths = pruned_widths(structure, spec.budget.p, spec.budget.scope)
    ratios = {k: cut.widths_ratio(structure, w, spec.budget.scope) for k, w in widths.items()}
    plans = {
        "plain": lambda: planner.weight_step(dense, "plain"),
        "sap": lambda: planner.weight_step(dense, "search"),
        "agn": lambda: planner.agn_step(dense),
        "eval": lambda: planner.eval_step(dense),
        "finetune": lambda: planner.weight_step(planner.model(widths["finetune"]), "finetune"),
        "finetune_r128": lambda: planner.weight_step(planner.model(widths["finetune_r128"]),
                                                     "finetune"),
    }
    images = {"agn": spec.agn.batch_size, "eval": spec.data.eval_batch_size}
    compiled: dict[str, Compiled] = {}
    # The arguments carry the slice's shardings: no mesh context (`with mesh:` is deprecated).
    for name in names:
        log(f"{name}: compiling")  # the line a compiler crash is reported against
        fn, args = plans[name]()
        t0 = time.perf_counter()
        try:
            exe = fn.lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - out of HBM is an answer; anything else raises
            cost = out_of_memory(e)
            if cost is None:
                raise
            log(f"{name}: does not fit, {cost['refused']}")
        else:
            cost = tpu.analyse(exe, topology.chip, topology.chips)
            log(f"{name}: compiled in {time.perf_counter() - t0:.1f} s, estimated "
                f"{cost['estimated_s'] * 1e3:.2f} ms, {cost['hbm_bytes'] / tpu.GiB:.2f} GiB "
                "per chip")
        compiled[name] = Compiled(name, images.get(name, spec.data.batch_size),
                                  time.perf_counter() - t0, cost)
    return {"compiled": compiled, "widths": widths, "macs_ratio": ratios,
            "dense_macs": flops.count(structure)}


def summary(topology: tpu.Topology, report: dict[str, Any]) -> dict[str, Any]:
    """The JSON result: the slice, whether every step fits, each step's row, and the ratios
    (``sap_over_plain``: SAP's weight step over the plain one; ``pruned_speedup_estimated``:
    the plain dense step over the pruned fine-tuning step, uniform and rounded to 128)."""
    chip, n = topology.chip, topology.chips
    rows = {k: c.row(n) for k, c in report["compiled"].items()}
    need = max((r["hbm_bytes"] or 0 for r in rows.values()), default=0)
    t = {k: r["estimated_s"] for k, r in rows.items() if r["estimated_s"]}
    out = {"topology": topology.name, "chips": n, "hosts": topology.hosts,
           "hbm_capacity_bytes": chip.hbm_bytes, "hbm_needed_bytes": need,
           "fits": need <= chip.hbm_bytes, "steps": rows,
           "chip": dataclasses.asdict(chip),
           "estimate": "per-op roofline of the compiled HLO (conv/dot FLOPs at peak bf16 with "
                       "feature dimensions padded to the MXU width, operand and result bytes "
                       "at their tiled layouts' sizes at HBM bandwidth, each op its own max) "
                       "plus ring all-reduce time at the chip's all-reduce bandwidth; compiler "
                       "estimates, not measurements (estimated_s_logical: without padding)",
           "pruned_widths": report["widths"], "pruned_macs_ratio": report["macs_ratio"]}
    refused = [r for r in rows.values() if "refused" in r]
    out["fits"] = out["fits"] and not refused
    if "plain" in t and "sap" in t:
        out["sap_over_plain"] = t["sap"] / t["plain"]
    if "plain" in t:
        out["pruned_speedup_estimated"] = {
            k: t["plain"] / t[k] for k in ("finetune", "finetune_r128") if k in t}
        logical = {k: r["estimated_s_logical"] for k, r in rows.items() if r["estimated_s"]}
        out["pruned_speedup_estimated_logical"] = {
            k: logical["plain"] / logical[k] for k in ("finetune", "finetune_r128")
            if k in logical}
    return out
