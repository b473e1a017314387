"""Any NNX CNN, traced: groups equal the hand-written oracle's (tests/support/hand_written.py),
gating and surgery are exact.

The zoo (examples/zoo.py) is written like a user's code and imports nothing from sap_jax.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize, slow
from conftest import tiny_config as tiny
from flax import nnx
from support import hand_written

from examples import zoo
from sap_jax import info as info_cli
from sap_jax import models, surgery, tracing
from sap_jax.method import agn as A
from sap_jax.method import penalty, resource
from sap_jax.structure import flops, slicing
from sap_jax.structure import groups as G
from sap_jax.train import config as config_lib
from sap_jax.train.config import ConfigError

HW, CIN, WIDTH = 8, 3, 4  # digits scale; the pipeline feeds 3-channel images
ZOO = sorted(zoo.ZOO)
SMALL_PRESETS = ["resnet_cifar_tiny", "resnet_tiny", "resnet_bottleneck_tiny", "mobilenet_v2_tiny",
                 "mobilenet_v2_cifar_tiny"]
BIG_PRESETS = sorted(set(models.names()) - set(SMALL_PRESETS))


def _slices(s: G.Structure) -> list[set]:
    return [{dataclasses.astuple(sl) for sl in g.slices} for g in s.groups]


# ------------------------------------------- one mechanism, checked against hand-written oracles

def _check_traced_equals_described(name):
    preset = models.get_preset(name)
    model = models.create_abstract(name)
    ref = hand_written.describe(model, preset.image_size)
    s = model.structure(preset.image_size)
    assert s.widths == ref.widths
    assert _slices(s) == _slices(ref)  # every group: the same (path, axis, role) slices
    assert {x.path: x for x in s.layers} == {x.path: x for x in ref.layers}  # dims, kernels, hw
    assert flops.count(s) == flops.count(ref)


@pytest.mark.parametrize("name", SMALL_PRESETS + slow(BIG_PRESETS))
def test_traced_groups_equal_the_hand_written_description(name):
    _check_traced_equals_described(name)


@pytest.mark.parametrize("name", ["resnet_cifar_tiny", "resnet_bottleneck_tiny",
                                  "mobilenet_v2_tiny"])
def test_gate_and_its_gradient_equal_the_hand_written_gate(name):
    """A backbone's gated forward (the tracer's) against the hand-gated oracle, in train mode
    (batch statistics): logits, new BN statistics and d/dv all agree."""
    model = randomize(models.create(name), seed=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    arch = [jnp.asarray(rng.uniform(0, 1, w), jnp.float32) for w in model.widths]
    graphdef, state = nnx.split(model)

    def loss(arch, state, gated):
        m = nnx.merge(graphdef, state)
        m.train()
        y = m(x, arch) if gated else hand_written.gated_forward(m, x, arch)
        return jnp.sum(y * jnp.arange(y.shape[-1])), (y, nnx.state(m, nnx.BatchStat))

    # The state is differentiated too, so that its variables live at the gradient's level.
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, (y1, st1)), (g1, _) = grad(arch, state, False)
    (_, (y2, st2)), (g2, _) = grad(arch, state, True)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(st2), jax.tree.leaves(st1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


# ------------------------------------------------------------------ the zoo

@pytest.fixture(scope="module")
def zoo_models():
    """Each zoo model with random parameters and BN statistics, and its groups (coupled ones
    too, so residual streams are cut as well)."""
    out = {}
    for i, name in enumerate(ZOO):
        m = randomize(zoo.ZOO[name](10, CIN, image_size=HW, width=WIDTH), seed=i)
        m.eval()
        out[name] = (m, tracing.structure(m, (1, HW, HW, CIN), prune="all"))
    return out


def _masks(widths, seed):
    """A random mask, and one keeping a single (random) channel of every group."""
    rng = np.random.default_rng(seed)
    rand = [rng.random(w) < 0.5 for w in widths]
    one = [np.arange(w) == rng.integers(w) for w in widths]
    return [rand, one]


def _images(n=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, HW, HW, CIN)), jnp.float32)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_extracted_model_computes_the_gated_dense_one(zoo_models, name):
    model, s = zoo_models[name]
    assert s.num_groups > 0
    x = _images()
    for mask in _masks(s.widths, seed=len(name)):
        kept = [np.where(m.any(), m, np.arange(len(m)) == 0) for m in mask]  # min. width 1
        gated = tracing.gated_call(model, x, [k.astype(np.float32) for k in kept], s)
        small = surgery.extract(model, kept, s)
        small.eval()
        out = small(x)
        assert float(jnp.abs(out - gated).max()) <= 1e-5 * max(1.0, float(jnp.abs(gated).max()))
        # A genuinely smaller network of the same classes, with the kept widths.
        assert type(small) is type(model)
        assert tracing.structure(small, (1, HW, HW, CIN), prune="all").widths == tuple(
            int(k.sum()) for k in kept)


def _xla_conv_dot_flops(model, x) -> float:
    """XLA's own FLOP count of every convolution and matrix product in the forward pass,
    each lowered on its own from the jaxpr (independent of the tracer's analysis)."""
    graphdef, state = nnx.split(model)

    def fwd(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    total = 0.0

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
                f = jax.jit(lambda *a, e=eqn: e.primitive.bind(*a, **e.params))
                total += float(f.lower(*args).cost_analysis()["flops"])
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else [p]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fwd)(state, x).jaxpr)
    return total


