"""One pure, jittable gated forward for any model, for training loops of your own.

Every model is gated by the tracer (:func:`sap_jax.tracing.gated_call`). A
:class:`~sap_jax.models.PrunableModel` knows its own structure (``model(x, arch)``); any other
NNX module needs it given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from sap_jax import tracing
from sap_jax.models.common import PrunableModel
from sap_jax.structure import groups as G


def check_structure_argument(model: nnx.Module, structure: G.Structure | None,
                             doing: str) -> bool:
    """Whether ``model`` is a PrunableModel (it knows its structure); a ValueError when
    ``structure`` is missing for any other module, or given for a PrunableModel with other
    widths. ``doing`` opens the message ("gating a", "extracting from a")."""
    own = isinstance(model, PrunableModel)
    if own and structure is not None and tuple(structure.widths) != tuple(model.widths):
        raise ValueError(f"structure has group widths {list(structure.widths)}, the "
                         f"{type(model).__name__} {list(model.widths)}: it describes another "
                         "model (a PrunableModel needs none).")
    if not own and structure is None:
        raise ValueError(f"{doing} {type(model).__name__}, which is not a sap_jax "
                         "PrunableModel, needs its channel groups: pass structure="
                         "tracing.structure(model, sample_shape).")
    return own


def gated_apply(model: nnx.Module, structure: G.Structure | None = None, *,
                train: bool = False) -> tuple[Callable[..., Any], Any]:
    """Split ``model`` into ``(apply_fn, state)``; ``apply_fn(state, images, arch)`` is its gated
    forward, pure and jittable, returning logits.

    Eval mode (BN running statistics) by default; with ``train=True`` it runs in train mode
    and returns ``(logits, new_state)`` with updated BN statistics. It plugs into
    :func:`sap_jax.method.agn.agn_value_and_grad`.

    Args:
      model: a PrunableModel (it knows its structure), or any NNX module mapping NHWC images
        to logits.
      structure: the channel groups of a module that is not a PrunableModel (from
        :func:`sap_jax.tracing.structure`); one given for a PrunableModel must have its
        widths.
    """
    own = check_structure_argument(model, structure, "gating a")

    def forward(m, x, arch):
        return m(x, arch) if own else tracing.gated_call(m, x, arch, structure)

    graphdef, state = nnx.split(model)

    def apply_fn(state, x, arch):
        m = nnx.merge(graphdef, state)
        if train:
            m.train()
            y = forward(m, x, arch)
            return y, nnx.state(m)
        m.eval()
        return forward(m, x, arch)

    return apply_fn, state
