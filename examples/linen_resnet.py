"""A Linen ResNet in the form published JAX vision code writes it (Flax's ImageNet example,
big_vision, flaxmodels), and the few lines that make any Linen network an NNX module sap_jax
can prune. Imports nothing from sap_jax.

    python -m sap_jax.main --config=configs/quickstart.py --workdir=/tmp/linen \\
        --config.model=examples.linen_resnet:resnet18_linen --config.model_prune=all
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

ModuleDef = Any


class ResNetBlock(nn.Module):
    """Two 3x3 convs; a 1x1 projection when the shape changes."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, act=self.act,
                                strides=strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


class FromLinen(nnx.Module):
    """A Linen network as an NNX module: ``nnx.bridge.ToNNX`` holds its variables, and
    ``train()``/``eval()`` reach it as Linen's ``train`` argument (BatchNorm statistics are
    updated in training mode)."""

    def __init__(self, module: nn.Module, sample: jnp.ndarray, *, rngs: nnx.Rngs):
        self.net = nnx.bridge.ToNNX(module, rngs=rngs)
        nnx.bridge.lazy_init(self.net, sample, train=False)
        self.use_running_average = True  # what nnx's train() and eval() set

    def __call__(self, x):
        train = not self.use_running_average
        return self.net(x, train=train, mutable=["batch_stats"] if train else False)


def resnet18_linen(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32,
                   width: int = 64, rngs: nnx.Rngs | None = None) -> FromLinen:
    """ResNet-18 (stages 2-2-2-2) with ``width`` stem filters, as an NNX module."""
    sample = jnp.zeros((1, image_size, image_size, in_channels))
    return FromLinen(ResNet((2, 2, 2, 2), num_classes, num_filters=width), sample,
                     rngs=rngs or nnx.Rngs(0))


def resnet_tiny_linen(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32,
                      width: int = 4, rngs: nnx.Rngs | None = None) -> FromLinen:
    """Two stages of one block each: the same code at test size."""
    sample = jnp.zeros((1, image_size, image_size, in_channels))
    return FromLinen(ResNet((1, 1), num_classes, num_filters=width), sample,
                     rngs=rngs or nnx.Rngs(0))
