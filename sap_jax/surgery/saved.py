"""Saving a model (dense or pruned) and loading it back without its dense original.

A pruned model is saved as a directory holding ``model.json`` (class name,
constructor arguments including the widths, and the dense widths it came
from) and an orbax checkpoint of its variables in ``state/``; ``load`` needs
nothing else. The smaller model itself comes from :func:`sap_jax.surgery.extract`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sap_jax import models as M
from sap_jax.runtime import parallel
from sap_jax.structure import slicing
from sap_jax.surgery.extraction import fill_abstract

FORMAT = "sap_jax.pruned_model/1"
#: Where a run keeps its orbax checkpoints inside its workdir (read by pretrained weights too).
CKPT_DIR = "checkpoints"
_JSON = "model.json"
_STATE = "state"


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
    pure = traverse_util.unflatten_dict(
        {k: np.asarray(v) for k, v in slicing.flat_arrays(model).items()})
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
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{jpath} has format {found!r}; this version of sap_jax reads "
                         f"{FORMAT!r}.")
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
    return fill_abstract(abstract, flat, source=f"the arrays saved in {path}")

