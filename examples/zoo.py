"""A zoo of small, plain Flax NNX CNNs, written the way an ordinary user would.

Nothing here imports ``sap_jax``: these models exist to check that sap_jax can
trace and prune architectures it has never seen (VGG with a flatten head,
grouped convs, dense concatenation, squeeze-and-excitation, depthwise convs,
LayerNorm + layer scale, a PyTorch-style NCHW flatten, a U-Net with transposed-conv and
resize upsampling, and dilated, factorised and non-square-strided convs).

Every model takes NHWC float input and returns ``(N, num_classes)`` logits;
``model.train()`` / ``model.eval()`` switch BatchNorm between batch statistics
and running averages. Every factory has the signature

    name(num_classes=10, in_channels=3, *, image_size=32, width=8, rngs=None)

where ``width`` is the base channel count. Smoke test::

    python examples/zoo.py
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Explicit symmetric "same" padding for odd kernels (PyTorch style).
    return ((k // 2, k // 2), (k // 2, k // 2))


def _bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # PyTorch-like BN hyper-parameters; starts in train mode.
    return nnx.BatchNorm(c, use_running_average=False, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _conv(
    cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, groups: int = 1
) -> nnx.Conv:
    # Bias-free: every such conv is followed by BatchNorm.
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=_pad(k), feature_group_count=groups,
                    use_bias=False, rngs=rngs)


def _gap(x: Array) -> Array:
    return x.mean(axis=(1, 2))


def _pool2(x: Array) -> Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


# --------------------------------------------------------------------------- VGG

_VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nnx.Module):
    def __init__(self, cfg: list[int | str], num_classes: int, in_channels: int, image_size: int,
                 width: int, rngs: nnx.Rngs) -> None:
        convs, bns, pool_after = [], [], []
        c, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                # Skip pools that would shrink below 1x1 (lets 8x8 digits through).
                if size >= 2 and convs:
                    pool_after[-1] = True
                    size //= 2
                continue
            out = max(1, int(v) * width // 64)
            convs.append(_conv(c, out, 3, rngs))
            bns.append(_bn(out, rngs))
            pool_after.append(False)
            c = out
        self.convs = nnx.List(convs)
        self.bns = nnx.List(bns)
        self.pool_after = tuple(pool_after)  # static structure, not state
        self.fc1 = nnx.Linear(size * size * c, 4 * width, rngs=rngs)
        self.fc2 = nnx.Linear(4 * width, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        for conv, bn, pool in zip(self.convs, self.bns, self.pool_after):
            x = jax.nn.relu(bn(conv(x)))
            if pool:
                x = _pool2(x)
        x = x.reshape(x.shape[0], -1)  # NHWC flatten feeds the classifier
        return self.fc2(jax.nn.relu(self.fc1(x)))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
             rngs: nnx.Rngs | None = None) -> nnx.Module:
    return VGG(_VGG_CFGS["A"], num_classes, in_channels, image_size, width, rngs or nnx.Rngs(0))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
             rngs: nnx.Rngs | None = None) -> nnx.Module:
    return VGG(_VGG_CFGS["D"], num_classes, in_channels, image_size, width, rngs or nnx.Rngs(0))


# ----------------------------------------------------------------------- ResNeXt

class ResNeXtBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, cardinality: int, rngs: nnx.Rngs) -> None:
        # bottleneck = cout/2, rounded up to a multiple of groups
        mid = -(-(cout // 2) // cardinality) * cardinality
        self.conv1, self.bn1 = _conv(cin, mid, 1, rngs), _bn(mid, rngs)
        self.conv2, self.bn2 = (
            _conv(mid, mid, 3, rngs, stride=stride, groups=cardinality), _bn(mid, rngs))
        self.conv3, self.bn3 = _conv(mid, cout, 1, rngs), _bn(cout, rngs)
        # Projection shortcut only when the shape changes.
        self.proj = _conv(cin, cout, 1, rngs, stride=stride) if stride != 1 or cin != cout else None
        self.proj_bn = _bn(cout, rngs) if self.proj is not None else None

    def __call__(self, x: Array) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        sc = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(y + sc)


class ResNeXt(nnx.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs) -> None:
        self.stem, self.stem_bn = _conv(in_channels, 4 * width, 3, rngs), _bn(4 * width, rngs)
        self.blocks = nnx.List([
            ResNeXtBlock(4 * width, 4 * width, 1, 4, rngs),
            ResNeXtBlock(4 * width, 8 * width, 2, 4, rngs),
        ])
        self.head = nnx.Linear(8 * width, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        for blk in self.blocks:
            x = blk(x)
        return self.head(_gap(x))


def resnext(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
            rngs: nnx.Rngs | None = None) -> nnx.Module:
    return ResNeXt(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# ---------------------------------------------------------------------- DenseNet

class DenseLayer(nnx.Module):
    def __init__(self, cin: int, growth: int, rngs: nnx.Rngs) -> None:
        self.bn1, self.conv1 = _bn(cin, rngs), _conv(cin, 2 * growth, 1, rngs)
        self.bn2, self.conv2 = _bn(2 * growth, rngs), _conv(2 * growth, growth, 3, rngs)

    def __call__(self, x: Array) -> Array:
        y = self.conv1(jax.nn.relu(self.bn1(x)))
        y = self.conv2(jax.nn.relu(self.bn2(y)))
        return jnp.concatenate([x, y], axis=-1)  # dense connectivity: channels accumulate


class DenseNet(nnx.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs,
                 num_layers: int = 3) -> None:
        growth, c = width, 2 * width
        self.stem = _conv(in_channels, c, 3, rngs)
        layers = []
        for _ in range(num_layers):
            layers.append(DenseLayer(c, growth, rngs))
            c += growth
        self.block = nnx.List(layers)
        self.trans_bn, self.trans_conv = _bn(c, rngs), _conv(c, c // 2, 1, rngs)
        c //= 2
        self.final_bn = _bn(c, rngs)
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.stem(x)
        for layer in self.block:
            x = layer(x)
        x = self.trans_conv(jax.nn.relu(self.trans_bn(x)))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = jax.nn.relu(self.final_bn(x))
        return self.head(_gap(x))


def densenet(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
             rngs: nnx.Rngs | None = None) -> nnx.Module:
    return DenseNet(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# --------------------------------------------------------------------- SE-ResNet

class SE(nnx.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    def __init__(self, c: int, hidden: int, rngs: nnx.Rngs,
                 gate: Callable[[Array], Array] = jax.nn.sigmoid) -> None:
        self.fc1 = nnx.Linear(c, max(1, hidden), rngs=rngs)
        self.fc2 = nnx.Linear(max(1, hidden), c, rngs=rngs)
        self.gate = gate

    def __call__(self, x: Array) -> Array:
        s = self.gate(self.fc2(jax.nn.relu(self.fc1(_gap(x)))))
        return x * s[:, None, None, :]


class SEBasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> None:
        self.conv1, self.bn1 = _conv(cin, cout, 3, rngs, stride=stride), _bn(cout, rngs)
        self.conv2, self.bn2 = _conv(cout, cout, 3, rngs), _bn(cout, rngs)
        self.se = SE(cout, cout // 2, rngs)
        self.proj = _conv(cin, cout, 1, rngs, stride=stride) if stride != 1 or cin != cout else None
        self.proj_bn = _bn(cout, rngs) if self.proj is not None else None

    def __call__(self, x: Array) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))  # SE recalibrates the residual branch before the add
        sc = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(y + sc)


class SEResNet(nnx.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs) -> None:
        self.stem, self.stem_bn = _conv(in_channels, 2 * width, 3, rngs), _bn(2 * width, rngs)
        self.layer1 = SEBasicBlock(2 * width, 2 * width, 1, rngs)
        self.layer2 = SEBasicBlock(2 * width, 4 * width, 2, rngs)
        self.head = nnx.Linear(4 * width, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head(_gap(x))


def se_resnet(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
              rngs: nnx.Rngs | None = None) -> nnx.Module:
    return SEResNet(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# ------------------------------------------------------------------ MobileNetV3

class InvertedResidual(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs, expand: int = 4) -> None:
        hidden = cin * expand
        self.expand, self.bn1 = _conv(cin, hidden, 1, rngs), _bn(hidden, rngs)
        self.dw = _conv(hidden, hidden, 3, rngs, stride=stride, groups=hidden)  # depthwise
        self.bn2 = _bn(hidden, rngs)
        self.se = SE(hidden, hidden // 4, rngs, gate=jax.nn.hard_sigmoid)
        self.project, self.bn3 = _conv(hidden, cout, 1, rngs), _bn(cout, rngs)
        self.use_res = stride == 1 and cin == cout

    def __call__(self, x: Array) -> Array:
        y = jax.nn.hard_swish(self.bn1(self.expand(x)))
        y = jax.nn.hard_swish(self.bn2(self.dw(y)))
        y = self.bn3(self.project(self.se(y)))  # linear bottleneck: no activation after projection
        return x + y if self.use_res else y


class MobileNetV3(nnx.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs) -> None:
        self.stem, self.stem_bn = _conv(in_channels, 2 * width, 3, rngs), _bn(2 * width, rngs)
        self.blocks = nnx.List([
            InvertedResidual(2 * width, 2 * width, 1, rngs),
            InvertedResidual(2 * width, 4 * width, 2, rngs),
        ])
        self.last, self.last_bn = _conv(4 * width, 8 * width, 1, rngs), _bn(8 * width, rngs)
        self.head = nnx.Linear(8 * width, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.hard_swish(self.stem_bn(self.stem(x)))
        for blk in self.blocks:
            x = blk(x)
        x = jax.nn.hard_swish(self.last_bn(self.last(x)))
        return self.head(_gap(x))


def mobilenet_v3(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32,
                 width: int = 8, rngs: nnx.Rngs | None = None) -> nnx.Module:
    return MobileNetV3(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# ---------------------------------------------------------------------- ConvNeXt

class ConvNeXtBlock(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs, layer_scale: float = 1e-1) -> None:
        self.dw = nnx.Conv(c, c, (7, 7), padding=_pad(7), feature_group_count=c, rngs=rngs)
        self.norm = nnx.LayerNorm(c, rngs=rngs)  # over channels (last axis)
        self.fc1 = nnx.Linear(c, 4 * c, rngs=rngs)
        self.fc2 = nnx.Linear(4 * c, c, rngs=rngs)
        self.gamma = nnx.Param(layer_scale * jnp.ones((c,)))

    def __call__(self, x: Array) -> Array:
        y = self.fc2(jax.nn.gelu(self.fc1(self.norm(self.dw(x)))))
        return x + self.gamma[...] * y


class ConvNeXt(nnx.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs) -> None:
        c = 4 * width
        # Patchify stem: non-overlapping 2x2 patches, so no padding needed.
        self.stem = nnx.Conv(in_channels, c, (2, 2), strides=2, padding=((0, 0), (0, 0)), rngs=rngs)
        self.stem_norm = nnx.LayerNorm(c, rngs=rngs)
        self.blocks = nnx.List([ConvNeXtBlock(c, rngs), ConvNeXtBlock(c, rngs)])
        self.head_norm = nnx.LayerNorm(c, rngs=rngs)
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.stem_norm(self.stem(x))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.head_norm(_gap(x)))


def convnext(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
             rngs: nnx.Rngs | None = None) -> nnx.Module:
    return ConvNeXt(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# ----------------------------------------------------------- NCHW-flatten CNN

class FlattenCNN(nnx.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int,
                 rngs: nnx.Rngs) -> None:
        self.conv1, self.bn1 = _conv(in_channels, width, 3, rngs), _bn(width, rngs)
        self.conv2, self.bn2 = _conv(width, 2 * width, 3, rngs), _bn(2 * width, rngs)
        s = image_size // 2
        self.head = nnx.Linear(2 * width * s * s, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = _pool2(jax.nn.relu(self.bn1(self.conv1(x))))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        # PyTorch-ported head: flatten in (C, H, W) order, so channel c owns a contiguous block of
        # features.
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return self.head(x)


def flatten_cnn(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32,
                width: int = 8, rngs: nnx.Rngs | None = None) -> nnx.Module:
    return FlattenCNN(num_classes, in_channels, image_size, width, rngs or nnx.Rngs(0))


# ------------------------------------------------------------------------ U-Net

class UNet(nnx.Module):
    """A two-level U-Net trunk with a classification head: a stride-2 downsample, two ways
    up (a learned ConvTranspose and a nearest resize) and skip concatenations."""

    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs) -> None:
        w = width
        self.enc, self.enc_bn = _conv(in_channels, w, 3, rngs), _bn(w, rngs)
        self.down, self.down_bn = _conv(w, 2 * w, 3, rngs, stride=2), _bn(2 * w, rngs)
        self.mid, self.mid_bn = _conv(2 * w, 2 * w, 3, rngs), _bn(2 * w, rngs)
        # Learned upsampling, flax's default "SAME" padding: exactly twice the size.
        self.up = nnx.ConvTranspose(2 * w, w, (3, 3), strides=(2, 2), rngs=rngs)
        self.dec1, self.dec1_bn = _conv(2 * w, w, 3, rngs), _bn(w, rngs)
        self.side, self.side_bn = _conv(2 * w, w, 1, rngs), _bn(w, rngs)
        self.dec2, self.dec2_bn = _conv(2 * w, w, 3, rngs), _bn(w, rngs)
        self.head = nnx.Linear(w, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        e = jax.nn.relu(self.enc_bn(self.enc(x)))
        m = jax.nn.relu(self.down_bn(self.down(e)))
        m = jax.nn.relu(self.mid_bn(self.mid(m)))
        d = jax.nn.relu(self.dec1_bn(self.dec1(jnp.concatenate([self.up(m), e], axis=-1))))
        # Second way up: a 1x1 conv, then nearest-neighbour resizing to the skip's size.
        s = jax.nn.relu(self.side_bn(self.side(m)))
        s = jax.image.resize(s, (*e.shape[:3], s.shape[-1]), "nearest")
        d = jax.nn.relu(self.dec2_bn(self.dec2(jnp.concatenate([d, s], axis=-1))))
        return self.head(_gap(d))


def unet(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
         rngs: nnx.Rngs | None = None) -> nnx.Module:
    return UNet(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# ------------------------------------------------------------------ Dilated CNN

class DilatedCNN(nnx.Module):
    """Factorised (1x3 then 3x1) kernels, an atrous 3x3 conv and a conv strided along the
    height only."""

    def __init__(self, num_classes: int, in_channels: int, width: int, rngs: nnx.Rngs) -> None:
        w = width
        self.row = nnx.Conv(in_channels, w, (1, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.col = nnx.Conv(w, w, (3, 1), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = _bn(w, rngs)
        # Dilation 2: a 5x5 field of view for 3x3 weights; padding 2 keeps the size.
        self.atrous = nnx.Conv(w, 2 * w, (3, 3), kernel_dilation=2, padding=((2, 2), (2, 2)),
                               use_bias=False, rngs=rngs)
        self.bn2 = _bn(2 * w, rngs)
        self.tall = nnx.Conv(2 * w, 2 * w, (3, 3), strides=(2, 1), padding="SAME", use_bias=False,
                             rngs=rngs)
        self.bn3 = _bn(2 * w, rngs)
        self.head = nnx.Linear(2 * w, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.relu(self.bn1(self.col(self.row(x))))
        x = jax.nn.relu(self.bn2(self.atrous(x)))
        x = jax.nn.relu(self.bn3(self.tall(x)))
        return self.head(_gap(x))


def dilated(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32,
            width: int = 8, rngs: nnx.Rngs | None = None) -> nnx.Module:
    return DilatedCNN(num_classes, in_channels, width, rngs or nnx.Rngs(0))


# ------------------------------------------------------------------ ViT

class ViTBlock(nnx.Module):
    """Pre-norm transformer block: multi-head self-attention, then an MLP."""

    def __init__(self, d: int, heads: int, hidden: int, rngs: nnx.Rngs) -> None:
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(d, hidden, rngs=rngs), nnx.Linear(hidden, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)  # keeps its own random key

    def __call__(self, x: Array) -> Array:
        h = self.ln1(x)
        x = x + self.attn(h, h)
        return x + self.fc2(self.drop(jax.nn.gelu(self.fc1(self.ln2(x)))))


class ViT(nnx.Module):
    """A tiny ViT: conv patch embedding, a cls token broadcast against the batch, learned
    position embeddings, two blocks, the cls token's logits."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int,
                 rngs: nnx.Rngs, patch: int = 2, heads: int = 2) -> None:
        d = 2 * width
        self.patch = nnx.Conv(in_channels, d, (patch, patch), strides=patch, padding="VALID",
                              rngs=rngs)
        tokens = (image_size // patch) ** 2 + 1
        self.cls = nnx.Param(jnp.zeros((1, 1, d)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, d)))
        self.blocks = nnx.List([ViTBlock(d, heads, 2 * d, rngs) for _ in range(2)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, num_classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.patch(x)
        n, d = x.shape[0], x.shape[-1]
        x = x.reshape(n, -1, d)
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (n, 1, d)), x], axis=1)
        x = x + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)[:, 0])


