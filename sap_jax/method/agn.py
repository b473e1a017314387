"""Architecture Generator Network (supplement Table 2) and straight-through Gumbel-sigmoid.

The AGN turns a fixed random input ``z`` (K x 32, drawn once, never trained)
into one logit vector ``o_k`` of shape (C_k,) per channel group::

    z -> GRU(32 -> 64) over the K groups -> LayerNorm -> GELU -> Dense_k(64 -> C_k) -> o_k

and :func:`gumbel_sigmoid` (supplement Eq. 1) turns the logits into binary keep
vectors ``v_k = round(sigmoid((o_k + g + b) / tau))``, ``g ~ Gumbel(0, 1)``,
with the sigmoid's gradient on the backward pass. The offset ``b = 3`` makes
pruning start from the whole model.

:func:`agn_loss` / :func:`agn_value_and_grad` evaluate the AGN objective
``CE(f(x; W, v)) + lam * R(T(v)/T_full, p)`` on the frozen, gated model.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sap_jax.method.resource import ResourceLoss
from sap_jax.structure import flops
from sap_jax.structure import groups as G

TAU = 0.4  # Gumbel-sigmoid temperature (supplement §A)
OFFSET = 3.0  # logit offset b (supplement §A)
#: |(o + b) / tau| below this is the "sensitive band": there sigma' is at least 0.07, about 28%
#: of its peak 0.25, so a gradient still moves the channel's decision.
BAND = 2.5
BUDGET_ON = ("sampled", "deterministic")


class FixedInput(nnx.Variable):
    """The AGN's input ``z``: part of the state (checkpointed) but not an ``nnx.Param``."""


def check_temperature(tau) -> None:
    if isinstance(tau, numbers.Real) and not tau > 0:
        raise ValueError(f"Gumbel-sigmoid temperature tau = {tau!r} must be > 0 (default {TAU}).")


def gumbel_sigmoid(logits: jax.Array, key: jax.Array | None = None, *, tau: float = TAU,
                   offset: float = OFFSET) -> jax.Array:
    """Straight-through Gumbel-sigmoid: binary values forward, sigmoid gradient backward.

    Args:
      logits: ``o``, any shape.
      key: PRNG key for the Gumbel noise ``g``; ``None`` = deterministic
        (``g = 0``), for evaluation and for reading off the architecture.
      tau: temperature (> 0).
      offset: ``b``, added to the logits before the sigmoid.

    Returns:
      ``v`` with the shape of ``logits``, float32, exactly 0.0 or 1.0.
    """
    check_temperature(tau)
    o = jnp.asarray(logits, jnp.float32)
    g = 0.0 if key is None else jax.random.gumbel(key, o.shape, jnp.float32)
    soft = jax.nn.sigmoid((o + g + offset) / tau)
    hard = jnp.round(soft)
    # hard + (soft - soft) is exactly hard in the forward pass; its gradient is soft's.
    return hard + (soft - jax.lax.stop_gradient(soft))


class AGN(nnx.Module):
    """The architecture generator for a model with group sizes ``group_sizes``.

    Args:
      group_sizes: ``(C_1, ..., C_K)``, e.g. ``model.widths``.
      z_dim: width of the fixed input ``z`` (32 in the paper).
      hidden: GRU hidden width (64 in the paper).
      seed: seeds ``z`` and the initial weights.
    """

    def __init__(self, group_sizes: Sequence[int], *, z_dim: int = 32, hidden: int = 64,
                 seed: int = 0):
        if isinstance(group_sizes, np.ndarray) and group_sizes.ndim == 1:
            group_sizes = group_sizes.tolist()
        ok = (isinstance(group_sizes, Sequence) and not isinstance(group_sizes, str)
              and len(group_sizes) > 0
              and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1
                      for c in group_sizes))
        if not ok:
            raise ValueError(f"group_sizes must be a non-empty sequence of positive integers (the "
                             f"channels of each group, e.g. model.widths); got {group_sizes!r}.")
        sizes = tuple(int(c) for c in group_sizes)
        self.group_sizes = sizes
        rngs = nnx.Rngs(params=seed, z=seed + 1)
        self.z = FixedInput(jax.random.normal(rngs.z(), (len(sizes), z_dim), jnp.float32))
        self.gru = nnx.GRUCell(z_dim, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(hidden, c, rngs=rngs) for c in sizes])

    def __call__(self) -> list[jax.Array]:
        """Logits ``o_k``, one float32 vector of shape (C_k,) per group."""
        h = jnp.zeros((self.gru.hidden_features,), jnp.float32)
        states = []
        for k in range(len(self.group_sizes)):  # K is small (<= ~70): unrolled is fine
            h, _ = self.gru(h, self.z[k])
            states.append(h)
        feats = jax.nn.gelu(self.norm(jnp.stack(states)), approximate=False)
        return [head(feats[k]) for k, head in enumerate(self.heads)]

    def sample(self, key: jax.Array | None = None, *, tau: float = TAU,
               offset: float = OFFSET) -> list[jax.Array]:
        """Architecture vectors ``v_k`` (straight-through); ``key=None`` is deterministic."""
        return sample_logits(self(), key, tau=tau, offset=offset)

    def architecture(self, *, tau: float = TAU, offset: float = OFFSET) -> list[np.ndarray]:
        """The deterministic architecture as boolean NumPy vectors (for extraction)."""
        return [np.asarray(v) > 0.5 for v in self.sample(None, tau=tau, offset=offset)]


def sample_logits(logits: Sequence[jax.Array], key: jax.Array | None = None, *, tau: float = TAU,
                  offset: float = OFFSET) -> list[jax.Array]:
    """:func:`gumbel_sigmoid` of each group's logits, one noise key per group (``None``: none)."""
    keys = [None] * len(logits) if key is None else list(jax.random.split(key, len(logits)))
    return [gumbel_sigmoid(o, k, tau=tau, offset=offset) for o, k in zip(logits, keys)]


