"""sap_jax: SAP channel pruning (structural alignment through partial regularization) in JAX.

The package is layered (docs/design.md, "Module map"); each sub-package imports only those
below it:

* :mod:`sap_jax.runtime`: devices, XLA options, console, errors, speed;
* :mod:`sap_jax.structure`: channel groups, codec, MACs, norms, slicing;
* :mod:`sap_jax.tracing`: channel groups of any NNX model, from its jaxpr;
* :mod:`sap_jax.models`: the built-in backbones and :class:`~sap_jax.models.TracedModel`;
* :mod:`sap_jax.method`: the generator, penalty, resource loss, cut and baselines;
* :mod:`sap_jax.surgery`: extract, save/load, pretrained weights;
* :mod:`sap_jax.train`: the config and the training program.

The modules a user's own training loop needs are re-exported here, loaded on first use (so
``import sap_jax`` stays light): ``from sap_jax import penalty, agn, resource, flops, models,
surgery, tracing``.
"""

from __future__ import annotations

import importlib
from typing import Any

from sap_jax.runtime.version import VERSION as __version__

_EXPORTS = {
    "groups": "sap_jax.structure.groups", "codec": "sap_jax.structure.codec",
    "flops": "sap_jax.structure.flops", "norms": "sap_jax.structure.norms",
    "agn": "sap_jax.method.agn", "penalty": "sap_jax.method.penalty",
    "resource": "sap_jax.method.resource", "cut": "sap_jax.method.cut",
    "baselines": "sap_jax.method.baselines", "speed": "sap_jax.runtime.speed",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sap_jax' has no attribute {name!r}")
