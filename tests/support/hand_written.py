"""Hand-written oracles for the tracer: the built-in backbones' channel groups and gated
forward, written out layer by layer as they were before the tracer derived both.

The package has one mechanism (``sap_jax.tracing``: traced groups, traced gating); these are
kept only to check it (tests/test_trace.py):

- :func:`describe`: the groups of ResNetCifar, ResNet (basic and bottleneck) and MobileNetV2,
  built with ``StructureBuilder`` from each block's constructor arguments;
- :func:`gated_forward`: their forward with the keep vector of each group multiplied in right
  after the activation that ends the group's producer, as the original code did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sap_jax.models.blocks import BasicBlock, Bottleneck, InvertedResidual
from sap_jax.models.mobilenet_v2 import MobileNetV2, make_divisible
from sap_jax.models.resnet import ResNet
from sap_jax.models.resnet_cifar import ResNetCifar
from sap_jax.structure import groups as G

# ------------------------------------------------------------------------------ groups

def down(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Output size of a stride-``stride`` conv or pool with ``kernel // 2`` padding (exact for
    odd kernels when the input size divides by the stride, which the models check)."""
    return (hw[0] // stride, hw[1] // stride)


def _block(b: G.StructureBuilder, blk: Any, path: G.Path, hw: tuple[int, int]
           ) -> tuple[int, int]:
    out = down(hw, blk.stride)
    if isinstance(blk, BasicBlock):
        g = b.group(path, blk.width)
        b.conv(path + ("conv1",), blk.cin, g, 3, out, blk.stride)
        b.norm(path + ("bn1",), g)
        b.conv(path + ("conv2",), g, blk.cout, 3, out)
        b.norm(path + ("bn2",), blk.cout)
    elif isinstance(blk, Bottleneck):
        g1 = b.group(path + ("inner1",), blk.width1)
        g2 = b.group(path + ("inner2",), blk.width2)
        b.conv(path + ("conv1",), blk.cin, g1, 1, hw)
        b.norm(path + ("bn1",), g1)
        b.conv(path + ("conv2",), g1, g2, 3, out, blk.stride)
        b.norm(path + ("bn2",), g2)
        b.conv(path + ("conv3",), g2, blk.cout, 1, out)
        b.norm(path + ("bn3",), blk.cout)
    else:
        assert isinstance(blk, InvertedResidual)
        h: G.Dim = b.group(path, blk.hidden) if blk.expand else blk.hidden
        if blk.expand:
            b.conv(path + ("expand_conv",), blk.cin, h, 1, hw)
            b.norm(path + ("expand_bn",), h)
        b.conv(path + ("dw_conv",), h, h, 3, out, blk.stride, depthwise=True)
        b.norm(path + ("dw_bn",), h)
        b.conv(path + ("project_conv",), h, blk.cout, 1, out)
        b.norm(path + ("project_bn",), blk.cout)
        return out
    if getattr(blk, "projects", False):
        b.conv(path + ("down_conv",), blk.cin, blk.cout, 1, out, blk.stride)
        b.norm(path + ("down_bn",), blk.cout)
    return out


def _blocks(b: G.StructureBuilder, model: Any, hw: tuple[int, int]) -> tuple[int, int]:
    for path, blk in model.blocks():
        hw = _block(b, blk, path, hw)
    return hw


def describe(model: Any, image_size: int) -> G.Structure:
    """The channel groups of a built-in backbone, by hand."""
    hw = (image_size, image_size)
    b = G.StructureBuilder(hw, model.in_channels)
    if isinstance(model, ResNetCifar):
        b.conv(("stem_conv",), model.in_channels, model.stage_widths[0], 3, hw)
        b.norm(("stem_bn",), model.stage_widths[0])
        _blocks(b, model, hw)
        b.dense(("head",), model.stage_widths[-1], model.num_classes)
    elif isinstance(model, ResNet):
        hw = down(hw, 2)
        b.conv(("stem_conv",), model.in_channels, model.stem_width, 7, hw, 2)
        b.norm(("stem_bn",), model.stem_width)
        _blocks(b, model, down(hw, 2))  # after the max-pool
        b.dense(("head",), model.stage_planes[-1] * model.expansion, model.num_classes)
    else:
        assert isinstance(model, MobileNetV2)
        cin = make_divisible(model.stem_width * model.width_mult)
        hw = down(hw, model.stem_stride)
        b.conv(("stem_conv",), model.in_channels, cin, 3, hw, model.stem_stride)
        b.norm(("stem_bn",), cin)
        hw = _blocks(b, model, hw)
        cin = [blk for _, blk in model.blocks()][-1].cout
        b.conv(("last_conv",), cin, model.last_ch, 1, hw)
        b.norm(("last_bn",), model.last_ch)
        b.dense(("head",), model.last_ch, model.num_classes)
    s = b.build()
    assert s.widths == model.widths, (s.widths, model.widths)
    return s


# ------------------------------------------------------------------------ gated forward

def _gate(x: jax.Array, v: jax.Array | None) -> jax.Array:
    return x if v is None else x * v.astype(x.dtype)


def _shortcut_a(blk: BasicBlock, x: jax.Array) -> jax.Array:
    """Option A: subsample, then zero-pad the new channels on both sides."""
    if blk.stride != 1:
        x = x[:, ::blk.stride, ::blk.stride, :]
    lo = (blk.cout - blk.cin) // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, blk.cout - blk.cin - lo)))


def _gated_block(blk: Any, x: jax.Array, vs: Sequence[jax.Array]) -> jax.Array:
    if isinstance(blk, BasicBlock):
        y = _gate(nnx.relu(blk.bn1(blk.conv1(x))), vs[0])
        y = blk.bn2(blk.conv2(y))
        if blk.projects:
            sc = blk.down_bn(blk.down_conv(x))
        elif blk.stride != 1 or blk.cout != blk.cin:
            sc = _shortcut_a(blk, x)
        else:
            sc = x
        return nnx.relu(y + sc)
    if isinstance(blk, Bottleneck):
        y = _gate(nnx.relu(blk.bn1(blk.conv1(x))), vs[0])
        y = _gate(nnx.relu(blk.bn2(blk.conv2(y))), vs[1])
        y = blk.bn3(blk.conv3(y))
        sc = blk.down_bn(blk.down_conv(x)) if blk.projects else x
        return nnx.relu(y + sc)
    v = vs[0] if blk.expand else None
    y = _gate(nnx.relu6(blk.expand_bn(blk.expand_conv(x))), v) if blk.expand else x
    y = _gate(nnx.relu6(blk.dw_bn(blk.dw_conv(y))), v)
    y = blk.project_bn(blk.project_conv(y))
    return x + y if blk.residual else y


def gated_forward(model: Any, x: jax.Array, arch: G.Arch) -> jax.Array:
    """Logits of a built-in backbone (no dropout) with group k's channels times ``arch[k]``."""
    k, act = 0, nnx.relu6 if isinstance(model, MobileNetV2) else nnx.relu
    x = act(model.stem_bn(model.stem_conv(x)))
    if isinstance(model, ResNet):
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for _, blk in model.blocks():
        x = _gated_block(blk, x, arch[k:k + blk.num_groups])
        k += blk.num_groups
    if isinstance(model, MobileNetV2):
        x = nnx.relu6(model.last_bn(model.last_conv(x)))
    return model.head(x.mean(axis=(1, 2)))
