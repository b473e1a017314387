"""Any user's NNX CNN as a prunable model: its channel groups come from tracing.

``TracedModel("my_package.nets:vgg11_bn", image_size=32)`` calls the factory, traces the
network it returns (:mod:`sap_jax.tracing`) and behaves like a built-in backbone: ``widths``,
``structure(image_size)``, a gated ``__call__(x, arch)``, ``config()`` to rebuild it. Built
with ``widths``, it is the same network with fewer channels: the dense network's first
channels of every group (the extracted model then loads its own arrays into it). A saved
pruned model records the factory's import path and arguments, so loading it needs no
registry edit: only that the factory can be imported.

A factory is any importable callable returning an ``nnx.Module`` that maps NHWC images to
logits. Of ``num_classes``, ``in_channels``, ``image_size``, ``rngs`` (or ``seed``) and
``dtype``, it receives those its signature names; ``factory_kwargs`` add the rest.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sap_jax import tracing
from sap_jax.models.common import PrunableModel
from sap_jax.structure import groups as G
from sap_jax.structure import linen, slicing

_PREFIX = ("net",)


def is_factory_path(name: Any) -> bool:
    """Whether ``name`` names a factory (``"package.module:function"``) rather than a preset."""
    return isinstance(name, str) and ":" in name


def _import(module_name: str) -> Any:
    """Import ``module_name``, also from the working directory (as ``python -m`` would)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        if os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(module_name)


