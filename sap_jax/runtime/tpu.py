"""TPU slices without a TPU: compile-only devices of any topology, the chips' published figures,
and what a compiled program costs there (memory, collectives, a roofline step time).

``libtpu`` (the extra ``sap_jax[tpu]``) holds the XLA TPU compiler; with it, JAX describes a
slice (``jax.experimental.topologies``) whose devices can be compiled for on a plain CPU host.
Nothing here runs on a TPU: every time is an estimate from the compiled program (see
:func:`analyse`), never a measurement.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from sap_jax.runtime import extras, hlo
from sap_jax.runtime.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures (Google Cloud TPU documentation, system
    architecture pages): bf16 peak FLOP/s, HBM bandwidth (B/s) and capacity (bytes), and the
    all-reduce bandwidth per chip (the pod's all-reduce bandwidth over its chips)."""

    generation: str
    device_kind: str  # as JAX names the devices
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    allreduce_bandwidth: float
    megacore: bool  # two TensorCores driven as one device (v4, v5p)
    dims: int  # torus dimensions (2: v5e, v6e; 3: v4, v5p)
    mxu: int = 128  # the matrix unit's width (128x128 systolic arrays; 256x256 on v6e)


CHIPS = {
    # 1.1 PB/s all-reduce over a 4096-chip pod.
    "v4": Chip("v4", "TPU v4", 275e12, 1200e9, 32 * GiB, 1.1e15 / 4096, True, 3),
    # 51.2 TB/s all-reduce over a 256-chip pod (= its 1600 Gbps ICI).
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 819e9, 16 * GiB, 51.2e12 / 256, False, 2),
    # 4800 Gbps ICI per chip (no pod all-reduce figure published).
    "v5p": Chip("v5p", "TPU v5", 459e12, 2765e9, 95 * GiB, 4800e9 / 8, True, 3),
    # 102.4 TB/s all-reduce over a 256-chip pod.
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 1638e9, 32 * GiB, 102.4e12 / 256, False, 2, 256),
}
#: Other names of the generations (Cloud accelerator types).
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
#: Slice shape of each chip count (Cloud TPU's standard single-slice shapes).
SHAPES = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
}
EXTRA_HINT = f"{extras.install_command('tpu')} (the extra pins the libtpu of our jax pin)"


class TpuUnavailable(ConfigError):
    """``libtpu`` is not installed, so nothing can be compiled for a TPU."""