def band_share(
    logits: Sequence[jax.Array], *, tau: float = TAU, offset: float = OFFSET
) -> jax.Array:
    """Share of channels whose pre-sigmoid value ``|(o + b) / tau|`` lies in the sensitive band
    (< :data:`BAND`). Near 0 the generator is saturated: its straight-through gradient has
    vanished and its decisions no longer move (docs/method.md, "A generator that reaches p")."""
    s = jnp.concatenate([jnp.abs((jnp.asarray(o, jnp.float32) + offset) / tau) for o in logits])
    return jnp.mean(s < BAND)


# --------------------------------------------------------------------------
# The AGN objective
# --------------------------------------------------------------------------

ApplyFn = Callable[[Any, jax.Array, Sequence[jax.Array]], jax.Array]


def agn_loss(agn: AGN, apply_fn: ApplyFn, model_state: Any, batch: dict[str, jax.Array],
             key: jax.Array | None, *, structure: G.Structure, resource: ResourceLoss,
             tau: float = TAU, offset: float = OFFSET, resource_scale: jax.Array | float = 1.0,
             budget_on: str = "sampled") -> tuple[jax.Array, dict[str, jax.Array]]:
    """``CE(f(x; W, v)) + resource_scale * lam * R(T(v)/T_full, p)`` and its metrics.

    Args:
      agn: the generator; ``v`` is sampled from it with ``key`` (``None``: no noise).
      apply_fn, model_state: the frozen model, as from :func:`sap_jax.models.gated_apply`;
        no gradient reaches ``model_state``.
      batch: ``{"image": (N, H, W, C) float, "label": (N,) int}``.
      structure: the model's channel groups (``model.structure(image_size)``).
      resource: budget ``p``, weight ``lam``, form and scope.
      resource_scale: a multiplier of ``lam`` (traced; an adaptive budget weight), 1 = none.
      budget_on: which architecture the resource term measures: ``"sampled"`` (the noisy
        draw the CE sees; NPPM/ATO) or ``"deterministic"`` (the noise-free one that is cut;
        Gumbel noise has mean 0.58, so a sampled draw keeps more channels than the cut will).

    Returns:
      ``(loss, metrics)``: scalars ``loss``, ``ce``, ``accuracy`` (of the gated
      sub-network), ``budget_ratio`` (what the budget bounds, MACs or estimated latency, over
      ``resource.scope``; ``budget_ratio_sampled`` of the noisy draw), ``mac_ratio`` (over
      ``resource.scope``),
      ``mac_ratio_prunable``, ``mac_ratio_total``, ``resource_loss`` (λ·R),
      ``band_share`` (:func:`band_share` of the logits) and ``kept_fraction``, shape (K,).
    """
    if tuple(agn.group_sizes) != tuple(structure.widths):
        raise ValueError(f"the AGN generates groups of sizes {list(agn.group_sizes)} but the model "
                         f"has {list(structure.widths)}; build it with AGN(model.widths).")
    o = agn()
    arch = sample_logits(o, key, tau=tau, offset=offset)
    logits = apply_fn(jax.lax.stop_gradient(model_state), batch["image"], arch)
    labels = batch["label"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    if budget_on not in BUDGET_ON:
        raise ValueError(f"budget_on = {budget_on!r}; use one of {BUDGET_ON}.")
    budget_arch = arch if budget_on == "sampled" or key is None else sample_logits(
        o, None, tau=tau, offset=offset)
    res, ratio = resource(structure, budget_arch)
    res = res * resource_scale
    other = "total" if resource.scope == "prunable" else "prunable"
    by_macs = resource.metric == "macs"
    macs = ratio if by_macs else jax.lax.stop_gradient(
        flops.mac_ratio(structure, budget_arch, resource.scope))
    sampled = jax.lax.stop_gradient(flops.mac_ratio(structure, arch, resource.scope))
    metrics = {
        "loss": ce + res, "ce": ce, "resource_loss": res, "budget_ratio": ratio,
        "budget_ratio_sampled": sampled if by_macs else jax.lax.stop_gradient(
            resource.ratio(structure, arch)),
        "mac_ratio": macs, f"mac_ratio_{resource.scope}": macs,
        f"mac_ratio_{other}": jax.lax.stop_gradient(
            flops.mac_ratio(structure, budget_arch, other)),
        "mac_ratio_sampled": sampled,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "band_share": jax.lax.stop_gradient(band_share(o, tau=tau, offset=offset)),
        "kept_fraction": jnp.stack([jnp.mean(v) for v in arch]),
    }
    return ce + res, metrics


def agn_value_and_grad(
    agn: AGN, apply_fn: ApplyFn, model_state: Any, batch: dict[str, jax.Array],
    key: jax.Array | None, **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
    """:func:`agn_loss` plus its gradient with respect to the AGN's ``nnx.Param`` s only.

    Returns ``(loss, metrics, grads)``; ``grads`` has the structure of
    ``nnx.state(agn, nnx.Param)`` (``z`` is not a parameter and gets none).
    """
    def f(agn):
        return agn_loss(agn, apply_fn, model_state, batch, key, **kwargs)

    (loss, metrics), grads = nnx.value_and_grad(f, has_aux=True)(agn)
    return loss, metrics, grads


__all__ = ["AGN", "FixedInput", "gumbel_sigmoid", "sample_logits", "band_share",
           "check_temperature", "agn_loss", "agn_value_and_grad", "TAU", "OFFSET", "BAND",
           "BUDGET_ON"]