@pytest.mark.parametrize("name", ZOO)
def test_zoo_macs_agree_with_xla(zoo_models, name):
    """Dense and extracted: 2 x the analytic MACs (taps on zero padding left out, as XLA
    counts) equal XLA's cost of the network's convolutions and matrix products, per image."""
    model, s = zoo_models[name]
    small = surgery.extract(model, _masks(s.widths, seed=3)[0], s)
    for m in (model, small):
        st = tracing.structure(m, (1, HW, HW, CIN), prune="all")
        analytic = flops.count(st, count_padding=False).macs
        assert _xla_conv_dot_flops(m, _images(1)) == pytest.approx(2 * analytic, rel=1e-9)
    # The prunable share moves with the widths: the smaller model has fewer MACs.
    small_s = tracing.structure(small, (1, HW, HW, CIN), prune="all")
    assert flops.count(small_s).macs < flops.count(s).macs


@pytest.mark.parametrize("name", ZOO)
def test_zoo_save_load_round_trips_bit_exactly(tmp_path, name):
    """Through the factory path: no registry edit, the factory's import path is enough."""
    model = models.create(f"examples.zoo:{name}", image_size=HW, num_classes=10,
                          factory_kwargs={"width": WIDTH}, prune="all")
    randomize(model, seed=5)
    arch = _masks(model.widths, seed=7)[0]
    small = surgery.extract(model, arch)
    assert list(small.widths) == [max(1, int(a.sum())) for a in arch]
    surgery.save(tmp_path / "p", small, dense_widths=model.widths, image_size=HW)
    info = json.loads((tmp_path / "p" / "model.json").read_text())
    assert info["config"]["factory"] == f"examples.zoo:{name}"
    back = surgery.load(tmp_path / "p")
    a, b = nnx.to_pure_dict(nnx.state(small)), nnx.to_pure_dict(nnx.state(back))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert [u.dtype for u in jax.tree.leaves(a)] == [v.dtype for v in jax.tree.leaves(b)]
    fa, fb = slicing.flat_arrays(small), slicing.flat_arrays(back)  # random keys as key data
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
    small.eval(), back.eval()
    x = _images()
    assert np.array_equal(np.asarray(small(x)), np.asarray(back(x)))
    assert info_cli.main(["--pruned", str(tmp_path / "p")]) == 0  # before/after table