def prepare_environment() -> None:
    """Settings a compile-only TPU process needs; call before JAX loads its TPU plugin.

    ``ALLOW_MULTIPLE_LIBTPU_LOAD``: libtpu takes a machine-wide lock file, so a second process
    loading it (tests under ``pytest -n 2``, a launcher check beside a run) fails; compile-only
    processes share nothing, so several may load it. ``SAP_JAX_XLA_CPU_DEFAULTS``: the library's
    XLA:CPU options must not reach a TPU compile. ``TPU_SKIP_MDS_QUERY``: no cloud metadata to ask
    on a host that is not a TPU VM.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ["SAP_JAX_XLA_CPU_DEFAULTS"] = "1"
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def require_libtpu() -> None:
    if not extras.available("tpu"):
        raise TpuUnavailable(f"the TPU compiler (libtpu) is not installed: {EXTRA_HINT}.")


@dataclasses.dataclass
class Topology:
    """A slice: its name (``"v5e:2x4"``), chip, compile-only devices (one per chip) and hosts."""

    name: str
    chip: Chip
    devices: list[Any]

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def parse_name(name: str) -> tuple[Chip, str]:
    """``"v5e:2x4"``, ``"v4-8"`` or ``"v5litepod-16"`` -> ``(chip, "AxB[xC]")``.

    An accelerator type (``GEN-N``) counts TensorCores for v4 and v5p (two per chip) and chips
    for v5e and v6e, as Cloud TPU does; it maps to the standard shape of that many chips."""
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*([:=_-])\s*([0-9x]+)\s*", name.lower())
    if not m:
        raise ConfigError(f"topology {name!r} is not of the form GENERATION:SHAPE (v5e:2x4, "
                          f"v4:2x2x1) or an accelerator type (v4-8, v5litepod-8).")
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise ConfigError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; sap_jax "
                          f"knows {', '.join(CHIPS)} (aliases: {', '.join(ALIASES)}).")
    chip = CHIPS[gen]
    if m.group(2) != "-" or "x" in m.group(3):
        shape = m.group(3)
        if len(shape.split("x")) != chip.dims:
            raise ConfigError(f"topology {name!r}: a {gen} slice has {chip.dims} dimensions "
                              f"(for example {next(iter(SHAPES[chip.dims].values()))}).")
        return chip, shape
    n = int(m.group(3))
    chips = n // 2 if chip.megacore else n
    if chips not in SHAPES[chip.dims]:
        raise ConfigError(f"accelerator type {name!r}: no standard {gen} shape of {chips} chips; "
                          f"give the shape instead ({gen}:AxB{'xC' if chip.dims == 3 else ''}).")
    return chip, SHAPES[chip.dims][chips]


def topology(name: str) -> Topology:
    """The compile-only devices of slice ``name`` (see :func:`parse_name`). Multi-slice
    topologies are not supported."""
    chip, shape = parse_name(name)
    require_libtpu()
    prepare_environment()
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(
            topology_name=f"{chip.generation}:{shape}", platform="tpu",
            chip_config_name="megacore" if chip.megacore else "default")
    except Exception as e:  # libtpu's own message says what it refused
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"topology {name!r}: libtpu refused it ({reason}).") from None
    return Topology(f"{chip.generation}:{shape}", chip, list(desc.devices))


# -- what a compiled program costs -------------------------------------------------------------

def allreduce_s(collectives: dict[str, dict[str, float]], chip: Chip, chips: int) -> float:
    """Time of the collectives on a bidirectional ring: an all-reduce of B bytes moves
    ``2 (n-1)/n B`` per chip, an all-gather or reduce-scatter half that. Per-collective latency
    is not modelled, and no overlap with compute is assumed."""
    if chips <= 1:
        return 0.0
    share = (chips - 1) / chips
    moved = 0.0
    for op, c in collectives.items():
        moved += c["bytes"] * share * (2.0 if op == "all-reduce" else 1.0)
    return moved / chip.allreduce_bandwidth


def analyse(compiled: Any, chip: Chip, chips: int) -> dict[str, Any]:
    """Memory, cost and collectives of a compiled TPU program, and its estimated step time.

    ``estimated_s`` = per-op roofline of the HLO (:func:`sap_jax.runtime.hlo.roofline_s`) plus
    the collectives' ring time (:func:`allreduce_s`), with the hardware's padding: feature
    dimensions of convolutions and dots rounded up to the chip's MXU width, arrays at their
    tiled layouts' sizes. ``estimated_s_logical`` (``flops``, ``bytes``) leaves the padding out:
    the gap between the two is what unaligned widths waste. XLA's own figures are kept as they
    came (``xla_cost``), ``optimal_seconds`` included, which can be negative and is not used.
    ``hbm_bytes``: arguments + outputs - aliased + temporaries + code, per chip.
    """
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
              ("argument", "output", "alias", "temp", "generated_code")}
    peak = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
            + memory["generated_code"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals",
                                       "optimal_seconds") if k in cost}
    program = hlo.parse(compiled.as_text())
    ops = hlo.op_costs(program)
    padded = hlo.op_costs(program, mxu=chip.mxu, padded=True)
    coll = hlo.collectives(program)
    logical = hlo.roofline_s(ops, chip.peak_flops, chip.hbm_bandwidth)
    compute = hlo.roofline_s(padded, chip.peak_flops, chip.hbm_bandwidth)
    comm = allreduce_s(coll, chip, chips)
    flops = sum(o.flops for o in ops)
    nbytes = sum(o.bytes for o in ops if not o.collective)
    return {"estimated_s": compute + comm, "compute_s": compute, "collectives_s": comm,
            "estimated_s_logical": logical + comm,
            "flops_padded": sum(o.flops for o in padded),
            "bytes_padded": sum(o.bytes for o in padded if not o.collective),
            "roofline": "per-op, padded", "flops": flops, "bytes": nbytes, "hbm_bytes": peak,
            "memory": memory,
            "collectives": {op: int(c["count"]) for op, c in coll.items()},
            "collective_bytes": {op: c["bytes"] for op, c in coll.items()},
            "control_flow": program.has_control_flow, "xla_cost": xla}


def estimator(topology: Topology):
    """``estimate(f, abstract_args) -> ms``: ``f`` compiled for one chip of ``topology`` and its
    :func:`analyse` time, for latency tables of a TPU that is not there
    (``sap_jax.method.latency.build_table(estimate=...)``)."""
    import jax

    from sap_jax.runtime import parallel

    sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])

    def estimate(f, args) -> float:
        placed = parallel.abstract(args, sharding)
        return 1e3 * analyse(jax.jit(f).lower(*placed).compile(), topology.chip, 1)["estimated_s"]
    return estimate
