"""CIFAR ResNets (He et al. 2016, §4.2): 3 stages of basic blocks, widths 16/32/64.

Depth ``6n + 2`` (20, 32, 44, 56, 110, ...). The stem is a 3x3 conv at stride
1; stages 2 and 3 start with a stride-2 block, so the total stride is 4.
Shortcut "A" (default, as in the authors' CIFAR code) subsamples and
zero-pads; "B" uses a 1x1 projection. Groups: the inner width of every block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from sap_jax.models.blocks import BasicBlock
from sap_jax.models.common import PrunableModel, batch_norm, conv, dtype_from


class ResNetCifar(PrunableModel):
    def __init__(self, depth: int = 56, *, stage_widths: Sequence[int] = (16, 32, 64),
                 num_classes: int = 10, shortcut: str = "A", widths: Sequence[int] | None = None,
                 in_channels: int = 3, dtype: str | None = None, rngs: nnx.Rngs):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...); "
                             f"got {depth}.")
        self.depth, self.stage_widths = depth, tuple(int(w) for w in stage_widths)
        self.num_classes, self.shortcut, self.in_channels = num_classes, shortcut, in_channels
        self.dtype_name = dtype
        self.blocks_per_stage = (depth - 2) // 6
        self.total_stride = 2 ** (len(self.stage_widths) - 1)
        self.widths = self._validate_widths(widths)
        dt = dtype_from(dtype)
        self.stem_conv = conv(in_channels, self.stage_widths[0], 3, dtype=dt, rngs=rngs)
        self.stem_bn = batch_norm(self.stage_widths[0], dtype=dt, rngs=rngs)
        stages, k, cin = [], 0, self.stage_widths[0]
        for s, cout in enumerate(self.stage_widths):
            blocks = []
            for i in range(self.blocks_per_stage):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(BasicBlock(cin, self.widths[k], cout, stride, shortcut, dtype=dt,
                                         rngs=rngs))
                k, cin = k + 1, cout
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, num_classes, dtype=dt, rngs=rngs)

    def default_widths(self) -> tuple[int, ...]:
        return tuple(w for w in self.stage_widths for _ in range(self.blocks_per_stage))

    def config(self) -> dict[str, Any]:
        return dict(depth=self.depth, stage_widths=list(self.stage_widths),
                    num_classes=self.num_classes, shortcut=self.shortcut, widths=list(self.widths),
                    in_channels=self.in_channels, dtype=self.dtype_name)

    def features(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        return self._run_blocks(x).mean(axis=(1, 2))

    def classify(self, f: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.head(f)  # no dropout: ``rngs`` is accepted like every backbone's