@pytest.mark.parametrize("name", ["flatten_cnn", "densenet", "vgg11_bn"])
def test_proximal_step_zeroes_dropped_channels_wherever_they_sit(zoo_models, name):
    """Flattened heads and concatenations: a dropped channel is zeroed at every position it
    occupies (all its copies), and nothing else changes."""
    model, s = zoo_models[name]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = _masks(s.widths, seed=2)[0]
    tx = penalty.proximal_partial_group_lasso(s, 1e6)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = tx.update(zeros, tx.init(params), params, arch=[m.astype(np.float32) for m in mask])
    flat_old, flat_new = slicing.flat_arrays(model), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        flat_new[tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = (
            np.asarray(leaf))
    dropped_positions = {}
    for g, m in zip(s.groups, mask):
        for sl in g.slices:
            if sl.role in G.KERNEL_ROLES:
                pos = sl.positions(g.size)[:, ~m].ravel()
                dropped_positions.setdefault((sl.path, sl.axis), []).extend(pos.tolist())
    for path in {p for p, _ in dropped_positions}:
        w = np.asarray(flat_old[path])
        zeroed = np.zeros(w.shape, bool)
        for (q, axis), pos in dropped_positions.items():
            if q == path:
                sel = [slice(None)] * w.ndim
                sel[axis] = pos
                zeroed[tuple(sel)] = True
        delta = flat_new[path]  # the update: -w where a dropped channel sits, 0 elsewhere
        np.testing.assert_allclose(delta[zeroed], -w[zeroed], rtol=1e-6, atol=1e-7)
        assert not np.any(delta[~zeroed])


@pytest.mark.parametrize("name", ZOO)
def test_zoo_penalty_and_agn_step_compile_once(zoo_models, name):
    model, s = zoo_models[name]
    params = nnx.state(model, nnx.Param)
    pen = jax.jit(jax.value_and_grad(lambda p, a: penalty.partial_group_lasso(p, a, s)))
    apply_fn, state = models.gated_apply(model, s)
    gen = A.AGN(s.widths, seed=0)
    gdef, gstate = nnx.split(gen)
    batch = {"image": _images(4), "label": jnp.arange(4) % 10}
    budget = resource.ResourceLoss(0.5, lam=2.0)

    @jax.jit
    def agn_step(gstate, key):
        return A.agn_value_and_grad(nnx.merge(gdef, gstate), apply_fn, state, batch, key,
                                    structure=s, resource=budget)

    for seed, mask in enumerate(_masks(s.widths, seed=11)):
        value, grads = pen(params, [m.astype(np.float32) for m in mask])
        assert np.isfinite(value) and value > 0
        loss, metrics, agn_grads = agn_step(gstate, jax.random.key(seed))
        assert np.isfinite(loss)
        assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(agn_grads))
    assert pen._cache_size() == 1 and agn_step._cache_size() == 1


def test_one_extract_and_one_gated_apply_for_every_kind_of_model(zoo_models):
    """A PrunableModel knows its own structure; any other module needs it given, and
    both kinds give ``(logits, new_state)`` in train mode."""
    net, s = zoo_models["vgg11_bn"]
    ones = [np.ones(w, bool) for w in s.widths]
    for call in (lambda: surgery.extract(net, ones), lambda: models.gated_apply(net)):
        with pytest.raises(ValueError, match="structure=tracing.structure"):
            call()
    built_in = models.create("resnet_cifar_tiny")
    with pytest.raises(ValueError, match="describes another model"):
        surgery.extract(built_in, G.full_arch(built_in.widths), s)
    for model, structure, hw in ((net, s, HW), (built_in, None, 32)):
        x = jnp.ones((2, hw, hw, CIN), jnp.float32)
        widths = (structure or model).widths
        arch = [jnp.ones(w, jnp.float32) for w in widths]
        apply_fn, state = models.gated_apply(model, structure, train=True)
        y, new_state = jax.jit(apply_fn)(state, x, arch)  # jitted: ``state`` stays as it was
        assert y.shape == (2, 10) and jax.tree.structure(new_state) == jax.tree.structure(state)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state),
                                                             jax.tree.leaves(state)))


