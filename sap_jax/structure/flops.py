"""MACs and parameter counts, as a function of the kept widths.

Convention (stated once, used everywhere):

* **MACs** are multiply-accumulates of convolutions and linear layers for one
  image: ``H_out * W_out * k_h * k_w * C_in * C_out / groups`` per conv and
  ``C_in * C_out`` per linear layer and token (plus the products of two
  activations, attention's QKᵀ and AV: output elements times the contracted
  size). BatchNorm, activations, pooling, the
  residual add and biases are not counted. One MAC = 2 FLOPs. A transposed conv
  (``nnx.ConvTranspose``: its input dilated by its stride) counts, along each axis
  it upsamples, the taps of each real input pixel instead of each output
  (``H_in * W_in * k_h * k_w * C_in * C_out`` when it upsamples both): the taps on
  the holes between input pixels multiply zeros nobody stores. Taps on zero padding
  count (the standard convention); ``count_padding=False`` counts, per spatial axis,
  only the (output, tap) pairs that land on a real input element, given the padding,
  window stride, kernel dilation and input dilation, which is how XLA's cost
  analysis counts a convolution.
* **Params** are trainable parameters: conv and linear kernels and biases and
  BatchNorm scale and bias. BatchNorm running statistics are not counted.
* **Prunable** MACs/params are those of layers that have at least one channel
  dimension in a prunable group. The paper's budget ``p`` is read over the
  prunable MACs (``budget.scope = "prunable"``); ``"total"`` reads it
  over the whole network.

Every count is a polynomial of the group widths read from the model's
:class:`~sap_jax.structure.groups.Structure`; the same code gives exact integers for a
width spec and a differentiable scalar for a (straight-through, possibly soft)
architecture vector.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sap_jax.structure import groups as G

SCOPES = ("prunable", "total")


@dataclasses.dataclass(frozen=True)
class Counts:
    """MACs (multiply-adds per image) and parameter counts of one model."""

    macs: Any
    params: Any
    prunable_macs: Any
    prunable_params: Any

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_dim = G.dim_value


def _valid_taps(out: int, kernel: int, stride: int, pad: int, n: int, dilation: int = 1,
                lhs_dilation: int = 1) -> int:
    """(output, tap) pairs along one axis whose tap lands on a real input element: tap ``j``
    of output ``o`` reads position ``o * stride - pad + j * dilation`` of the input dilated by
    ``lhs_dilation`` (``n`` elements, ``lhs_dilation - 1`` holes between neighbours)."""
    return sum(1 for o in range(out) for j in range(kernel)
               if (p := o * stride - pad + j * dilation) % lhs_dilation == 0
               and 0 <= p // lhs_dilation < n)


def layer_macs(layer: G.Layer, widths: Sequence[Any], *, count_padding: bool = True) -> Any:
    """MACs of one layer for one image, given the group widths (the convention: see the
    module docstring).

    ``count_padding=False`` leaves out taps that fall on zero padding (or between the
    pixels of a transposed conv's input), which is how XLA's cost analysis counts
    convolutions; the standard convention (and the default) counts every tap.
    """
    if isinstance(layer, (G.NormLayer, G.ScaleLayer)):
        return 0
    if isinstance(layer, G.ProductLayer):
        return layer.per_channel * _dim(layer.ch, widths)
    cin, cout = _dim(layer.in_ch, widths), _dim(layer.out_ch, widths)
    if isinstance(layer, G.DenseLayer):
        return layer.tokens * cin * cout
    if count_padding:  # per axis: each output's taps, or each real input pixel's
        axes = zip(layer.out_hw, layer.input_hw, layer.lhs_dilations)
        taps = math.prod(o if d == 1 else n for o, n, d in axes) * math.prod(layer.kernel)
    else:
        taps = math.prod(_valid_taps(*a) for a in zip(
            layer.out_hw, layer.kernel, layer.strides, (p for p, _ in layer.pads),
            layer.input_hw, layer.dilations, layer.lhs_dilations))
    # A depthwise conv has one input channel per output channel, a grouped one cin / groups.
    per_out = 1 if layer.depthwise else (cin if layer.groups == 1 else cin // layer.groups)
    return taps * per_out * cout


def layer_params(layer: G.Layer, widths: Sequence[Any]) -> Any:
    """Trainable parameters of one layer, given the group widths."""
    if isinstance(layer, G.NormLayer):
        return sum(n in ("scale", "bias") for n in layer.names) * _dim(layer.ch, widths)
    if isinstance(layer, G.ScaleLayer):
        return _dim(layer.ch, widths)
    if isinstance(layer, G.ProductLayer):
        return 0
    cin, cout = _dim(layer.in_ch, widths), _dim(layer.out_ch, widths)
    kh, kw = layer.kernel if isinstance(layer, G.ConvLayer) else (1, 1)
    depthwise = isinstance(layer, G.ConvLayer) and layer.depthwise
    groups = getattr(layer, "groups", 1)
    per_out = 1 if depthwise else (cin if groups == 1 else cin // groups)
    return kh * kw * per_out * cout + (cout if layer.bias else 0)


def count(structure: G.Structure, widths: Sequence[Any] | None = None, *,
          count_padding: bool = True) -> Counts:
    """MACs and params of ``structure`` with group widths ``widths`` (default: its own).

    ``widths`` may be Python ints (exact integer counts) or JAX scalars (a
    traced, differentiable count). ``count_padding``: see :func:`layer_macs`.
    """
    widths = structure.widths if widths is None else widths
    if len(widths) != structure.num_groups:
        raise ValueError(f"widths has {len(widths)} entries, the model has "
                         f"{structure.num_groups} channel groups.")
    macs = params = pmacs = pparams = 0
    for layer in structure.layers:
        m = layer_macs(layer, widths, count_padding=count_padding)
        p = layer_params(layer, widths)
        macs, params = macs + m, params + p
        if G.is_prunable(layer):
            pmacs, pparams = pmacs + m, pparams + p
    return Counts(macs, params, pmacs, pparams)


def kept_widths(arch: G.Arch) -> list[jax.Array]:
    """Kept width of each group, ``sum_i v_k,i``, differentiable in ``v``."""
    return [jnp.sum(jnp.asarray(v, jnp.float32)) for v in arch]


def macs_from_arch(structure: G.Structure, arch: G.Arch,
                   scope: str = "prunable") -> jax.Array:
    """MACs of the sub-network selected by ``arch`` (K vectors of shape (C_k,)).

    Differentiable with respect to ``arch`` (use a straight-through vector to
    train a generator against it). ``scope`` picks ``"prunable"`` or
    ``"total"`` MACs. Units: multiply-adds per image (float32 scalar).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
    G.check_arch(arch, structure.widths, structure.group_names)
    c = count(structure, kept_widths(arch))
    return jnp.asarray(c.prunable_macs if scope == "prunable" else c.macs, jnp.float32)


def mac_ratio(structure: G.Structure, arch: G.Arch, scope: str = "prunable") -> jax.Array:
    """``T(v) / T_full`` over ``scope``: the quantity the budget ``p`` constrains."""
    full = count(structure)
    denom = full.prunable_macs if scope == "prunable" else full.macs
    return macs_from_arch(structure, arch, scope) / float(denom)


def activations(structure: G.Structure, widths: Sequence[Any] | None = None) -> Any:
    """Number of conv output elements per image (the operands of BN/activations)."""
    widths = structure.widths if widths is None else widths
    return sum(layer.out_hw[0] * layer.out_hw[1] * _dim(layer.out_ch, widths)
               for layer in structure.layers if isinstance(layer, G.ConvLayer))


def xla_forward_flops(model: Any, image_size: int | tuple[int, int], batch: int = 1, *,
                      optimized: bool = True) -> float:
    """FLOPs XLA reports for the eval-mode forward pass of ``model``.

    ``optimized=True`` reads ``jit(...).lower(...).compile().cost_analysis()``;
    ``False`` reads the cost of the HLO before XLA's optimisation passes (no
    fusion, so no elementwise work counted twice). XLA counts 2 FLOPs per MAC,
    skips taps that fall on zero padding (compare with
    ``count(..., count_padding=False)``), and also counts BatchNorm,
    activations and pooling. See docs/design.md for measured agreement.
    """
    from flax import nnx

    hw = model.check_image_size(image_size)
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    x = jax.ShapeDtypeStruct((batch, *hw, model.in_channels), jnp.float32)
    abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    lowered = jax.jit(forward).lower(abstract_state, x)
    cost = lowered.compile().cost_analysis() if optimized else lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def model_macs(model: Any, image_size: int) -> int:
    """Multiply-accumulates of one ``image_size`` image through ``model`` (a PrunableModel)."""
    return count(model.structure(image_size)).macs
