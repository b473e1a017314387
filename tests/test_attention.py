"""Attention heads as prunable units: ``nnx.MultiHeadAttention`` (examples/zoo.py's ViT) and
Linen's ``nn.MultiHeadDotProductAttention`` through ``nnx.bridge`` are traced into one group
per attention layer whose unit is a head (q, k and v per-head slices and the out projection's
matching inputs); the cut model has fewer heads and computes the gated dense one; the penalty
sees a head as one group of weights; the MACs of the cut model equal XLA's count."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx
from flax.nnx import bridge

from examples import zoo
from sap_jax import surgery, tracing
from sap_jax.method import penalty
from sap_jax.structure import flops, linen, slicing
from sap_jax.structure import groups as G

HW, HEADS, WIDTH = 8, 4, 4  # d = 2 * WIDTH = 8: four heads of 2
HEAD_DIM = 2 * WIDTH // HEADS


@pytest.fixture(scope="module")
def vit():
    m = randomize(zoo.ViT(10, 3, HW, WIDTH, nnx.Rngs(0), heads=HEADS), seed=4)
    m.eval()
    s, status = tracing.trace(m, (1, HW, HW, 3))
    return m, s, status


def _x(n=3):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, HW, HW, 3)), jnp.float32)


def test_heads_of_an_attention_layer_are_one_group(vit):
    _, s, status = vit
    names = list(s.group_names)
    assert names == ["blocks.0.attn.query", "blocks.0.fc1", "blocks.1.attn.query",
                     "blocks.1.fc1"]
    assert s.widths == (HEADS, 4 * WIDTH, HEADS, 4 * WIDTH)  # heads; the MLP's hidden width
    attn = ("blocks", "0", "attn")
    want = {G.Slice(attn + (p, "kernel"), -2, "out") for p in ("query", "key", "value")}
    want |= {G.Slice(attn + (p, "bias"), -2, "bias") for p in ("query", "key", "value")}
    want.add(G.Slice(attn + ("out", "kernel"), -3, "in"))
    assert set(s.groups[0].slices) == want
    # The residual width stays whole: LayerNorms reduce over it and a cls token is joined to it.
    assert status["patch"] != "prunable" and status["blocks.0.attn.query"] == "prunable"
    # A head's q/k/v outputs count head_dim channels each; QKᵀ and AV follow the head count.
    layers = {x.path: x for x in s.layers}
    assert layers[attn + ("query",)].out_ch == G.DimSum(((G.GroupRef(0), HEAD_DIM),))
    assert layers[attn + ("out",)].in_ch == G.DimSum(((G.GroupRef(0), HEAD_DIM),))
    products = [x for x in s.layers if isinstance(x, G.ProductLayer) and x.path[:3] == attn]
    tokens = (HW // 2) ** 2 + 1
    assert [(x.ch, x.per_channel) for x in products] == [
        (G.GroupRef(0), tokens * tokens * HEAD_DIM)] * 2


@pytest.mark.parametrize("keep_heads", [[0, 2], [3], [0, 1, 2, 3]])
def test_cut_attention_has_fewer_heads_and_computes_the_gated_model(vit, keep_heads):
    m, s, _ = vit
    heads = np.isin(np.arange(HEADS), keep_heads)
    keep = [heads, np.arange(4 * WIDTH) % 3 != 0, ~heads | (np.arange(HEADS) == 1),
            np.arange(4 * WIDTH) < 5]
    x = _x()
    gated = tracing.gated_call(m, x, [k.astype(np.float32) for k in keep], s)
    small = surgery.extract(m, keep, s)
    small.eval()
    np.testing.assert_allclose(small(x), gated, rtol=1e-5, atol=1e-6)
    for block, k in zip(small.blocks, (keep[0], keep[2])):
        a = block.attn
        assert a.num_heads == a.num_kv_heads == int(k.sum()) and a.head_dim == HEAD_DIM
        assert a.qkv_features == int(k.sum()) * HEAD_DIM
        assert a.query.out_features == (int(k.sum()), HEAD_DIM)
        assert a.out.in_features == (int(k.sum()), HEAD_DIM)
        assert a.query.kernel.shape == (2 * WIDTH, int(k.sum()), HEAD_DIM)
    cut = tracing.structure(small, (1, HW, HW, 3))
    assert cut.widths == tuple(int(k.sum()) for k in keep)
    # The count at the kept widths is the cut model's own, and equals XLA's.
    widths = [int(k.sum()) for k in keep]
    assert flops.count(s, widths).macs == flops.count(cut).macs
    from test_trace import _xla_conv_dot_flops
    assert _xla_conv_dot_flops(small, _x(1)) == pytest.approx(
        2 * flops.count(cut, count_padding=False).macs, rel=1e-9)


def test_penalty_takes_a_head_as_one_group_of_weights(vit):
    """Against NumPy: a dropped head's term is the sum over q, k, v (kernel and bias) and the
    out projection of the L2 norm of that head's slice; the proximal step zeroes exactly those
    slices."""
    m, s, _ = vit
    params = nnx.state(m, nnx.Param)
    flat = {k: np.asarray(v, np.float64) for k, v in slicing.flat_arrays(m).items()}
    arch = [np.ones(w, np.float32) for w in s.widths]
    arch[0] = np.array([1, 0, 1, 0], np.float32)
    attn = ("blocks", "0", "attn")
    want = 0.0
    for i in (1, 3):
        for p in ("query", "key", "value"):
            want += np.linalg.norm(flat[attn + (p, "kernel")][:, i, :])
            want += np.linalg.norm(flat[attn + (p, "bias")][i, :])
        want += np.linalg.norm(flat[attn + ("out", "kernel")][i, :, :])
    got = float(penalty.partial_group_lasso(params, arch, s))  # one group drops: weight 1
    assert got == pytest.approx(want, rel=1e-5)
    tx = penalty.proximal_partial_group_lasso(s, 1e6)
    pure = nnx.to_pure_dict(params)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, pure), tx.init(pure), pure, arch=arch)
    new = jax.tree.map(lambda w, u: np.asarray(w + u), pure, upd)
    q = new["blocks"][0]["attn"]["query"]["kernel"]
    o = new["blocks"][0]["attn"]["out"]["kernel"]
    assert not q[:, [1, 3]].any() and not o[[1, 3]].any()
    np.testing.assert_array_equal(q[:, [0, 2]], flat[attn + ("query", "kernel")][:, [0, 2]]
                                  .astype(np.float32))


def test_grouped_query_attention_keeps_its_heads_whole():
    """With fewer key/value heads than query heads, a query head is not a unit the key heads
    share: the heads stay whole (said in the status), and the rest of the model still cuts
    exactly."""
    class GQA(nnx.Module):
        def __init__(self, rngs):
            self.patch = nnx.Conv(3, 16, (2, 2), strides=2, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(4, 16, num_kv_heads=2, decode=False, rngs=rngs)
            self.fc = nnx.Linear(16, 8, rngs=rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            x = self.patch(x)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            return self.head(nnx.relu(self.fc(self.attn(x, x))).mean(1))

    m = randomize(GQA(nnx.Rngs(0)), seed=1)
    m.eval()
    s, status = tracing.trace(m, (1, HW, HW, 3))
    assert s.group_names == ("patch", "attn.out", "fc") and status["attn.query"] != "prunable"
    keep = [np.arange(16) % 2 == 0, np.arange(16) % 3 == 0, np.arange(8) < 3]
    gated = tracing.gated_call(m, _x(), [k.astype(np.float32) for k in keep], s)
    small = surgery.extract(m, keep, s)
    small.eval()
    np.testing.assert_allclose(small(_x()), gated, rtol=1e-5, atol=1e-6)
    assert small.attn.num_heads == 4 and small.attn.in_features == 8


class _LinenViT(nn.Module):
    """A pre-norm transformer block in Linen, patches in, mean-pooled logits out."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (2, 2), strides=2)(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h)
        x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
        return nn.Dense(10)(x.mean(1))


