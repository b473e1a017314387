"""The budget (resource) loss ``R(T(v)/T_full, p)`` of the AGN objective.

``r = T(v)/T_full`` is the fraction of MACs the sub-network keeps (over the
prunable layers or the whole network, see :data:`sap_jax.structure.flops.SCOPES`) and
``p`` the target fraction. With a latency table (:class:`sap_jax.method.latency.LatencyTable`)
``T`` is the estimated latency on the table's device instead: each layer's time interpolated
between the grid widths it was measured at, as a function of the relaxed kept widths
``sum(v_k)``, so the loss stays differentiable. Two forms (docs/method.md §3):

* ``"one_sided"`` (NPPM): ``log(max(r, p) / p)`` — zero at or under budget.
* ``"two_sided"`` (ATO): ``log(max(r, p + eps) / p)`` if ``r > p``, else
  ``log(p / min(r, p - eps))`` — also pushes a sub-network that is far *under*
  budget back up; flat (zero gradient) inside the dead band ``[p - eps, p + eps]``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from sap_jax.method import cut
from sap_jax.structure import flops
from sap_jax.structure import groups as G

FORMS = ("one_sided", "two_sided")


def _is_concrete_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_budget(p, *, form: str = "one_sided", eps: float = 0.005) -> None:
    """Raise a clear ``ValueError`` for a bad budget, form or dead band (Python numbers only)."""
    if form not in FORMS:
        raise ValueError(f"unknown resource-loss form {form!r}; use one of {FORMS}.")
    if _is_concrete_number(p) and not 0.0 < p <= 1.0:
        raise ValueError(f"FLOPs budget p = {p!r} must lie in (0, 1]: it is the fraction of "
                         f"MACs to keep (e.g. 0.48 keeps 48%).")
    if (form == "two_sided" and _is_concrete_number(eps) and _is_concrete_number(p)
            and not 0.0 <= eps < p):
        raise ValueError(f"dead band eps = {eps!r} must satisfy 0 <= eps < p = {p!r}.")


def resource_loss(ratio: jax.Array, p: float, *, form: str = "one_sided",
                  eps: float = 0.005) -> jax.Array:
    """``R(ratio, p)``: a scalar, 0 when the sub-network meets its budget.

    Args:
      ratio: kept MAC fraction ``T(v)/T_full`` (scalar, differentiable).
      p: target fraction in (0, 1].
      form: ``"one_sided"`` or ``"two_sided"``.
      eps: dead band of the two-sided form (ignored by the one-sided form).
    """
    check_budget(p, form=form, eps=eps)
    r = jnp.asarray(ratio, jnp.float32)
    if form == "one_sided":
        return jnp.log(jnp.maximum(r, p) / p)
    over = jnp.log(jnp.maximum(r, p + eps) / p)
    # Keep the unused branch finite: min(r, p - eps) can be 0 for r = 0.
    under = jnp.log(p / jnp.maximum(jnp.minimum(r, p - eps), 1e-12))
    return jnp.where(r > p, over, under)


@dataclasses.dataclass(frozen=True)
class ResourceLoss:
    """``lam * R(T(v)/T_full, p)`` with its settings, validated on construction.

    Attributes:
      p: target kept fraction of MACs, in (0, 1]. A run's generator aims below its budget:
        ``budget.generator_target`` (``sap_jax.train.spec.resource_loss``).
      lam: weight λ of the resource term in the AGN loss (lineage: 4–8).
      form: ``"one_sided"`` or ``"two_sided"``.
      eps: dead band of the two-sided form.
      scope: what the budget is read over: the ``"prunable"`` layers (paper) or the
        ``"total"`` network; ``None``: "total" with a ``table``, else "prunable" (a latency
        budget bounds the whole forward: ``cut.budget_scope``).
      table: a latency table: the budget bounds estimated latency, not MACs (``None``: MACs).
    """

    p: float
    lam: float = 4.0
    form: str = "one_sided"
    eps: float = 0.005
    scope: str | None = None
    table: Any = dataclasses.field(default=None, compare=False)

    @property
    def dead_band(self) -> float:
        """Half-width of the band around ``p`` where the loss is flat: ``eps`` for the two-sided
        form, 0 for the one-sided one (which pulls whenever the ratio is over ``p``)."""
        return self.eps if self.form == "two_sided" else 0.0

    @property
    def metric(self) -> str:
        """What ``p`` bounds: ``"macs"`` or ``"latency"``."""
        return "macs" if self.table is None else "latency"

    def __post_init__(self):
        check_budget(self.p, form=self.form, eps=self.eps)
        object.__setattr__(self, "scope", cut.budget_scope(self.scope, self.table))
        if self.scope not in flops.SCOPES:
            raise ValueError(f"budget scope must be one of {flops.SCOPES}, got {self.scope!r}.")
        if not _is_concrete_number(self.lam) or self.lam < 0:
            raise ValueError(f"resource-loss weight lam = {self.lam!r} must be a number >= 0.")

    def ratio(self, structure: G.Structure, arch: G.Arch) -> jax.Array:
        """Kept fraction of ``arch``'s MACs, or of its estimated latency, over this loss's scope
        (differentiable)."""
        if self.table is None:
            return flops.mac_ratio(structure, arch, self.scope)
        G.check_arch(arch, structure.widths, structure.group_names)
        return jnp.asarray(self.table.ratio(structure, flops.kept_widths(arch), self.scope,
                                            xp=jnp), jnp.float32)

    def __call__(self, structure: G.Structure, arch: G.Arch) -> tuple[jax.Array, jax.Array]:
        """Return ``(lam * R(r, p), r)`` for the architecture ``arch``."""
        r = self.ratio(structure, arch)
        return self.lam * resource_loss(r, self.p, form=self.form, eps=self.eps), r


def adapt_log_lam(log_lam: jax.Array, ratio: jax.Array, p: float, *, rate: float, eps: float,
                  max_log: float) -> jax.Array:
    """One step of the adaptive resource weight: ``log(lam_t / lam)`` after an AGN step whose
    architecture keeps ``ratio`` (dual ascent on the budget constraint, docs/method.md).

    It moves by ``rate * (ratio - p) / p``, except inside the dead band
    ``[p - eps, p + eps]`` (the two-sided loss's; ``eps = 0`` for the one-sided one): the loss
    is flat there, so a drifting weight would change nothing until the generator left the band
    and would then act with a stale value (integrator windup). The integrator is the clipped
    value itself (within ``[0, max_log]``), so at the cap it does not grow, and the first step
    under the band relaxes it.
    """
    r = jnp.asarray(ratio, jnp.float32)
    step = jnp.where(jnp.abs(r - p) > eps, rate * (r - p) / p, 0.0)
    return jnp.clip(log_lam + step, 0.0, max_log)
