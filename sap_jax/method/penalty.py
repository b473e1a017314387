"""Partial group lasso ``R_w(W; v)`` (supplement Eq. 2, generalised by channel groups).

Only the channels the current architecture vector *drops* are pushed toward
zero; kept channels are never penalised::

    R_w(W; v) = sum_k (N_k / N) * sum_{i : v_k,i = 0} sum_{t in group k} ||t[slice i]||_2

``N_k`` is the number of dropped channels of group k and ``N = sum_k N_k``.
The tensors ``t`` of a group and the axis of each slice come from the model's
:class:`~sap_jax.structure.groups.Structure` (producing conv: output axis; consuming
conv: input axis; depthwise conv: its channel axis; optionally BN scale and
bias, where the "slice norm" is ``|gamma_i|`` / ``|beta_i|``).

Two forms:

* gradient form, a loss term: ``loss = ce + gamma * partial_group_lasso(params, v, s)``;
* proximal form, an optax transform applied after the optimizer step:
  ``optax.chain(optax.sgd(lr, 0.9), proximal_partial_group_lasso(s, lr * gamma))``
  and ``tx.update(grads, state, params, arch=v)``.

Both are compiled once per model: the structure is static Python, ``v`` is a
traced array, so a new ``v`` never recompiles. The gradient is finite
everywhere; at a slice that is exactly zero it is zero (the minimum-norm
subgradient). With nothing dropped the penalty and its gradient are exactly 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sap_jax.structure import groups as G
from sap_jax.structure import norms
from sap_jax.structure.codec import path_str

Params = Any  # a pytree of arrays (nnx.State, a pure dict, ...) keyed like the model

def _dropped(arch: G.Arch) -> list[jax.Array]:
    return [1.0 - jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for v in arch]


def group_weights(arch: G.Arch) -> jax.Array:
    """``N_k / N``, shape (K,): each group's share of all dropped channels (0 if none dropped)."""
    n = jnp.stack([jnp.sum(d) for d in _dropped(arch)])
    return n / jnp.maximum(jnp.sum(n), 1.0)


def group_penalties(params: Params, arch: G.Arch, structure: G.Structure, *,
                    include_bn: bool = False) -> jax.Array:
    """Unweighted ``sum_{i dropped} sum_t ||t[slice i]||_2`` of each group, shape (K,)."""
    G.check_arch(arch, structure.widths, structure.group_names, what="mask")
    dropped = _dropped(arch)
    per_group = [jnp.zeros((), jnp.float32)] * structure.num_groups
    # Slice by slice (not via channel_norms): the sums keep the order the penalty always had.
    for k, n in norms.slice_norms(params, structure, include_bn=include_bn, xp=jnp):
        per_group[k] = per_group[k] + jnp.sum(dropped[k] * n)
    return jnp.stack(per_group)


def partial_group_lasso(params: Params, arch: G.Arch, structure: G.Structure, *,
                        include_bn: bool = False) -> jax.Array:
    """``R_w(W; v)``, a float32 scalar (units of weight L2 norm).

    Args:
      params: the model's parameters, any pytree keyed like the model (for
        example ``nnx.state(model, nnx.Param)``); only tensors the groups own
        are read.
      arch: K vectors of shape (C_k,), 1 = keep, 0 = drop. Treated as a
        constant (no gradient flows into it).
      structure: ``model.structure(image_size)``.
      include_bn: also penalise the BN scale and bias of dropped channels.
    """
    G.check_arch(arch, structure.widths, structure.group_names, what="mask")
    return jnp.sum(group_weights(arch) * group_penalties(params, arch, structure,
                                                         include_bn=include_bn))


# --------------------------------------------------------------------------
# Proximal form
# --------------------------------------------------------------------------

class ProximalState(NamedTuple):
    count: jax.Array  # steps taken, for a strength schedule


def _shrink(t: jax.Array, sl: G.Slice, threshold: jax.Array) -> jax.Array:
    """Group soft-threshold of the channels of slice ``sl`` of ``t`` (``threshold`` per channel)."""
    size, axis = threshold.shape[0], sl.axis % t.ndim
    whole = sl.whole and t.shape[axis] == size
    n = norms.l2_along(t, axis) if whole else norms.l2_along(norms.channel_view(t, sl, size), 0)
    factor = jnp.where(n > threshold, 1.0 - threshold / jnp.where(n > 0, n, 1.0), 0.0)
    if not whole:  # the scale of every position of the axis
        pos = sl.positions(size)
        factor = jnp.ones((t.shape[axis],), factor.dtype).at[pos.ravel()].set(
            jnp.tile(factor, pos.shape[0]))
    shape = [1] * t.ndim
    shape[axis] = -1
    return t * factor.reshape(shape).astype(t.dtype)


def proximal_partial_group_lasso(structure: G.Structure, strength: float | optax.Schedule, *,
                                 include_bn: bool = False) -> optax.GradientTransformationExtraArgs:
    """The proximal step of ``strength * R_w(W; v)``, as the last link of an optax chain.

    After the wrapped optimizer proposes ``W + u``, every dropped slice of group
    k is soft-thresholded by ``strength * N_k / N`` (its norm shrinks by that
    much, to zero at most); kept slices are untouched. ``strength`` is
    ``learning_rate * gamma`` (a float or a schedule of the step count). A
    tensor owned by two groups along different axes (a bottleneck's middle
    conv) is thresholded for one group, then the other.

    Use: ``tx = optax.chain(optax.sgd(lr, 0.9), proximal_partial_group_lasso(s, lr * gamma))``;
    ``updates, state = tx.update(grads, state, params, arch=v)`` (with
    ``nnx.Optimizer``: ``optimizer.update(model, grads, arch=v)``).
    """
    schedule = strength if callable(strength) else (lambda _: strength)

    def init(params):
        del params
        return ProximalState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, arch=None, **extra):
        del extra
        if params is None or arch is None:
            raise ValueError("proximal_partial_group_lasso needs the current params and the mask: "
                             "call tx.update(grads, state, params, arch=v).")
        G.check_arch(arch, structure.widths, structure.group_names, what="mask")
        thresholds = [jnp.asarray(schedule(state.count), jnp.float32) * w * d for w, d in
                      zip(group_weights(arch), _dropped(arch))]
        owned = norms.owned_slices(structure, norms.roles_of("group_l2", include_bn))
        norms.owned_tensors(params, structure,
                            norms.roles_of("group_l2", include_bn))  # or a clear error

        def one(path, u, w):
            slices = owned.get(path_str(path))
            if not slices:
                return u
            new = w + u
            for k, sl in slices:
                new = _shrink(new, sl, thresholds[k])
            return u + (new - (w + u))  # kept slices: adds exactly 0

        return (jax.tree_util.tree_map_with_path(one, updates, params),
                ProximalState(optax.safe_increment(state.count)))

    return optax.GradientTransformationExtraArgs(init, update)


__all__ = ["partial_group_lasso", "group_penalties", "group_weights",
           "proximal_partial_group_lasso", "ProximalState"]
