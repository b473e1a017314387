"""The run's state: the arrays a checkpoint holds, and :class:`Progress`, the one record of where
the run stands (phase, counters, history, the cut's outcome).

On disk ``state`` is a dict of pytrees (the keys below) and ``meta`` is :meth:`Progress.to_json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sap_jax.train.steps import NEVER_FIT

#: Arrays of the dense/search phase: the weights (``params``, ``rest`` = BN statistics and
#: other non-trainable state, ``opt_state``, ``rng``) and the search's (the generator, its
#: optimizer, ``log_lam`` of the adaptive lambda, the current/best/previous architecture and
#: the latest one within the budget with its age in AGN steps).
SEARCH_KEYS = ("params", "rest", "opt_state", "agn_params", "agn_rest", "agn_opt_state",
               "log_lam", "arch", "best_arch", "prev_arch", "fit_arch", "fit_age", "rng")
#: Arrays of the fine-tuning phase.
FINETUNE_KEYS = ("params", "rest", "opt_state", "rng")


def fresh_weights(progs, key: jax.Array) -> dict[str, Any]:
    """A new model's weights, optimizer state and run key (host arrays)."""
    params, rest = progs.codec.split(progs.model)
    out = {"params": params, "rest": rest, "opt_state": progs.tx.init(params),
           "rng": jax.random.key_data(key)}
    assert set(out) == set(FINETUNE_KEYS)
    return out


def fresh_search_state(progs, agn, key: jax.Array) -> dict[str, Any]:
    """Weights plus a new generator (``agn``: a :class:`~sap_jax.train.search.Generator`)."""
    ones = [np.ones(w, np.float32) for w in progs.model.widths]
    agn_params, agn_rest = agn.codec.split(agn.module)
    out = {**fresh_weights(progs, key), "agn_params": agn_params, "agn_rest": agn_rest,
           "agn_opt_state": agn.tx.init(agn_params), "log_lam": np.float32(0.0),
           "arch": ones, "best_arch": ones, "prev_arch": ones,
           "fit_arch": ones, "fit_age": np.int32(NEVER_FIT)}
    assert set(out) == set(SEARCH_KEYS)
    return out


def to_host(tree: Any) -> Any:
    """Replicated global arrays -> NumPy (works when arrays span several processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                        else np.asarray(x), tree)


@dataclasses.dataclass
class Progress:
    """Where the run stands. One owner (the driver and the loop it calls); saved as the
    checkpoint's ``meta`` and read by the report."""

    phase: str = "search"  # "search" (the dense epochs, then the search) or "finetune"
    epoch: int = 0  # epochs of the phase done
    step: int = 0  # weight steps done, all phases
    agn_steps: int = 0
    history: dict[str, list] = dataclasses.field(default_factory=dict)
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # wall seconds per phase
    dense_widths: list[int] | None = None
    skipped_steps: int = 0  # non-finite steps skipped (on_nonfinite = "skip")
    ckpt: int = 0  # the checkpoint this record was saved in; 0 = never saved
    config_hash: str = ""
    # After a preemption: steps done in the current epoch and their metrics.
    step_in_epoch: int = 0
    partial: list = dataclasses.field(default_factory=list)
    partial_agn: list = dataclasses.field(default_factory=list)
    # The search.
    best_subnet_val_acc: float | None = None
    best_subnet_epoch: int | None = None
    saturated_epochs: int = 0
    dense_acc: float | None = None
    # The cut.
    widths: list[int] | None = None
    arch_source: str | None = None
    arch_ratio_chosen: float | None = None
    arch_ratio_last: float | None = None
    trimmed_channels: int | None = None
    round_to: int | None = None
    cut_acc: float | None = None
    cut_acc_bn: float | None = None
    subnet_acc_at_cut: float | None = None
    alignment_ratio_at_cut: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields that are set (None ones left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def pop_partial(self) -> tuple[int, list[dict], list[dict]]:
        """Steps already done in the current epoch and their metrics (after a preemption)."""
        out = self.step_in_epoch, self.partial, self.partial_agn
        self.step_in_epoch, self.partial, self.partial_agn = 0, [], []
        return out

    def log(self, **row: Any) -> None:
        """Append one value per key to the history."""
        for k, v in row.items():
            self.history.setdefault(k, []).append(v)

    def add_time(self, phase: str, seconds: float) -> None:
        self.times[phase] = self.times.get(phase, 0.0) + seconds
