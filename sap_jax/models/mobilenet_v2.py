"""MobileNetV2 (Sandler et al. 2018), for ImageNet (224) and for 32x32 inputs.

ImageNet (torchvision layout): 3x3/2 stem conv to 32, inverted-residual stages
``(t, c, n, s)`` = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
(6,160,3,2) (6,320,1,1), 1x1 conv to 1280, global average pool, dropout 0.2,
linear head. Total stride 32.

CIFAR variant (the common one used by CIFAR pruning papers): the stem conv has
stride 1 and the second stage (c=24) has stride 1, so the strides are
stem 1, stages 1,1,2,2,1,2,1: total stride 8, a 4x4 final feature map at
32x32. No dropout. Unlike some CIFAR code bases, blocks keep the standard
residual rule (identity only when stride 1 and widths match; no projection
shortcuts), so both variants are the same class.

Groups: the hidden (expanded) width of every block with expand ratio != 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from sap_jax.models.blocks import InvertedResidual
from sap_jax.models.common import PrunableModel, batch_norm, conv, dtype_from

IMAGENET_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
CIFAR_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple, never below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MobileNetV2(PrunableModel):
    def __init__(self, *, setting: Sequence[Sequence[int]] = IMAGENET_SETTING,
                 width_mult: float = 1.0, stem_width: int = 32, stem_stride: int = 2,
                 last_width: int = 1280, num_classes: int = 1000, dropout: float = 0.2,
                 widths: Sequence[int] | None = None, in_channels: int = 3,
                 dtype: str | None = None, rngs: nnx.Rngs):
        setting = tuple(tuple(int(x) for x in row) for row in setting)
        if not setting or any(len(r) != 4 or min(r) < 1 for r in setting):
            raise ValueError(f"setting must be rows (t, c, n, s) of positive ints; got {setting}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.setting, self.width_mult = setting, float(width_mult)
        self.stem_width, self.stem_stride, self.last_width = stem_width, stem_stride, last_width
        self.num_classes, self.dropout_rate = num_classes, float(dropout)
        self.in_channels, self.dtype_name = in_channels, dtype
        self.total_stride = stem_stride
        for _, _, _, s in setting:
            self.total_stride *= s
        self.widths = self._validate_widths(widths)
        dt = dtype_from(dtype)
        cin = make_divisible(stem_width * self.width_mult)
        self.last_ch = make_divisible(last_width * max(1.0, self.width_mult))
        self.stem_conv = conv(in_channels, cin, 3, stem_stride, dtype=dt, rngs=rngs)
        self.stem_bn = batch_norm(cin, dtype=dt, rngs=rngs)
        stages, k = [], 0
        for t, c, n, s in setting:
            cout, blocks = make_divisible(c * self.width_mult), []
            for i in range(n):
                if t != 1:
                    hidden, k = self.widths[k], k + 1
                else:
                    hidden = cin
                blocks.append(InvertedResidual(cin, hidden, cout, s if i == 0 else 1, t != 1,
                                               dtype=dt, rngs=rngs))
                cin = cout
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.last_conv = conv(cin, self.last_ch, 1, dtype=dt, rngs=rngs)
        self.last_bn = batch_norm(self.last_ch, dtype=dt, rngs=rngs)
        self.dropout = nnx.Dropout(self.dropout_rate)
        self.head = nnx.Linear(self.last_ch, num_classes, dtype=dt, rngs=rngs)

    def default_widths(self) -> tuple[int, ...]:
        out, cin = [], make_divisible(self.stem_width * self.width_mult)
        for t, c, n, _ in self.setting:
            for _ in range(n):
                if t != 1:
                    out.append(cin * t)
                cin = make_divisible(c * self.width_mult)
        return tuple(out)

    def config(self) -> dict[str, Any]:
        return dict(setting=[list(r) for r in self.setting], width_mult=self.width_mult,
                    stem_width=self.stem_width, stem_stride=self.stem_stride,
                    last_width=self.last_width, num_classes=self.num_classes,
                    dropout=self.dropout_rate, widths=list(self.widths),
                    in_channels=self.in_channels, dtype=self.dtype_name)

    def features(self, x: jax.Array) -> jax.Array:
        x = nnx.relu6(self.stem_bn(self.stem_conv(x)))
        x = self._run_blocks(x)
        return nnx.relu6(self.last_bn(self.last_conv(x))).mean(axis=(1, 2))

    def classify(self, f: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Dropout (stream "dropout" of ``rngs``, only when given) and the linear head."""
        if self.dropout_rate > 0 and rngs is not None:
            f = self.dropout(f, rngs=rngs)
        return self.head(f)

    def trace_ignore(self) -> tuple[str, ...]:
        """Only the expanded hidden widths are groups: the stem, the last conv and every
        block's (linear bottleneck) projection keep their outputs."""
        return ("stem_conv", "last_conv", *(".".join(map(str, path + ("project_conv",)))
                                            for path, _ in self.blocks()))
