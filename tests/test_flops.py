"""MAC and parameter accounting: standard figures, differentiability, XLA agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FULL, TINY, slow
from flax import nnx

from sap_jax import models, tracing
from sap_jax.structure import flops
from sap_jax.structure import groups as G

# Standard figures (multiply-adds of convs + linear layers; params incl. BN affine).
TABLE = {
    "resnet56": (125.49e6, 0.85e6),
    "resnet110": (252.89e6, 1.72e6),
    "resnet34": (3.66e9, 21.8e6),
    "resnet50": (4.09e9, 25.56e6),
    "resnet101": (7.80e9, 44.5e6),
    "mobilenet_v2": (300.8e6, 3.50e6),
    "resnet18": (1.82e9, 11.69e6),
}


def _counts(name, widths=None):
    m = (models.create_abstract(name) if widths is None
         else models.create_abstract(name, widths=widths))
    return m, m.structure(models.get_preset(name).image_size)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_dense_models_match_the_standard_figures(name):
    _, s = _counts(name)
    c = flops.count(s)
    macs, params = TABLE[name]
    assert abs(c.macs / macs - 1) < 0.01, c.macs
    assert abs(c.params / params - 1) < 0.01, c.params
    assert 0 < c.prunable_macs < c.macs and 0 < c.prunable_params < c.params


def test_resnet56_by_hand():
    # stem 32*32*9*3*16; stage 1: 18 convs 32*32*9*16*16; stages 2/3: one strided conv
    # 16*16*9*16*32 (8*8*9*32*64) + 17 convs 16*16*9*32*32 (8*8*9*64*64); fc 64*10.
    stem, fc = 32 * 32 * 9 * 3 * 16, 64 * 10
    s1 = 18 * 32 * 32 * 9 * 16 * 16
    s2 = 16 * 16 * 9 * 16 * 32 + 17 * 16 * 16 * 9 * 32 * 32
    s3 = 8 * 8 * 9 * 32 * 64 + 17 * 8 * 8 * 9 * 64 * 64
    c = flops.count(_counts("resnet56")[1])
    assert c.macs == stem + s1 + s2 + s3 + fc == 125_485_696
    assert c.prunable_macs == s1 + s2 + s3  # every block conv touches an inner width


def test_counts_follow_the_widths():
    _, s = _counts("resnet56")
    full = flops.count(s)
    half = flops.count(s, [w // 2 for w in s.widths])
    # Each block's two convs scale linearly in its inner width: halving all halves them.
    assert half.prunable_macs == full.prunable_macs // 2
    assert half.macs == full.macs - full.prunable_macs // 2


@pytest.mark.parametrize("name",
                         ["resnet_cifar_tiny", "resnet_bottleneck_tiny", "mobilenet_v2_tiny"])
def test_mac_count_is_differentiable_in_the_architecture_vector(name, rng):
    _, s = _counts(name)
    arch = [jnp.asarray(rng.random(w) < 0.6, jnp.float32) for w in s.widths]
    widths = [int(v.sum()) for v in arch]
    value, grads = jax.value_and_grad(lambda a: flops.macs_from_arch(s, a, "total"))(arch)
    assert value == flops.count(s, widths).macs
    for k in range(s.num_groups):
        # The count is linear in each single width, so a unit step is the exact partial.
        bumped = list(widths)
        bumped[k] += 1
        expected = flops.count(s, bumped).macs - flops.count(s, widths).macs
        np.testing.assert_allclose(np.asarray(grads[k]), expected, rtol=1e-6)
    ratio = flops.mac_ratio(s, [jnp.ones(w) for w in s.widths])
    assert float(ratio) == pytest.approx(1.0)


def test_scope_and_shape_errors():
    _, s = _counts("resnet_cifar_tiny")
    with pytest.raises(ValueError, match="scope must be one of"):
        flops.macs_from_arch(s, [jnp.ones(w) for w in s.widths], "flops")
    with pytest.raises(ValueError, match="group 0 has 4 channels"):
        flops.macs_from_arch(s, [jnp.ones(5)] + [jnp.ones(w) for w in s.widths[1:]])


@pytest.mark.parametrize("name", TINY + slow(FULL))
def test_analytic_count_agrees_with_xla(name):
    """XLA counts 2 FLOPs per MAC but skips taps on zero padding, and adds BN/activations.

    Tight check (HLO before optimisation): XLA - 2 * (MACs without padding taps)
    must be a few FLOPs per conv output element (BN + activation + add), which
    a missing or mis-sized conv would break by at least 2*C_in per element.
    Loose check (compiled HLO, as XLA reports it after fusion): within
    [-10%, +25%] of 2 * standard MACs.
    """
    size = models.get_preset(name).image_size
    dense = models.create_abstract(name)  # shapes are all XLA needs
    rng = np.random.default_rng(0)
    pruned = models.create_abstract(name,
                                    widths=[int(rng.integers(1, w + 1)) for w in dense.widths])
    for model in (dense, pruned):
        s = model.structure(size)
        valid = flops.count(s, count_padding=False).macs
        standard = flops.count(s).macs
        raw = flops.xla_forward_flops(model, size, optimized=False)
        per_act = (raw - 2 * valid) / flops.activations(s)
        assert 3.0 <= per_act <= 6.0, per_act
        compiled = flops.xla_forward_flops(model, size)
        assert 0.9 <= compiled / (2 * standard) <= 1.25, compiled / (2 * standard)


# ------------------------------------------- transposed, dilated and non-square strided convs

_H, _W, _CIN, _COUT = 7, 6, 3, 5  # odd and unequal sides: asymmetric "SAME" pads
_ONE_CONV = {
    "conv_transpose": lambda r: nnx.ConvTranspose(_CIN, _COUT, (3, 3), strides=(2, 2), rngs=r),
    "conv_transpose_valid_2x1": lambda r: nnx.ConvTranspose(
        _CIN, _COUT, (3, 2), strides=(2, 1), padding="VALID", rngs=r),
    "dilated": lambda r: nnx.Conv(_CIN, _COUT, (3, 3), kernel_dilation=2, rngs=r),
    "dilated_2x3_valid": lambda r: nnx.Conv(_CIN, _COUT, (2, 2), kernel_dilation=(2, 3),
                                            padding="VALID", rngs=r),
    "stride_2x1": lambda r: nnx.Conv(_CIN, _COUT, (3, 3), strides=(2, 1), rngs=r),
}


class _OneConv(nnx.Module):
    def __init__(self, conv):
        self.conv = conv

    def __call__(self, x):
        return self.conv(x)


def _conv_eqn(model):
    """The model's one ``conv_general_dilated``, as JAX lowers the layer."""
    x = jax.ShapeDtypeStruct((1, _H, _W, _CIN), jnp.float32)
    eqns = [e for e in jax.make_jaxpr(model)(x).eqns if e.primitive.name == "conv_general_dilated"]
    assert len(eqns) == 1
    return eqns[0]


