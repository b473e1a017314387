"""Model surgery: cut dropped channels out of a dense model, and save/load the result.

``extract(model, arch)`` slices every tensor of every channel group (read from
the model's :class:`~sap_jax.structure.groups.Structure`, nothing else) down to the kept
channels, copies every other tensor unchanged, and loads the result into the
*same* model class built with the kept widths. In eval mode the extracted
model computes exactly what the dense model gated by ``arch`` computes.

A pruned model is saved as a directory holding ``model.json`` (class name,
constructor arguments including the widths, and the dense widths it came
from) and an orbax checkpoint of its variables in ``state/``; ``load`` needs
nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sap_jax.structure import groups as G
from sap_jax import models as M
from sap_jax.structure import norms
from sap_jax.runtime import parallel
from sap_jax.tracing import trace

FORMAT = "sap_jax.pruned_model/1"
#: Where a run keeps its orbax checkpoints inside its workdir (read by pretrained weights too).
CKPT_DIR = "checkpoints"
_JSON = "model.json"
_STATE = "state"


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


def extract(model: M.PrunableModel, arch: G.Arch) -> M.PrunableModel:
    """Return a genuinely smaller model holding only the channels ``arch`` keeps.

    Args:
      model: a dense (or already pruned) model.
      arch: K binary vectors, ``arch[k]`` of shape ``(C_k,)``; 1 = keep.

    Returns:
      A new model of the same class, built with widths ``sum(arch[k])``
      (at least ``MIN_KEPT`` each), in train mode like any new model.
    """
    s = _structure(model)
    keep = kept_arch(model, arch)
    flat = trace.slice_arrays(trace.flat_arrays(model), s, keep)
    config = {**model.config(), "widths": [int(k.sum()) for k in keep]}
    abstract = M.from_config(type(model).__name__, config, abstract=True)
    return _load_into(abstract, flat, source="the sliced dense model")


def _load_into(abstract: M.PrunableModel, flat: dict[G.Path, Any], source: str) -> M.PrunableModel:
    """Fill an abstract model with arrays, checking every name and shape first."""
    graphdef, state = nnx.split(abstract)
    keys = traverse_util.flatten_dict(nnx.to_pure_dict(state))  # the model's own keys (ints)
    expected = {G.as_path(k): v for k, v in keys.items()}
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
        {k: jnp.asarray(flat[G.as_path(k)], v.dtype) for k, v in keys.items()})
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------

def save(directory: str | os.PathLike, model: M.PrunableModel, *,
         dense_widths: Sequence[int] | None = None, image_size: int | None = None,
         metadata: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Save ``model`` (dense or pruned) to ``directory``; returns its absolute path.

    ``dense_widths`` (the widths it was cut from) and ``image_size`` (its
    input size) let reports show a before/after table; ``metadata`` is any
    extra JSON-serialisable info.
    """
    import orbax.checkpoint as ocp

    path = parallel.path(directory)
    if dense_widths is not None and len(dense_widths) != model.num_groups:
        raise ValueError(f"dense_widths has {len(dense_widths)} entries; the model has "
                         f"{model.num_groups} channel groups.")
    if image_size is not None:
        model.check_image_size(image_size)
    state_path = path / _STATE
    if state_path.exists() and not overwrite:
        raise ValueError(f"{path} already holds a saved model; pass overwrite=True or "
                         f"choose another directory.")
    # Every process takes part in the orbax save; only process 0 touches the rest.
    if jax.process_index() == 0:
        if (path / _JSON).exists():
            (path / _JSON).unlink()  # until the arrays are complete again
        if state_path.exists():
            state_path.rmtree()
        path.mkdir(parents=True, exist_ok=True)
    parallel.sync("surgery.save:prepared")
    info = {"format": FORMAT, "class": type(model).__name__, "config": model.config(),
            "widths": list(model.widths),
            "dense_widths": list(dense_widths if dense_widths is not None else model.widths),
            "image_size": None if image_size is None else int(image_size),
            "metadata": metadata or {}}
    # Orbax wants string keys (NNX lists give integer ones): paths are strings.
    pure = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in trace.flat_arrays(model).items()})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_path, pure)
        ckptr.wait_until_finished()
    # Written last: a directory with model.json holds a complete checkpoint.
    if jax.process_index() == 0:
        parallel.write_text_atomic(path / _JSON, json.dumps(info, indent=2))
    parallel.sync("surgery.save:done")
    return str(path)


def is_saved_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete model written by :func:`save`."""
    return (parallel.path(directory) / _JSON).is_file()


def read_info(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``model.json`` of a saved model, validated."""
    path = parallel.path(directory)
    jpath = path / _JSON
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a saved model's directory.")
    if not jpath.is_file():
        raise ValueError(f"{path} is not a saved sap_jax model: {_JSON} is missing (was the save "
                         f"interrupted? re-run the extraction or point at another directory).")
    try:
        info = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{jpath} is not valid JSON ({e}); the saved model is corrupted.") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{jpath} has format {info.get('format') if isinstance(info, dict) else None!r}"
                         f"; this version of sap_jax reads {FORMAT!r}.")
    return info


def load(directory: str | os.PathLike) -> M.PrunableModel:
    """Load a model saved by :func:`save`, without its dense model or class arguments."""
    import orbax.checkpoint as ocp

    path = parallel.path(directory)
    info = read_info(path)
    abstract = M.from_config(info["class"], info["config"], abstract=True)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(path / _STATE)
        except Exception as e:  # orbax raises many types for unreadable data
            raise ValueError(f"could not read the arrays of the saved model in {path}/{_STATE}: "
                             f"{type(e).__name__}: {e}") from e
    flat = traverse_util.flatten_dict(restored)
    return _load_into(abstract, flat, source=f"the arrays saved in {path}")