def resolve(factory: str) -> Callable[..., nnx.Module]:
    """The callable ``"package.module:function"`` names, or a ValueError saying what is wrong."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {factory!r}: a model factory is written "
                         f"'package.module:function'.")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise ValueError(f"model {factory!r}: cannot import {module_name!r} ({e}). Install the "
                         f"package, or run from the directory that holds it.") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"model {factory!r}: {module_name} has no attribute {attr!r}.")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"model {factory!r}: {attr} is not callable.")
    return fn


def build(factory: str, factory_kwargs: dict[str, Any] | None = None, *, num_classes: int | None,
          in_channels: int, image_size: int, seed: int = 0, dtype: str | None = None) -> nnx.Module:
    """Call the factory with the arguments it accepts (see the module docstring)."""
    fn = resolve(factory)
    # A class's own __init__ (an nnx.Module's metaclass hides it behind *args, **kwargs).
    params = dict(inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters)
    params.pop("self", None)
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    offered: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels,
                               "image_size": image_size, "dtype": dtype}
    kwargs = {k: v for k, v in offered.items() if v is not None and (k in params or (
        takes_all and k != "dtype"))}
    if dtype is not None and "dtype" not in params:
        raise ValueError(f"model {factory!r}: dtype = {dtype!r} needs a factory with a 'dtype' "
                         f"argument; this one computes in its own dtype (use dtype='float32').")
    if "rngs" in params:
        kwargs["rngs"] = nnx.Rngs(seed)
    elif "seed" in params:
        kwargs["seed"] = seed
    kwargs.update(factory_kwargs or {})
    net = fn(**kwargs)
    if not isinstance(net, nnx.Module):
        raise ValueError(f"model {factory!r} returned a {type(net).__name__}, not an nnx.Module.")
    return net


def add_prefix(s: G.Structure, prefix: G.Path) -> G.Structure:
    """``s`` with every parameter path under ``prefix`` (the network inside a wrapper)."""
    def lay(layer):
        return dataclasses.replace(layer, path=prefix + layer.path)

    slices = tuple(tuple(dataclasses.replace(sl, path=prefix + sl.path) for sl in g.slices)
                   for g in s.groups)
    return dataclasses.replace(s, layers=tuple(lay(x) for x in s.layers), slices=slices)


class TracedModel(PrunableModel):
    """A user's network (``self.net``) with traced channel groups; see the module docstring.

    Args:
      factory: ``"package.module:function"``.
      factory_kwargs: more keyword arguments for the factory (JSON-serialisable).
      image_size: the square input size the structure is traced at.
      num_classes, in_channels, dtype: passed to the factory where it accepts them.
      prune: ``"inner"`` or ``"all"`` (see :func:`sap_jax.tracing.trace`).
      ignore: layers whose output channels are never pruned.
      widths: group widths (``None`` = dense).
    """

    def __init__(self, factory: str, *, factory_kwargs: dict[str, Any] | None = None,
                 image_size: int = 32, num_classes: int | None = None, in_channels: int = 3,
                 prune: str = "inner", ignore: Sequence[str] = (),
                 widths: Sequence[int] | None = None, dtype: str | None = None, seed: int = 0,
                 rngs: nnx.Rngs | None = None):
        del rngs  # the factory makes its own from ``seed``, so config() rebuilds it exactly
        self.factory = factory
        # As JSON: a dict attribute would become part of the module's graph.
        self.kwargs_json = json.dumps(dict(factory_kwargs or {}), sort_keys=True)
        self.image_size, self.num_classes, self.in_channels = (
            int(image_size), num_classes, in_channels)
        self.prune, self.ignore, self.dtype_name, self.seed = prune, tuple(ignore), dtype, seed
        # Any input size the network accepts; a flatten head fixes it to the traced one.
        self.total_stride = self.image_size
        self.net = build(factory, self.factory_kwargs, num_classes=num_classes,
                         in_channels=in_channels, image_size=self.image_size, seed=seed,
                         dtype=dtype)
        s = self._net_structure()
        self.dense_widths = tuple(s.widths)
        self.group_names = tuple(s.group_names)
        self.widths = self._validate_widths(widths)
        if self.widths != self.dense_widths:
            keep = [np.arange(c) < w for c, w in zip(self.dense_widths, self.widths)]
            flat = slicing.slice_arrays(slicing.flat_arrays(self.net), s, keep)
            slicing.set_arrays(self.net, flat)

    @property
    def factory_kwargs(self) -> dict[str, Any]:
        return json.loads(self.kwargs_json)

    def _net_structure(self, hw: tuple[int, int] | None = None) -> G.Structure:
        hw = hw or (self.image_size, self.image_size)
        return tracing.structure(self.net, (1, *hw, self.in_channels), prune=self.prune,
                               ignore=list(self.ignore))

    def status(self) -> dict[str, str]:
        """Per layer: "prunable", or why its output channels stay whole (see tracing.trace)."""
        return tracing.trace(self.net, (1, self.image_size, self.image_size, self.in_channels),
                           prune=self.prune, ignore=list(self.ignore))[1]

    def default_widths(self) -> tuple[int, ...]:
        return self.dense_widths

    def structure(self, image_size: int | tuple[int, int]) -> G.Structure:
        hw = self.check_image_size(image_size)
        s = add_prefix(self._net_structure(hw), _PREFIX)
        if s.widths != self.widths:
            raise ValueError(f"the traced groups of {self.factory} at {hw} have widths "
                             f"{list(s.widths)}, the model {list(self.widths)}.")
        return s

    def check_image_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any(not isinstance(v, int) or v < 1 for v in hw):
            raise ValueError(f"unsupported image size {image_size!r}: use positive integers.")
        return hw  # type: ignore[return-value]

    def config(self) -> dict[str, Any]:
        return dict(factory=self.factory, factory_kwargs=self.factory_kwargs,
                    image_size=self.image_size, num_classes=self.num_classes,
                    in_channels=self.in_channels, prune=self.prune, ignore=list(self.ignore),
                    widths=list(self.widths), dtype=self.dtype_name, seed=self.seed)

    def features(self, x: jax.Array) -> jax.Array:
        """The whole network: it ends in its own head. Cut Linen layers (through
        ``nnx.bridge``) run at their stored widths (:mod:`sap_jax.structure.linen`)."""
        with linen.stored_widths():
            return self.net(x)

    def classify(self, f: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return f  # the logits already; ``rngs`` is not used