def vit(num_classes: int = 10, in_channels: int = 3, *, image_size: int = 32, width: int = 8,
        heads: int = 2, rngs: nnx.Rngs | None = None) -> nnx.Module:
    return ViT(num_classes, in_channels, image_size, width, rngs or nnx.Rngs(0), heads=heads)


ZOO: dict[str, Callable[..., nnx.Module]] = {
    "vgg11_bn": vgg11_bn,
    "vgg16_bn": vgg16_bn,
    "resnext": resnext,
    "densenet": densenet,
    "se_resnet": se_resnet,
    "mobilenet_v3": mobilenet_v3,
    "convnext": convnext,
    "flatten_cnn": flatten_cnn,
    "unet": unet,
    "dilated": dilated,
    "vit": vit,
}


def num_params(model: nnx.Module) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


if __name__ == "__main__":
    # Smoke run: train/eval/jit forwards at digits (8x8x1) and CIFAR (32x32x3) sizes.
    for size, cin in ((8, 1), (32, 3)):
        x = jax.random.normal(jax.random.key(1), (2, size, size, cin))
        for name, make in ZOO.items():
            model = make(10, cin, image_size=size, width=4)
            outs = []
            model.train()
            outs.append(model(x))
            model.eval()
            outs.append(model(x))
            graphdef, state = nnx.split(model)
            # The lambda is traced and called right here, within this iteration.
            outs.append(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))  # noqa: B023
            for y in outs:
                assert y.shape == (2, 10) and bool(jnp.isfinite(y).all()), (name, y.shape)
            # jit (eval mode) matches eager eval
            assert jnp.allclose(outs[1], outs[2], atol=1e-4), name
            print(f"{size:>2}x{size}x{cin}  {name:<13} params={num_params(model):>7,}")
    print("ok")
