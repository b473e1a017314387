"""The run's state: the arrays a checkpoint holds, and :class:`Progress`, the one record of where
the run stands (phase, counters, history, the cut's outcome).

The arrays are typed records (:class:`Weights`, :class:`SearchState`): pytrees whose fields are
named, so a step or hook rebinds them (``state = state.replace(arch=...)``) instead of writing
string keys into a shared dict. On disk ``state`` stays a dict of pytrees with the keys below
(:meth:`Weights.to_dict` / :meth:`Weights.from_dict`, called only by the checkpoints), and
``meta`` is :meth:`Progress.to_json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import struct

from sap_jax.train.steps import NEVER_FIT

#: Arrays of the dense/search phase: the weights (``params``, ``rest`` = BN statistics and
#: other non-trainable state, ``opt_state``, ``rng``) and the search's (the generator, its
#: optimizer, ``log_lam`` of the adaptive lambda, the current/best/previous architecture and
#: the latest one within the budget with its age in AGN steps).
SEARCH_KEYS = ("params", "rest", "opt_state", "agn_params", "agn_rest", "agn_opt_state",
               "log_lam", "arch", "best_arch", "prev_arch", "fit_arch", "fit_age", "rng")
#: Arrays of the fine-tuning phase.
FINETUNE_KEYS = ("params", "rest", "opt_state", "rng")


@struct.dataclass
class Weights:
    """A model's weights as the epoch loop trains them; all of a fine-tuning checkpoint.

    params, rest: the codec's trees (``rest`` = BN statistics and other non-trainable state).
    opt_state: the weight optimizer's state. rng: the run key's data (dropout keys derive
    from it).
    """

    params: Any
    rest: Any
    opt_state: Any
    rng: Any

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's dict of pytrees (keys: :data:`FINETUNE_KEYS` or
        :data:`SEARCH_KEYS`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Weights:
        """The record of a checkpoint's dict (every key of this class must be there)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@struct.dataclass
class SearchState(Weights):
    """The dense/search phase's arrays: the weights plus the search's.

    agn_params, agn_rest, agn_opt_state: the generator and its optimizer. log_lam: the adaptive
    lambda's log scale. arch, prev_arch, best_arch: the current architecture ``v``, the one at
    the previous epoch's end, the best by validation accuracy. fit_arch, fit_age: the latest
    ``v`` within the budget and its age in AGN steps (``NEVER_FIT`` before any).
    """

    agn_params: Any
    agn_rest: Any
    agn_opt_state: Any
    log_lam: Any
    arch: Any
    best_arch: Any
    prev_arch: Any
    fit_arch: Any
    fit_age: Any


assert {f.name for f in dataclasses.fields(Weights)} == set(FINETUNE_KEYS)
assert {f.name for f in dataclasses.fields(SearchState)} == set(SEARCH_KEYS)


def fresh_weights(progs, key: jax.Array) -> Weights:
    """A new model's weights, optimizer state and run key (host arrays)."""
    params, rest = progs.codec.split(progs.model)
    return Weights(params=params, rest=rest, opt_state=progs.tx.init(params),
                   rng=jax.random.key_data(key))


def fresh_search_state(progs, agn, key: jax.Array) -> SearchState:
    """Weights plus a new generator (``agn``: a :class:`~sap_jax.train.search.Generator`)."""
    ones = [np.ones(w, np.float32) for w in progs.model.widths]
    agn_params, agn_rest = agn.codec.split(agn.module)
    return SearchState(**fresh_weights(progs, key).to_dict(), agn_params=agn_params,
                       agn_rest=agn_rest, agn_opt_state=agn.tx.init(agn_params),
                       log_lam=np.float32(0.0), arch=ones, best_arch=ones, prev_arch=ones,
                       fit_arch=ones, fit_age=np.int32(NEVER_FIT))


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
    lam_capped_steps: int = 0  # AGN steps that ended with the adaptive lambda at its cap
    dense_acc: float | None = None
    # The cut.
    widths: list[int] | None = None
    arch_source: str | None = None
    arch_ratio_chosen: float | None = None
    arch_ratio_last: float | None = None
    trimmed_channels: int | None = None
    round_to: int | None = None
    widths_before_rounding: list[int] | None = None  # kept per group after trimming, unrounded
    finetune_examples: int | None = None  # images fine-tuning draws from (val folded in or not)
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
