"""Residual blocks: layers and the plain forward pass.

Their channel groups (the inner widths) and the gating of those groups come from tracing the
forward (:mod:`sap_jax.tracing`), as for any user's model; the width arguments are what a
pruned model is rebuilt with.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sap_jax.models.common import batch_norm, conv, materialize

SHORTCUTS = ("A", "B")


class BasicBlock(nnx.Module):
    """ResNet basic block: 3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut.

    One channel group: the inner width (conv1's output, bn1, conv2's input).
    Shortcut "A" (CIFAR, parameter-free): subsample and zero-pad channels.
    Shortcut "B": a 1x1 projection conv + BN whenever the shape changes.
    """

    num_groups = 1

    def __init__(self, cin: int, width: int, cout: int, stride: int, shortcut: str = "B", *,
                 dtype: Any = None, rngs: nnx.Rngs):
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}.")
        self.cin, self.width, self.cout, self.stride = cin, width, cout, stride
        self.shortcut = shortcut
        self.conv1 = conv(cin, width, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, cout, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(cout, dtype=dtype, rngs=rngs)
        self.projects = shortcut == "B" and (stride != 1 or cin != cout)
        if self.projects:
            self.down_conv = conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
            self.down_bn = batch_norm(cout, dtype=dtype, rngs=rngs)

    def _shortcut(self, x: jax.Array) -> jax.Array:
        if self.projects:
            return self.down_bn(self.down_conv(x))
        if self.stride != 1:
            x = x[:, ::self.stride, ::self.stride, :]
        if self.cout != self.cin:  # option A: zero-pad the new channels on both sides
            lo = (self.cout - self.cin) // 2
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.cout - self.cin - lo)))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        y = materialize(nnx.relu(self.bn1(self.conv1(x))), self.bn1.scale[...])
        y = self.bn2(self.conv2(y))
        return materialize(nnx.relu(y + self._shortcut(x)), self.bn2.scale[...])



class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1, + projection shortcut.

    Two channel groups: conv1's output (-> conv2's input) and conv2's output
    (-> conv3's input), each with the BN that follows its conv.
    """

    num_groups = 2

    def __init__(self, cin: int, width1: int, width2: int, cout: int, stride: int, *,
                 dtype: Any = None, rngs: nnx.Rngs):
        self.cin, self.width1, self.width2, self.cout, self.stride = (
            cin, width1, width2, cout, stride)
        self.conv1 = conv(cin, width1, 1, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(width1, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width1, width2, 3, stride, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(width2, dtype=dtype, rngs=rngs)
        self.conv3 = conv(width2, cout, 1, dtype=dtype, rngs=rngs)
        self.bn3 = batch_norm(cout, dtype=dtype, rngs=rngs)
        self.projects = stride != 1 or cin != cout
        if self.projects:
            self.down_conv = conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
            self.down_bn = batch_norm(cout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = materialize(nnx.relu(self.bn1(self.conv1(x))), self.bn1.scale[...])
        y = materialize(nnx.relu(self.bn2(self.conv2(y))), self.bn2.scale[...])
        y = self.bn3(self.conv3(y))
        sc = self.down_bn(self.down_conv(x)) if self.projects else x
        return materialize(nnx.relu(y + sc), self.bn3.scale[...])



class InvertedResidual(nnx.Module):
    """MobileNetV2 block: [1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project
    -> BN.

    With an expand conv (expand ratio != 1) the hidden width is one channel
    group: the expand conv's output, the depthwise channels and the project
    conv's input, with both BNs. Without an expand conv the block has no group.
    Residual connection when stride is 1 and input and output widths match.
    """

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, expand: bool, *,
                 dtype: Any = None, rngs: nnx.Rngs):
        self.cin, self.hidden, self.cout, self.stride, self.expand = (
            cin, hidden, cout, stride, expand)
        self.num_groups = 1 if expand else 0
        if expand:
            self.expand_conv = conv(cin, hidden, 1, dtype=dtype, rngs=rngs)
            self.expand_bn = batch_norm(hidden, dtype=dtype, rngs=rngs)
        elif hidden != cin:
            raise ValueError(f"a block without expansion has hidden width = input width "
                             f"({cin}), got {hidden}.")
        self.dw_conv = conv(hidden, hidden, 3, stride, depthwise=True, dtype=dtype, rngs=rngs)
        self.dw_bn = batch_norm(hidden, dtype=dtype, rngs=rngs)
        self.project_conv = conv(hidden, cout, 1, dtype=dtype, rngs=rngs)
        self.project_bn = batch_norm(cout, dtype=dtype, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand:
            y = materialize(nnx.relu6(self.expand_bn(self.expand_conv(y))),
                            self.expand_bn.scale[...])
        y = materialize(nnx.relu6(self.dw_bn(self.dw_conv(y))), self.dw_bn.scale[...])
        y = self.project_bn(self.project_conv(y))
        return materialize(x + y, self.project_bn.scale[...]) if self.residual else y

