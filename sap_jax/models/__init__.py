"""Model registry: create any backbone by name.

>>> from sap_jax import models
>>> model = models.create("resnet56")                 # dense
>>> small = models.create("resnet56", widths=[8] * 27)  # same class, pruned widths
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from flax import nnx

from sap_jax.models.common import PrunableModel
from sap_jax.models.gating import gated_apply
from sap_jax.models.mobilenet_v2 import CIFAR_SETTING, MobileNetV2
from sap_jax.models.resnet import ResNet
from sap_jax.models.resnet_cifar import ResNetCifar
from sap_jax.models.traced import TracedModel, is_factory_path

#: Classes a saved model may name (pruned checkpoints store the class name). A user's own
#: network is a TracedModel, which stores its factory's import path: no entry needed here.
MODEL_CLASSES: dict[str, type[PrunableModel]] = {
    c.__name__: c for c in (ResNetCifar, ResNet, MobileNetV2, TracedModel)}


@dataclasses.dataclass(frozen=True)
class Preset:
    cls: type[PrunableModel]
    kwargs: dict[str, Any]
    image_size: int  # the input size the preset is meant for
    description: str


_TINY_MBV2 = ((1, 8, 1, 1), (2, 8, 2, 2), (2, 16, 1, 2))
_TINY_MBV2_CIFAR = ((1, 8, 1, 1), (2, 8, 2, 1), (2, 16, 1, 2))

PRESETS: dict[str, Preset] = {
    **{f"resnet{d}": Preset(ResNetCifar, dict(depth=d), 32, f"CIFAR ResNet-{d}, shortcut A")
       for d in (20, 32, 44, 56, 110)},
    "resnet18": Preset(ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic"), 224,
                       "ImageNet ResNet-18"),
    "resnet34": Preset(ResNet, dict(stage_sizes=(3, 4, 6, 3), block="basic"), 224,
                       "ImageNet ResNet-34"),
    "resnet50": Preset(ResNet, dict(stage_sizes=(3, 4, 6, 3)), 224, "ImageNet ResNet-50 v1.5"),
    "resnet101": Preset(ResNet, dict(stage_sizes=(3, 4, 23, 3)), 224, "ImageNet ResNet-101 v1.5"),
    "mobilenet_v2": Preset(MobileNetV2, {}, 224, "ImageNet MobileNetV2 1.0"),
    "mobilenet_v2_cifar": Preset(
        MobileNetV2, dict(setting=CIFAR_SETTING, stem_stride=1, num_classes=10, dropout=0.0), 32,
        "MobileNetV2 1.0 for 32x32 inputs (stem and stage-2 stride 1)"),
    # Tiny presets of each family, for fast tests.
    "resnet_cifar_tiny": Preset(ResNetCifar, dict(depth=8, stage_widths=(4, 8, 16)), 32,
                                "test-size CIFAR ResNet"),
    "resnet_tiny": Preset(ResNet, dict(stage_sizes=(1, 1, 1, 1), block="basic", stem_width=8,
                                       stage_planes=(4, 8, 8, 16), num_classes=10), 32,
                          "test-size ImageNet-style basic ResNet"),
    "resnet_bottleneck_tiny": Preset(ResNet, dict(stage_sizes=(1, 2, 1, 1), stem_width=8,
                                                  stage_planes=(4, 4, 8, 8), num_classes=10), 32,
                                     "test-size ImageNet-style bottleneck ResNet"),
    "mobilenet_v2_tiny": Preset(MobileNetV2, dict(setting=_TINY_MBV2, stem_width=8, last_width=32,
                                                  num_classes=10), 32,
                                "test-size ImageNet-style MobileNetV2"),
    "mobilenet_v2_cifar_tiny": Preset(
        MobileNetV2, dict(setting=_TINY_MBV2_CIFAR, stem_width=8, stem_stride=1, last_width=32,
                          num_classes=10, dropout=0.0), 32, "test-size CIFAR MobileNetV2"),
}


def names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(names())}.")
    return PRESETS[name]


def create(
    name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None, **overrides: Any
) -> PrunableModel:
    """Build the preset ``name``; ``overrides`` replace constructor arguments (e.g. ``widths``).

    ``name`` may also be a factory ``"package.module:function"`` of any NNX CNN (a
    :class:`TracedModel`; ``overrides`` then take its arguments, e.g. ``image_size``).
    """
    if is_factory_path(name):
        return TracedModel(name, seed=seed, **overrides)
    preset = get_preset(name)
    return preset.cls(**{**preset.kwargs, **overrides}, rngs=rngs or nnx.Rngs(seed))


def create_abstract(name: str, **overrides: Any) -> PrunableModel:
    """Like :func:`create` but allocates nothing (parameters are ShapeDtypeStructs)."""
    return nnx.eval_shape(lambda: create(name, **overrides))


def from_config(class_name: str, config: dict[str, Any], *, rngs: nnx.Rngs | None = None,
                abstract: bool = False) -> PrunableModel:
    """Rebuild a model from its class name and :meth:`PrunableModel.config`."""
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {class_name!r}; known: {sorted(MODEL_CLASSES)}.")
    cls = MODEL_CLASSES[class_name]
    build = lambda: cls(**config, rngs=rngs or nnx.Rngs(0))  # noqa: E731
    return nnx.eval_shape(build) if abstract else build()


__all__ = ["PrunableModel", "ResNetCifar", "ResNet", "MobileNetV2", "TracedModel",
           "is_factory_path", "MODEL_CLASSES", "PRESETS",
           "Preset", "names", "get_preset", "create", "create_abstract", "from_config",
           "gated_apply"]