def _brute_force_taps(eqn) -> int:
    """(output pixel, kernel tap) pairs that read a real input pixel, counted on a 2-D map of
    the dilated, padded input (1 = a real pixel, 0 = a hole or padding)."""
    p = eqn.params
    (_, h, w, _), (kh, kw, _, _) = (v.aval.shape for v in eqn.invars)  # NHWC, HWIO (flax)
    (dh, dw), (rh, rw), (sh, sw) = p["lhs_dilation"], p["rhs_dilation"], p["window_strides"]
    (pt, pb), (pl, pr) = p["padding"]
    assert min(pt, pb, pl, pr) >= 0
    real = np.zeros(((h - 1) * dh + 1 + pt + pb, (w - 1) * dw + 1 + pl + pr), int)
    real[pt:pt + (h - 1) * dh + 1:dh, pl:pl + (w - 1) * dw + 1:dw] = 1
    _, oh, ow, _ = eqn.outvars[0].aval.shape
    return sum(int(real[i * sh + a * rh, j * sw + b * rw]) for i in range(oh)
               for j in range(ow) for a in range(kh) for b in range(kw))


@pytest.mark.parametrize("name", sorted(_ONE_CONV))
def test_transposed_dilated_and_strided_convs_by_hand_and_by_xla(name):
    """Along an axis a transposed conv upsamples it counts each real input pixel's taps (the
    taps on the holes between them are no MACs), elsewhere each output's; without padding
    taps the count equals a brute-force count and XLA's own cost of the op."""
    model = _OneConv(_ONE_CONV[name](nnx.Rngs(0)))
    s = tracing.structure(model, (1, _H, _W, _CIN))
    (conv,) = [x for x in s.layers if isinstance(x, G.ConvLayer)]
    eqn = _conv_eqn(model)
    _, oh, ow, _ = eqn.outvars[0].aval.shape
    up = np.broadcast_to(model.conv.strides or 1, 2) > 1 if isinstance(
        model.conv, nnx.ConvTranspose) else (False, False)
    (kh, kw) = model.conv.kernel_size
    hand = (_H if up[0] else oh) * (_W if up[1] else ow) * kh * kw * _CIN * _COUT
    assert flops.layer_macs(conv, s.widths) == hand
    valid = _brute_force_taps(eqn) * _CIN * _COUT
    assert 0 < valid <= hand and (valid < hand) == (name != "dilated_2x3_valid")  # padding
    assert flops.layer_macs(conv, s.widths, count_padding=False) == valid
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    xla = jax.jit(lambda *a: eqn.primitive.bind(*a, **eqn.params)).lower(*args).cost_analysis()
    assert xla["flops"] == 2 * valid