def test_default_groups_follow_the_paper_and_say_why_others_are_left(zoo_models):
    """Inner widths only; residual streams are coupled, grouped convs and channel-wise
    reductions (LayerNorm) fix theirs, and the reason is reported per layer."""
    _, status = tracing.trace(zoo_models["resnext"][0], (1, HW, HW, CIN))
    assert "grouped convolution" in status["blocks.0.conv1"]
    assert status["stem"].startswith("coupled")
    _, status = tracing.trace(zoo_models["convnext"][0], (1, HW, HW, CIN))
    assert "reduced over" in status["stem"] and status["blocks.0.fc1"] == "prunable"
    s_inner, status = tracing.trace(zoo_models["se_resnet"][0], (1, HW, HW, CIN))
    s_all = zoo_models["se_resnet"][1]
    assert s_all.num_groups > s_inner.num_groups and status["head"] == "the model output"
    ignored, status = tracing.trace(zoo_models["se_resnet"][0], (1, HW, HW, CIN),
                                  ignore=["layer1/conv1"])
    assert status["layer1.conv1"] == "ignored" and ignored.num_groups == s_inner.num_groups - 1
    with pytest.raises(tracing.TraceError, match="not a convolution or linear layer.*layer1.conv1"):
        tracing.trace(zoo_models["se_resnet"][0], (1, HW, HW, CIN), ignore=["layer1.nope"])