def test_linen_attention_through_the_bridge_loses_whole_heads(tmp_path):
    m = bridge.ToNNX(_LinenViT(), rngs=nnx.Rngs(0))
    bridge.lazy_init(m, jnp.ones((1, HW, HW, 3)))
    m = randomize(m, seed=2)
    m.eval()
    s, status = tracing.trace(m, (1, HW, HW, 3))
    assert s.group_names == ("MultiHeadDotProductAttention_0.query", "Dense_1")
    assert s.widths == (HEADS, 16)
    keep = [np.array([False, True, True, False]), np.arange(16) % 4 != 0]
    x = _x()
    gated = tracing.gated_call(m, x, [k.astype(np.float32) for k in keep], s)
    small = surgery.extract(m, keep, s)
    small.eval()
    with linen.stored_widths():  # the Linen attention's projections follow their kernels
        out = small(x)
        cut = tracing.structure(small, (1, HW, HW, 3))
    np.testing.assert_allclose(out, gated, rtol=1e-5, atol=1e-6)
    assert cut.widths == (2, 12)
    kernel = slicing.flat_arrays(small)[("MultiHeadDotProductAttention_0", "query", "kernel")]
    assert kernel.shape == (8, 2, 2)
    assert json.dumps(status)  # every layer has a readable status


@pytest.mark.slow
def test_cli_prunes_a_vit_and_its_saved_model_has_the_kept_heads(tmp_path):
    """The whole run on examples/zoo.py's ViT (cls token, position embedding, stored-key
    Dropout, four-head attention): the pruned model saved by the run loads with as many heads
    as its head groups keep, and exports."""
    from test_user_models import _main, export_stablehlo

    wd = tmp_path / "w"
    p = _main(f"--workdir={wd}", "--config.model=examples.zoo:vit",
              '--config.model_kwargs={"heads": 4}')
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((wd / "results.json").read_text())
    small = surgery.load(wd / "pruned_model")
    names = list(small.group_names)
    for i, block in enumerate(small.net.blocks):
        k = names.index(f"blocks.{i}.attn.query")
        assert r["dense_widths"][k] == 4 and block.attn.num_heads == r["widths"][k] >= 1
    assert r["widths"] != r["dense_widths"]
    e = export_stablehlo(wd, tmp_path / "e")
    assert e.returncode == 0, e.stderr[-2000:]
