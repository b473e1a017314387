"""Cutting dropped channels out of a model: one :func:`extract` for every kind of model.

``extract(model, arch)`` slices every tensor of every channel group (read from the model's
:class:`~sap_jax.structure.groups.Structure`, nothing else) down to the kept channels with
:func:`sap_jax.structure.slicing.slice_arrays`, copies every other tensor unchanged, and
returns a genuinely smaller model. In eval mode it computes exactly what the dense model
gated by ``arch`` computes.

* A :class:`~sap_jax.models.PrunableModel` (built-in backbone or ``TracedModel``) is rebuilt
  as the *same class* with the kept widths, so ``config()`` describes it and a saved pruned
  model reloads from it (:mod:`.saved`).
* Any other ``nnx.Module`` is cloned and its arrays and standard layers' sizes replaced; it
  has no ``structure()`` of its own, so the caller passes the traced one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx, traverse_util

from sap_jax import models as M
from sap_jax.models.gating import check_structure_argument
from sap_jax.structure import codec, norms, slicing
from sap_jax.structure import groups as G


def _structure(model: M.PrunableModel) -> G.Structure:
    # Groups and slices do not depend on the input size; the smallest valid one is cheapest.
    return model.structure(model.total_stride)


def channel_scores(model: M.PrunableModel) -> list[np.ndarray]:
    """Per-channel L2 norm of the weights that produce each group's channels.

    Returns K vectors of shape (C_k,): for each channel, the norm of its output slice(s) in
    the producing conv(s) (``norms.channel_norms`` kind ``producer_l2``). Used by the
    minimum-width rule and available as a magnitude criterion.
    """
    return norms.channel_norms(nnx.state(model, nnx.Param), _structure(model), "producer_l2")


def kept_arch(model: M.PrunableModel, arch: G.Arch) -> list[np.ndarray]:
    """The binary vectors :func:`extract` actually applies to ``arch``.

    Validates shape and binarity, then applies the minimum-width rule
    (:func:`sap_jax.structure.groups.ensure_min_kept`) using :func:`channel_scores`.
    """
    s = _structure(model)
    G.check_arch(arch, s.widths, s.group_names)
    G.check_binary(arch, s.group_names)
    return G.ensure_min_kept(arch, channel_scores(model), s.group_names)


def extract(model: nnx.Module, arch: G.Arch, structure: G.Structure | None = None
            ) -> nnx.Module:
    """Return a genuinely smaller model holding only the channels ``arch`` keeps.

    Args:
      model: a dense (or already pruned) model; it is not changed.
      arch: K binary vectors, ``arch[k]`` of shape ``(C_k,)``; 1 = keep. Every group keeps at
        least one channel (a PrunableModel its highest-scoring one, see :func:`kept_arch`;
        any other module its first).
      structure: the channel groups of a model that is not a PrunableModel (from
        :func:`sap_jax.tracing.structure`); a PrunableModel describes itself, so a structure
        given for one must have its widths.

    Returns:
      For a PrunableModel, a new model of the same class built with widths ``sum(arch[k])``,
      in train mode like any new model; for any other module, a clone of it with the kept
      channels (in the mode ``model`` is in).
    """
    if check_structure_argument(model, structure, "extracting from a"):
        return _extract_prunable(model, arch)
    return _extract_any(model, arch, structure)


def _extract_prunable(model: M.PrunableModel, arch: G.Arch) -> M.PrunableModel:
    s = _structure(model)
    keep = kept_arch(model, arch)
    flat = slicing.slice_arrays(slicing.flat_arrays(model), s, keep)
    config = {**model.config(), "widths": [int(k.sum()) for k in keep]}
    abstract = M.from_config(type(model).__name__, config, abstract=True)
    return fill_abstract(abstract, flat, source="the sliced dense model")


def _extract_any(model: nnx.Module, arch: G.Arch, s: G.Structure) -> nnx.Module:
    # No class to rebuild from a config: the clone keeps the module's own code, and only the
    # standard layers' size attributes are updated (slicing.resize_modules).
    G.check_arch(arch, s.widths, s.group_names)
    keep = G.ensure_min_kept(arch, None, s.group_names)
    small = nnx.clone(model)
    slicing.set_arrays(small, slicing.slice_arrays(slicing.flat_arrays(model), s, keep))
    return small


def fill_abstract(abstract: M.PrunableModel, flat: dict[G.Path, Any], source: str
              ) -> M.PrunableModel:
    """Fill an abstract model with arrays, checking every name and shape first."""
    graphdef, state = nnx.split(abstract)
    keys = traverse_util.flatten_dict(nnx.to_pure_dict(state))  # the model's own keys (ints)
    expected = {G.as_path(k): codec.plain(v) for k, v in keys.items()}
    missing = [k for k in expected if k not in flat]
    extra = sorted(set(flat) - set(expected))
    wrong = [(k, tuple(np.shape(flat[k])), tuple(v.shape)) for k, v in expected.items()
             if k in flat and tuple(np.shape(flat[k])) != tuple(v.shape)]
    if missing or extra or wrong:
        lines = [f"  missing {'/'.join(k)}" for k in missing[:5]]
        lines += [f"  unexpected {'/'.join(k)}" for k in extra[:5]]
        lines += [f"  {'/'.join(k)}: has shape {a}, widths need {b}" for k, a, b in wrong[:5]]
        raise ValueError(
            f"{source} cannot fill a {type(abstract).__name__} with widths "
            f"{list(abstract.widths)} ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(wrong)} mis-shaped arrays):\n" + "\n".join(lines))
    pure = traverse_util.unflatten_dict(
        {k: codec.like(v, flat[G.as_path(k)]) for k, v in keys.items()})
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
