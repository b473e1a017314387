"""ImageNet ResNets: ResNet-18/34 (basic blocks) and ResNet-50/101 (bottleneck v1.5).

torchvision layout: 7x7/2 stem conv, BN, ReLU, 3x3/2 max-pool, four stages of
planes 64/128/256/512 (the first block of stages 2-4 has stride 2, on the 3x3
conv in bottlenecks = "v1.5"), global average pool, linear head. Total stride
32. Shortcuts are 1x1 projections (option B). Groups: a basic block's inner
width; a bottleneck's two inner widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from sap_jax.models.blocks import BasicBlock, Bottleneck
from sap_jax.models.common import PrunableModel, batch_norm, conv, dtype_from

BLOCKS = ("basic", "bottleneck")


class ResNet(PrunableModel):
    def __init__(self, stage_sizes: Sequence[int] = (3, 4, 6, 3), *, block: str = "bottleneck",
                 stem_width: int = 64, stage_planes: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 1000, widths: Sequence[int] | None = None,
                 in_channels: int = 3, dtype: str | None = None, rngs: nnx.Rngs):
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}.")
        if len(stage_sizes) != len(stage_planes) or min(stage_sizes) < 1:
            raise ValueError(f"stage_sizes {tuple(stage_sizes)} and stage_planes "
                             f"{tuple(stage_planes)} must have the same length, sizes >= 1.")
        self.stage_sizes, self.block = tuple(int(n) for n in stage_sizes), block
        self.stem_width, self.stage_planes = stem_width, tuple(int(p) for p in stage_planes)
        self.num_classes, self.in_channels, self.dtype_name = num_classes, in_channels, dtype
        self.expansion = 1 if block == "basic" else 4
        self.total_stride = 4 * 2 ** (len(self.stage_sizes) - 1)
        self.widths = self._validate_widths(widths)
        dt = dtype_from(dtype)
        self.stem_conv = conv(in_channels, stem_width, 7, 2, dtype=dt, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, dtype=dt, rngs=rngs)
        stages, k, cin = [], 0, stem_width
        for s, (n, planes) in enumerate(zip(self.stage_sizes, self.stage_planes)):
            blocks, cout = [], planes * self.expansion
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                if block == "basic":
                    blocks.append(BasicBlock(cin, self.widths[k], cout, stride, "B", dtype=dt,
                                             rngs=rngs))
                else:
                    blocks.append(Bottleneck(cin, self.widths[k], self.widths[k + 1], cout, stride,
                                             dtype=dt, rngs=rngs))
                k, cin = k + blocks[-1].num_groups, cout
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, num_classes, dtype=dt, rngs=rngs)

    def default_widths(self) -> tuple[int, ...]:
        per_block = 1 if self.block == "basic" else 2
        return tuple(p for n, p in zip(self.stage_sizes, self.stage_planes)
                     for _ in range(n * per_block))

    def config(self) -> dict[str, Any]:
        return dict(stage_sizes=list(self.stage_sizes), block=self.block,
                    stem_width=self.stem_width, stage_planes=list(self.stage_planes),
                    num_classes=self.num_classes, widths=list(self.widths),
                    in_channels=self.in_channels, dtype=self.dtype_name)

    def features(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return self._run_blocks(x).mean(axis=(1, 2))

    def classify(self, f: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.head(f)  # no dropout: ``rngs`` is accepted like every backbone's
