"""SAP's part of the dense/search phase, as hooks of the epoch loop (docs/method.md §4).

From epoch ``sap.e_start`` the penalty reads the current architecture ``v``; every
``sap.agn_every`` weight steps the generator takes one step on the frozen, gated model and
proposes a new ``v``. Each search epoch ends with the search's health: sub-network accuracy
on the validation split, MAC ratio, penalty, alignment ratio and the generator's own signals.
The norm baselines (``sap.selector = "norm"``) choose ``v`` by channel norm instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sap_jax.method import agn as agn_lib
from sap_jax.method import baselines, penalty
from sap_jax.runtime import console, parallel, xla_cpu
from sap_jax.structure import flops
from sap_jax.structure import norms as norms_lib
from sap_jax.structure.codec import ModuleCodec
from sap_jax.train import steps
from sap_jax.train.loop import Phase
from sap_jax.train.spec import GeneratorSpec
from sap_jax.train.state import Progress, SearchState, to_host

#: A generator whose logits have fewer than this share in the sensitive band is saturated.
SATURATED_BAND = 0.01


@dataclasses.dataclass
class Generator:
    """The AGN module, its codec and its optimizer."""

    module: agn_lib.AGN
    codec: ModuleCodec
    tx: optax.GradientTransformation


def make_generator(agn: GeneratorSpec, widths, seed: int) -> Generator:
    """A new generator for groups of ``widths`` channels (``seed``: the run's; the generator
    draws from ``seed + 1``)."""
    gen = agn_lib.AGN(widths, z_dim=agn.z_dim, hidden=agn.hidden, seed=seed + 1)
    return Generator(gen, ModuleCodec(gen), steps.make_agn_optimizer(agn))


class Search:
    """The hooks of the dense/search phase for one run (see :meth:`phase`).

    It reads the run's spec (``env.spec``): the search's fields (``sap``), the generator's
    (``agn``) and the budget's two targets: ``cut_p`` (``budget.p``), what the cut will keep,
    and the generator's own (``env.generator_loss``, at ``budget.generator_target``).
    """

    def __init__(self, env, progs, gen: Generator, prog: Progress, rng_data):
        spec = env.spec
        self.env, self.progs, self.gen, self.prog = env, progs, gen, prog
        self.sap, self.agn, self.cut_p = spec.sap, spec.agn, spec.budget.p
        self.num_epochs, self.val_size = spec.optim.num_epochs, spec.data.val_size
        self.generator_loss = env.generator_loss
        self.scope = spec.budget.scope  # what both targets are read over
        self.metric = spec.budget.metric  # "macs" or "latency"
        a, b = spec.agn, spec.budget
        self.agn_step = steps.make_agn_step(
            progs.codec, gen.codec, progs.structure, self.generator_loss, gen.tx, tau=a.tau,
            offset=a.offset, deterministic_v=a.deterministic_v, lam_rate=b.lam_rate,
            lam_max_scale=b.lam_max_scale, budget_on=b.measure, dtype=env.dtype)
        self.norms = steps.make_norms(progs.structure, self.sap.include_bn)
        self.track_fit = steps.make_fit_tracker(
            lambda arch: self.generator_loss.ratio(progs.structure, arch), self.cut_p)
        self.initial_arch = xla_cpu.jit(lambda p, r: gen.codec.merge(p, r).sample(
            None, tau=a.tau, offset=a.offset))
        self.ones = [jnp.ones(w) for w in progs.model.widths]
        self.zeros = [jnp.zeros(w) for w in progs.model.widths]
        self.use_agn = self.sap.selector == "agn"  # "norm": a norm-based baseline, no AGN
        self.rng = jax.random.wrap_key_data(rng_data)
        self.searching = False  # set at each epoch's start

    def phase(self) -> Phase:
        s, n, every = self.sap, self.num_epochs, self.env.spec.checkpoint_every_epochs
        # "all": v = 0 marks every channel as dropped, i.e. a plain group lasso.
        arch = (lambda st: self.zeros) if s.penalty_scope == "all" else (lambda st: st.arch)
        return Phase(
            num_epochs=n, train_step=self.progs.train_step, label=self.label,
            penalty_arch=arch, gamma=lambda e: jnp.float32(s.gamma if e >= s.e_start else 0.0),
            must_save=lambda done: done in (s.e_start, n) or done % every == 0,
            start_epoch=self.start_epoch, after_step=self.after_step, end_epoch=self.end_epoch)

    def label(self, epoch: int) -> str:
        return "search" if epoch >= self.sap.e_start else "dense"

    def start_epoch(self, epoch: int, start: int, state: SearchState) -> SearchState:
        self.searching = epoch >= self.sap.e_start
        if epoch == self.sap.e_start and start == 0 and self.use_agn:
            # v starts from the (nearly full) AGN output
            arch = self.initial_arch(state.agn_params, state.agn_rest)
            state = state.replace(arch=arch, prev_arch=arch)
        return state

    def after_step(self, step: int, state: SearchState) -> tuple[SearchState, dict | None]:
        """One AGN step every ``agn_every`` weight steps of the search."""
        prog = self.prog
        if not (self.searching and self.use_agn and step % self.sap.agn_every == 0):
            return state, None
        sb = parallel.global_batch(self.env.data.subset_batch(prog.agn_steps, self.agn.batch_size),
                                   self.env.mesh)
        agn_params, agn_opt_state, log_lam, arch, am = self.agn_step(
            state.agn_params, state.agn_rest, state.agn_opt_state, state.log_lam, state.params,
            state.rest, sb, jax.random.fold_in(self.rng, prog.agn_steps))
        fit_arch, fit_age = self.track_fit(state.fit_arch, state.fit_age, arch)
        prog.agn_steps += 1
        return state.replace(agn_params=agn_params, agn_opt_state=agn_opt_state,
                             log_lam=log_lam, arch=arch, fit_arch=fit_arch,
                             fit_age=fit_age), am

    # -- end of epoch ------------------------------------------------------------
    def end_epoch(self, epoch: int, state: SearchState, train_loss: float,
                  agn_acc: list[dict]) -> SearchState:
        """Evaluate, compare architectures, log; pick the best architecture so far."""
        env = self.env
        label = self.label(epoch)
        row = {"epoch": epoch + 1, "phase": label, "train_loss": train_loss}
        row["test_acc"], row["test_loss"] = env.evaluate(self.progs, state.params, state.rest,
                                                         self.ones)
        row["val_acc"], _ = env.evaluate(self.progs, state.params, state.rest, self.ones, "val")
        if self.searching and not self.use_agn:  # the baseline's current choice, to log like v
            state = state.replace(arch=self.norm_arch(state.params))
        if self.searching:
            row.update(self.search_metrics(state))
            row.update(self.generator_health(agn_acc))
            self.prog.lam_capped_steps += round(row.get("agn_lam_capped", 0.0) * len(agn_acc))
            state = self.choose(epoch, row, state)
            state = state.replace(prev_arch=state.arch)
        self.prog.log(**row)
        env.writer.write_scalars(self.prog.step, {f"epoch/{k}": v for k, v in row.items()
                                                  if isinstance(v, float)})
        logging.info("epoch %d/%d [%s] %s", epoch + 1, self.num_epochs, label, self.short(row))
        console.detail("epoch %d/%d [%s] %s", epoch + 1, self.num_epochs, label,
                       "  ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
        return state

    def short(self, row: dict) -> str:
        """The epoch's line on the terminal: what says how the run and the search are going
        (every metric is in log.txt and TensorBoard)."""
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        has_val = not math.isnan(row["val_acc"])  # val_size = 0: no validation split
        out = [f"loss {row['train_loss']:.3f}", f"test {pct(row['test_acc'])}"]
        out += [f"val {pct(row['val_acc'])}"] if has_val else []
        if self.searching:
            sub = row.get("subnet_val_acc_bn", row["subnet_val_acc"])
            if self.metric == "latency":
                out.append(f"latency {pct(row['budget_ratio'])}")
            out += [f"MACs {pct(row['mac_ratio'])}"]
            out += [f"sub-net val {pct(sub)}"] if has_val else []
            out += [f"align {row['alignment_ratio']:.3f}", f"changed {pct(row['hamming'])}"]
            if "agn_lam" in row:
                out.append(f"lambda {row['agn_lam']:.1f}")
        return "  ".join(out)

    def search_metrics(self, state: SearchState) -> dict[str, float]:
        """The sub-network's validation accuracy, its MACs, the penalty and the alignment."""
        env, progs = self.env, self.progs
        arch_np = [np.asarray(v) for v in to_host(state.arch)]
        prev_np = [np.asarray(v) for v in to_host(state.prev_arch)]
        total = sum(v.size for v in arch_np)
        row = {"hamming": float(sum(np.sum(a != p) for a, p in zip(arch_np, prev_np)) / total)}
        row["subnet_val_acc"], _ = env.evaluate(progs, state.params, state.rest, state.arch,
                                                "val")
        cut = env.spec.cut
        if cut.bn_in_search and cut.bn_batches and self.val_size:
            bn_rest = env.bn_reestimated(progs, state.params, state.rest, state.arch)
            row["subnet_val_acc_bn"], _ = env.evaluate(progs, state.params, bn_rest, state.arch,
                                                       "val")
        row["mac_ratio"] = float(flops.mac_ratio(progs.structure, arch_np, self.scope))
        row["mac_ratio_total"] = float(flops.mac_ratio(progs.structure, arch_np, "total"))
        # What the budget bounds: the MAC ratio, or the latency table's estimate.
        row["budget_ratio"] = float(self.generator_loss.ratio(progs.structure, arch_np))
        row["kept_fraction"] = float(np.mean(np.concatenate(arch_np)))
        row["penalty"] = float(penalty.partial_group_lasso(
            state.params, state.arch, progs.structure, include_bn=self.sap.include_bn))
        row["dropped_norm"], row["kept_norm"] = map(float, self.norms(state.params, state.arch))
        # Alignment: how small the channels to be cut are next to the kept ones (0 = free cut).
        row["alignment_ratio"] = row["dropped_norm"] / max(row["kept_norm"], 1e-12)
        return row

    @staticmethod
    def generator_health(agn_acc: list[dict]) -> dict[str, float]:
        """The epoch's AGN losses, its sampled MAC ratio, lambda and logit band share."""
        if not agn_acc:
            return {}
        mean = lambda k: float(np.mean([float(m[k]) for m in agn_acc]))  # noqa: E731
        return {"agn_loss": mean("loss"), "agn_resource_loss": mean("resource_loss"),
                "agn_ce": mean("ce"),
                "agn_mac_ratio_sampled": mean("mac_ratio_sampled"),  # with Gumbel noise
                "agn_budget_ratio_sampled": mean("budget_ratio_sampled"),
                "band_share": float(agn_acc[-1]["band_share"]),
                "agn_lam": float(agn_acc[-1]["lam"]),
                # the share of the epoch's steps that ended at lambda's cap (a metric older
                # checkpoints' partial epochs lack)
                "agn_lam_capped": float(np.mean([float(m.get("lam_capped", 0))
                                                 for m in agn_acc]))}

    def choose(self, epoch: int, row: dict, state: SearchState) -> SearchState:
        """Keep the best architecture so far and warn about a saturated generator."""
        p, prog = self.cut_p, self.prog
        # "best": judged on the validation split, with re-estimated BN where measured.
        judged = row.get("subnet_val_acc_bn", row["subnet_val_acc"])
        if judged > (-1.0 if prog.best_subnet_val_acc is None else prog.best_subnet_val_acc):
            prog.best_subnet_val_acc, prog.best_subnet_epoch = judged, epoch + 1
            state = state.replace(best_arch=state.arch)
        if (self.use_agn and row["budget_ratio"] > p
                and row.get("band_share", 1.0) < SATURATED_BAND):
            prog.saturated_epochs += 1
            logging.warning(
                "epoch %d: the generator is saturated above its budget (%s ratio %.3f, p = "
                "%s; %.1f%% of its logits in the sensitive band): its decisions have stopped "
                "moving. Lower agn.learning_rate or agn.b2, or raise agn.tau (docs/method.md).",
                epoch + 1, self.metric, row["budget_ratio"], p, 100 * row["band_share"])
        return state

    def norm_arch(self, params: Any) -> list[jax.Array]:
        """Keep the largest-norm channels (sap.norm), to sap.widths or else the budget p."""
        s = self.sap
        norms = norms_lib.channel_norms(to_host(params), self.progs.structure, s.norm)
        arch = baselines.arch_by_norm(norms, self.progs.structure, widths=list(s.widths) or None,
                                      p=None if s.widths else self.cut_p, scope=self.scope,
                                      table=self.generator_loss.table)
        return parallel.replicate(arch, self.env.mesh)
