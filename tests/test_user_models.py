"""Models as users write them (tests/support/user_models.py): stored random keys and a cls
token go through training, the cut, save/load and export; a model the cut cannot handle stops
in the pre-flight check, before any training, with one line naming what to change."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sap_jax import models, surgery
from sap_jax.runtime import parallel
from sap_jax.structure import slicing
from sap_jax.structure.codec import ModuleCodec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_NET = "tests.support.user_models:token_net"


def _token_net():
    return models.create(TOKEN_NET, image_size=16, num_classes=10, prune="all")


def _key_leaves(model):
    return [v for v in jax.tree.leaves(nnx.state(model))
            if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)]


def test_stored_random_keys_travel_as_key_data_and_come_back_as_keys():
    model = _token_net()
    (key,) = _key_leaves(model)
    codec = ModuleCodec(model)
    params, rest = codec.split(model)
    # The run's trees hold the key's raw data: NumPy, the mesh and orbax take it.
    data = [v for v in jax.tree.leaves(rest) if v.dtype == jnp.uint32 and v.shape == (2,)]
    assert len(data) == 1 and np.array_equal(data[0], jax.random.key_data(key))
    placed = parallel.replicate((params, rest), parallel.make_mesh())
    back = codec.merge(*placed)
    (again,) = _key_leaves(back)
    assert again.dtype == key.dtype
    assert np.array_equal(jax.random.key_data(again), jax.random.key_data(key))
    # Dropout in train mode draws from the restored key exactly as from the original.
    x = jnp.ones((2, 16, 16, 3))
    model.train(), back.train()
    assert np.array_equal(np.asarray(model(x)), np.asarray(back(x)))


def test_a_pruned_model_with_a_stored_key_saves_loads_and_keeps_its_key(tmp_path):
    model = _token_net()
    small = surgery.extract(model, [np.arange(w) % 2 == 0 for w in model.widths])
    assert small.widths == tuple(max(1, (w + 1) // 2) for w in model.widths)
    surgery.save(tmp_path / "m", small)
    back = surgery.load(tmp_path / "m")
    (k1,), (k2,) = _key_leaves(small), _key_leaves(back)
    assert k1.dtype == k2.dtype
    assert np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    flat = slicing.flat_arrays(back)
    assert all(not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) for v in flat.values())


def _main(*args):
    """``python -m sap_jax.main`` on the tiny config (test_train's runner)."""
    from test_train import TINY_CONFIG
    from test_train import _main as main

    return main(TINY_CONFIG, *args)


def export_stablehlo(workdir, out):
    """``python -m sap_jax.export --format=stablehlo`` of a run's pruned model."""
    return subprocess.run([sys.executable, "-m", "sap_jax.export", f"--pruned={workdir}",
                           "--format=stablehlo", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_cli_trains_cuts_and_exports_a_model_with_a_key_and_a_cls_token(tmp_path):
    wd = tmp_path / "w"
    p = _main(f"--workdir={wd}", f"--config.model={TOKEN_NET}", "--config.model_prune=all")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pre-flight: trial cut" in p.stderr
    r = json.loads((wd / "results.json").read_text())
    assert r["widths"] != r["dense_widths"]
    small = surgery.load(wd / "pruned_model")
    assert list(small.widths) == r["widths"] and len(_key_leaves(small)) == 1
    e = export_stablehlo(wd, tmp_path / "e")
    assert e.returncode == 0, e.stderr[-2000:]
    assert (tmp_path / "e" / "model.stablehlo").stat().st_size > 0


@pytest.mark.slow
def test_a_model_the_cut_breaks_stops_before_training_naming_the_group(tmp_path):
    wd = tmp_path / "w"
    p = _main(f"--workdir={wd}", "--config.model=tests.support.user_models:stubborn")
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    line = errors[0]
    assert line.startswith("error: pre-flight (trial cut) failed in net.head (Linear)"), line
    assert "model_ignore=['conv']" in line and "Traceback" not in p.stderr
    # No training time was spent: no checkpoint, no results, no trial model left behind.
    assert not (wd / "results.json").exists() and not (wd / "preflight_model").exists()
    assert not list(wd.glob("checkpoints/*"))
    # With the group left whole, the same model passes the check and trains.
    ok = _main(f"--workdir={tmp_path / 'w2'}", "--config.model=tests.support.user_models:stubborn",
               "--config.model_ignore=('conv',)", "--config.num_epochs=2",
               "--config.finetune.num_epochs=1")
    assert ok.returncode == 0, ok.stderr[-3000:]


@pytest.mark.slow
def test_a_training_step_xla_cannot_compile_stops_before_training_naming_its_source(tmp_path):
    """A kernel the backend lacks, used in training only: the trial cut, the reload and the
    lowering all pass; the XLA compile of the first step is what finds it."""
    wd, model = tmp_path / "w", "--config.model=tests.support.user_models:fused_kernel"
    p = _main(f"--workdir={wd}", model)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    line = errors[0]
    assert line.startswith("error: pre-flight (compiling the dense model's training step on the "
                           "mesh) failed in net (FusedKernelNet) at user_models.py:"), line
    assert "sap_test_fused_kernel" in line and "needs a kernel registered" in line, line
    assert "Traceback" not in p.stderr and not list(wd.glob("checkpoints/*"))
    # Without the check the same model fails in the first training step, with a traceback.
    late = _main(f"--workdir={tmp_path / 'w2'}", model, "--config.preflight=False")
    assert late.returncode == 1 and "Traceback" in late.stderr, late.stderr[-2000:]


def test_an_ops_python_frames_are_read_from_the_lowered_programs_debug_locations():
    import inspect

    from support import user_models

    from sap_jax.train import preflight

    class Outer(nnx.Module):
        def __init__(self):
            self.body = user_models.fused_kernel()

        def __call__(self, x):
            return self.body(x)

    graph, state = nnx.split(Outer())
    loss = lambda st, x: (nnx.merge(graph, st)(x) ** 2).sum()  # noqa: E731
    text = jax.jit(jax.value_and_grad(loss)).lower(state, jnp.ones((2, 8, 8, 3))).as_text(
        debug_info=True)
    frames = preflight.op_frames(text, "sap_test_fused_kernel")
    src = inspect.getsource(user_models).splitlines()
    call = 1 + next(i for i, x in enumerate(src) if "ffi_call(" in x)
    assert frames[0] == ("_fused", f"user_models.py:{call}"), frames
    names = [f for f, _ in frames]  # innermost first: the kernel, the layer, the outer module
    outer = next(i for i, f in enumerate(names) if f.endswith(".Outer.__call__"))
    assert names.index("FusedKernelNet.__call__") < outer, names
    assert preflight.op_frames(text, "no_such_target") == []


@pytest.mark.slow
def test_cls_token_and_stored_key_dropout_shard_over_four_devices_as_on_one(tmp_path):
    """The batch split over 4 simulated devices: the cls token broadcast against it runs, and
    the dropout masks drawn from the model's own key are those of one device (the global
    view), so the losses agree to rounding."""
    from test_train import multidevice_runs

    out = multidevice_runs(tmp_path, (1, 4), TOKEN_NET)
    one, four = np.array(out[1]["losses"]), np.array(out[4]["losses"])
    assert len(one) == len(four) >= 10 and np.all(np.isfinite(four))
    n = out[1]["dense_steps"]
    np.testing.assert_allclose(four[:n], one[:n], rtol=2e-5)
    assert out[4]["step_compiles"] == {"preflight": 1, "first_step": 0}, out[4]


def test_a_layer_with_several_output_axes_is_pruned_by_its_outer_axis():
    """``nnx.LinearGeneral(16, (4, 8))`` then a flatten and an ``nnx.Linear``: the outer
    output axis is a group of 4 units of 8 (like attention heads x head_dim), read by the
    Linear at stride 8; the cut model equals the gated one and the MACs equal XLA's."""
    from test_trace import _xla_conv_dot_flops

    from sap_jax import tracing
    from sap_jax.structure import flops
    from sap_jax.structure import groups as G

    class Heads(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Conv(3, 16, (1, 1), rngs=rngs)
            self.general = nnx.LinearGeneral(16, (4, 8), use_bias=True, rngs=rngs)
            self.linear = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            y = self.general(nnx.relu(self.proj(x)).mean((1, 2)))
            return self.linear(y.reshape(y.shape[0], -1))

    model = Heads(nnx.Rngs(0))
    s, status = tracing.trace(model, (1, 4, 4, 3))
    k = s.group_names.index("general")
    assert s.widths[k] == 4 and status["proj"] == status["general"] == "prunable"
    dense = {x.path: x for x in s.layers if isinstance(x, G.DenseLayer)}
    unit = G.DimSum(((G.GroupRef(k), 8),))
    assert dense[("general",)].out_ch == unit and dense[("linear",)].in_ch == unit
    assert G.Slice(("linear", "kernel"), -2, "in", 0, 8, 8, 1) in s.groups[k].slices
    assert G.Slice(("general", "bias"), -2, "bias") in s.groups[k].slices
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
    keep = [np.arange(w) % 2 == 1 for w in s.widths]
    gated = tracing.gated_call(model, x, [v.astype(np.float32) for v in keep], s)
    small = surgery.extract(model, keep, s)
    assert small.general.out_features == (2, 8) and small.linear.in_features == 16
    np.testing.assert_allclose(small(x), gated, rtol=1e-5, atol=1e-6)
    for m in (model, small):
        assert _xla_conv_dot_flops(m, jnp.ones((1, 4, 4, 3))) == 2 * flops.count(
            tracing.structure(m, (1, 4, 4, 3)), count_padding=False).macs