class _Spectral(nnx.Module):
    """A conv followed by an op the tracer does not know (an FFT over the channels)."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6, 10, rngs=rngs)

    def __call__(self, x):
        y = jnp.abs(jnp.fft.fft(self.conv(x), axis=-1))
        return self.head(y.mean(axis=(1, 2)))


def test_an_unknown_op_names_itself_and_the_layer_to_ignore():
    model = _Spectral(nnx.Rngs(0))
    with pytest.raises(tracing.TraceError) as e:
        tracing.structure(model, (1, HW, HW, CIN))
    msg = str(e.value)
    assert "'fft'" in msg and "conv" in msg and "ignore=['conv']" in msg and "model_ignore" in msg
    s, status = tracing.trace(model, (1, HW, HW, CIN), ignore=["conv"])  # as the message says
    assert s.num_groups == 0 and status["conv"] == "ignored"


def test_a_bad_factory_or_an_untraceable_model_is_a_config_error():
    c = tiny(model="examples.zoo:nope")
    with pytest.raises(ConfigError, match="examples.zoo has no attribute 'nope'"):
        config_lib.validate(c, device_count=1, process_count=1)
    c = tiny(model="examples.zoo:vgg11_bn", model_kwargs="{width: 4}", model_prune="some")
    with pytest.raises(ConfigError, match="model_kwargs.*not valid JSON(.|\n)*model_prune"):
        config_lib.validate(c, device_count=1, process_count=1)
    c = tiny(model="test_trace:_Spectral", model_kwargs="{}")
    with pytest.raises(ConfigError, match="'fft'"):
        config_lib.validate(c, device_count=1, process_count=1)


# ------------------------------------------------------ models that are easy to get wrong

class _Shared(nnx.Module):
    """One conv applied to two branches (weight sharing): its channels are one group."""

    def __init__(self, rngs):
        self.a, self.b = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.Conv(3, 8, (1, 1), rngs=rngs)
        self.sh, self.head = nnx.Conv(8, 6, (3, 3), rngs=rngs), nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        u, v = self.sh(jax.nn.relu(self.a(x))), self.sh(jax.nn.relu(self.b(x)))
        return self.head(jnp.concatenate([jax.nn.relu(u), jax.nn.relu(v)], -1).mean((1, 2)))


class _Standardised(nnx.Module):
    """Weight standardisation: c2's kernel is normalised over its input channels, so c1's
    channels cannot be cut from it one by one."""

    def __init__(self, rngs):
        self.c1, self.c2 = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        k = self.c2.kernel[...]
        k = (k - k.mean((0, 1, 2))) / (k.std((0, 1, 2)) + 1e-5)
        y = jax.lax.conv_general_dilated(jax.nn.relu(self.c1(x)), k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return self.head(jax.nn.relu(y).mean((1, 2)))


class _Odd(nnx.Module):
    """A depth-multiplier conv (fixed), a LayerNorm without scale over another axis, a
    channel shuffle, and a token MLP on (B, H*W, C)."""

    def __init__(self, rngs):
        self.c0, self.c1 = nnx.Conv(3, 4, (1, 1), rngs=rngs), nnx.Conv(3, 8, (1, 1), rngs=rngs)
        self.dw = nnx.Conv(4, 8, (3, 3), feature_group_count=4, rngs=rngs)
        self.norm = nnx.LayerNorm(8, use_scale=False, use_bias=False, rngs=rngs)
        self.c2 = nnx.Conv(16, 8, (1, 1), rngs=rngs)
        self.fc, self.head = nnx.Linear(8, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        a, b = jax.nn.relu(self.c1(x)), jax.nn.relu(self.dw(jax.nn.relu(self.c0(x))))
        y = jnp.concatenate([a, b], -1)
        # channel shuffle: the tracer cannot follow it, c2 reads fixed channels
        n, h, w, c = y.shape
        y = y.reshape(n, h, w, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(n, h, w, c)
        y = jax.nn.relu(self.c2(y))
        y = y.reshape(n, h * w, y.shape[-1])
        return self.head(jax.nn.relu(self.fc(y)).mean(1))


@pytest.mark.parametrize("cls", [_Shared, _Standardised, _Odd])
def test_models_that_are_easy_to_get_wrong(cls):
    model = randomize(cls(nnx.Rngs(0)), seed=2)
    model.eval()
    s, status = tracing.trace(model, (1, HW, HW, CIN), prune="all")
    x = _images()
    for mask in _masks(s.widths, seed=4):
        gated = tracing.gated_call(model, x, [m.astype(np.float32) for m in mask], s)
        small = surgery.extract(model, mask, s)
        small.eval()
        assert (float(jnp.abs(small(x) - gated).max())
                <= 1e-5 * max(1.0, float(jnp.abs(gated).max())))
        assert tracing.structure(small, (1, HW, HW, CIN), prune="all").widths == tuple(
            int(m.sum()) for m in mask)  # width 1 too: the same groups after the cut
    if cls is _Shared:
        assert s.group_names == ("a", "sh")  # a and b write what sh reads: one group
    if cls is _Standardised:
        assert "normalised across channels" in status["c1"] and s.group_names == ("c2",)
    if cls is _Odd:
        assert "grouped convolution" in status["c0"] and "spread over several axes" in status["c1"]
        assert s.group_names == ("c2", "fc")
        # Every layer is still counted, also after the shuffle the tracer cannot follow.
        assert {x.path for x in s.layers} >= {
            ("c0",), ("c1",), ("dw",), ("c2",), ("fc",), ("head",)}


def test_unet_upsampling_leaves_the_decoder_prunable(zoo_models):
    """The nearest resize is a gather over spatial axes only: the conv it upsamples (side) and
    the one after it (dec2) stay prunable. The ConvTranspose is a layer like any other: cut,
    it is a smaller ConvTranspose, counted with its input dilation."""
    model, s = zoo_models["unet"]
    _, status = tracing.trace(model, (1, HW, HW, CIN))
    assert status["side"] == status["dec2"] == status["up"] == "prunable"
    (up,) = [x for x in s.layers if x.path == ("up",)]
    assert up.lhs_dilation == 2 and up.input_hw == (HW // 2, HW // 2) and up.out_hw == (HW, HW)
    keep = _masks(s.widths, seed=1)[0]
    keep = [np.where(k.any(), k, np.arange(len(k)) == 0) for k in keep]
    small = surgery.extract(model, keep, s)
    names = list(s.group_names)
    assert isinstance(small.up, nnx.ConvTranspose) and (
        small.up.in_features, small.up.out_features) == (
        keep[names.index("mid")].sum(), keep[names.index("up")].sum())


class _Indexed(nnx.Module):
    """A conv, an op that indexes its output, and a conv reading the result."""

    def __init__(self, index, rngs):
        self.a, self.b = nnx.Conv(3, 6, (3, 3), rngs=rngs), nnx.Conv(6, 5, (3, 3), rngs=rngs)
        self.head, self.index = nnx.Linear(5, 4, rngs=rngs), index

    def __call__(self, x):
        y = self.index(jax.nn.relu(self.a(x)))
        return self.head(jax.nn.relu(self.b(y)).mean((1, 2)))


_INDEXED = {  # the op, and whether it leaves a's channels prunable
    "nearest_resize": (lambda y: jax.image.resize(y, (y.shape[0], 12, 16, y.shape[3]),
                                                  "nearest"), True),
    "row_gather": (lambda y: y[:, jnp.array([0, 2, 5, 7])], True),
    "dynamic_slice": (lambda y: jax.lax.dynamic_slice(
        y, (0, 1, 2, 0), (y.shape[0], 4, 4, y.shape[3])), True),
    "channel_gather": (lambda y: y[..., jnp.array([0, 2, 4, 1, 3, 5])], False),
    # A product with a computed interpolation matrix over H and W.
    "bilinear_resize": (lambda y: jax.image.resize(y, (y.shape[0], 12, 16, y.shape[3]),
                                                   "bilinear"), True),
    "channel_mixing_matrix": (lambda y: y @ jnp.eye(y.shape[-1])[::-1], False),
}


@pytest.mark.parametrize("name", sorted(_INDEXED))
def test_a_gather_over_spatial_axes_passes_the_channels(name):
    """A gather or dynamic slice that takes the channel axis whole keeps the channels
    prunable (and the cut model exact); one that picks channels fixes them."""
    index, passes = _INDEXED[name]
    model = randomize(_Indexed(index, nnx.Rngs(0)), seed=3)
    s, status = tracing.trace(model, (1, HW, HW, CIN))
    assert (status["a"] == "prunable") == passes and status["b"] == "prunable"
    if not passes:
        assert status["a"] in ("gathered", "multiplied with a computed matrix")
    x = _images()
    keep = [np.arange(w) % 2 == 0 for w in s.widths]
    gated = tracing.gated_call(model, x, [k.astype(np.float32) for k in keep], s)
    small = surgery.extract(model, keep, s)
    np.testing.assert_allclose(small(x), gated, rtol=1e-5, atol=1e-5)
    # The dense structure's count at the kept widths is the cut model's own (a bilinear
    # resize's product follows the channels that pass through it).
    widths = [int(k.sum()) for k in keep]
    assert flops.count(s, widths).macs == flops.count(
        tracing.structure(small, (1, HW, HW, CIN))).macs


# ------------------------------------------------------------------ the whole pipeline

@pytest.mark.slow
def test_quickstart_prunes_a_zoo_model_end_to_end(tmp_path):
    """The quickstart with --config.model=<factory>, shortened: MACs, widths, the pruned
    model's measured speed and an accuracy far above chance (10 %)."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "sap_jax.main", "--config=configs/quickstart.py",
           f"--workdir={wd}", "--config.model=examples.zoo:densenet",
           '--config.model_kwargs={"width": 8}', "--config.num_epochs=8", "--config.sap.e_start=2",
           "--config.optim.boundaries=(6,)", "--config.finetune.num_epochs=2",
           "--config.finetune.boundaries=(1,)", "--config.speed.reps=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["final_acc"] > 0.5
    assert res["macs_after"] < res["macs_before"] and 0 < res["prunable_macs_ratio"] < 1
    assert len(res["widths"]) == len(res["dense_widths"]) > 0
    assert res["speed"]["batches"] and res["speed"]["macs_pruned"] == res["macs_after"]
    info = json.loads((wd / "pruned_model" / "model.json").read_text())
    assert info["class"] == "TracedModel" and info["config"]["factory"] == "examples.zoo:densenet"
