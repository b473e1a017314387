# ruff: noqa: E501 - the HLO text below keeps its real line lengths
"""Compiling for TPU slices on this CPU host (``python -m sap_jax.aot``): the HLO cost reader
against hand-counted programs, topology names, and the CLI on the tiny config.

These need the TPU compiler (the ``[tpu]`` extra, installed by the README's test command);
without it they fail rather than skip.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sap_jax.runtime import hlo, tpu
from sap_jax.runtime.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "support", "tiny_config.py")

# A hand-written scheduled module: a fused 3x3 conv (SAME padding) feeding a transposed conv
# (lhs_dilate 2), a dot, an all-reduce, and free ops.
HLO_TEXT = """HloModule jit_f, is_scheduled=true

%fused_conv (p0: bf16[8,16,16,4], p1: bf16[3,3,4,32]) -> f32[8,16,16,32] {
  %p0 = bf16[8,16,16,4]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,4,32]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[8,16,16,32]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_tconv (q0: f32[8,8,8,32], q1: f32[3,3,16,32]) -> f32[8,16,16,16] {
  %q0 = f32[8,8,8,32]{3,2,1,0} parameter(0)
  %q1 = f32[3,3,16,32]{3,2,1,0} parameter(1)
  ROOT %convolution.2 = f32[8,16,16,16]{3,2,1,0} convolution(%q0, %q1), window={size=3x3 pad=1_2x1_2 lhs_dilate=2x2}, dim_labels=b01f_01oi->b01f
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[8,16,16,4], w: bf16[3,3,4,32], g: f32[8,8,8,32], k: f32[3,3,16,32], m: f32[64,128], n: f32[128,10]) -> (f32[8,16,16,32], f32[64,10]) {
  %x = bf16[8,16,16,4]{3,2,1,0} parameter(0)
  %w = bf16[3,3,4,32]{3,2,1,0} parameter(1)
  %g = f32[8,8,8,32]{3,2,1,0} parameter(2)
  %k = f32[3,3,16,32]{3,2,1,0} parameter(3)
  %m = f32[64,128]{1,0} parameter(4)
  %n = f32[128,10]{1,0} parameter(5)
  %fusion = f32[8,16,16,32]{3,2,1,0:T(8,128)S(3)} fusion(%x, %w), kind=kOutput, calls=%fused_conv
  %fusion.1 = f32[8,16,16,16]{3,2,1,0} fusion(%g, %k), kind=kOutput, calls=%fused_tconv
  %dot = f32[64,10]{1,0} dot(%m, %n), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-reduce = f32[64,10]{1,0} all-reduce(%dot), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce-start = f32[16]{0} all-reduce-start(%n), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce-done = f32[16]{0} all-reduce-done(%all-reduce-start)
  ROOT %tuple = (f32[8,16,16,32]{3,2,1,0}, f32[64,10]{1,0}) tuple(%fusion, %all-reduce)
}
"""


def test_hlo_costs_are_counted_by_hand():
    program = hlo.parse(HLO_TEXT)
    assert program.entry == "main" and not program.has_control_flow
    ops = {o.name: o for o in hlo.op_costs(program)}
    # Free ops (parameters, the tuple) and the -done half of an async pair cost nothing.
    assert set(ops) == {"fusion", "fusion.1", "dot", "all-reduce", "all-reduce-start"}
    # SAME 3x3 conv: every tap of the window, padding included.
    assert ops["fusion"].flops == 2 * (8 * 16 * 16 * 32) * (3 * 3 * 4)
    # Transposed conv: the taps on the zeros lhs_dilate inserts (3 of 4) are not counted.
    assert ops["fusion.1"].flops == 2 * (8 * 16 * 16 * 16) * (3 * 3 * 32) / 4
    assert ops["dot"].flops == 2 * 64 * 10 * 128
    # A dot contracting two dimensions (as a 1x1 conv's gradient becomes) counts both.
    two = hlo.parse("""HloModule m
ENTRY %main (a: f32[4,8,16], b: f32[8,16,32]) -> f32[4,32] {
  %a = f32[4,8,16]{2,1,0} parameter(0)
  %b = f32[8,16,32]{2,1,0} parameter(1)
  ROOT %d = f32[4,32]{1,0} dot(%a, %b), lhs_contracting_dims={1,2}, rhs_contracting_dims={0,1}
}
""")
    assert [o.flops for o in hlo.op_costs(two)] == [2 * 4 * 32 * 8 * 16]
    # A 1x1 conv the compiler wrote with the roles swapped (the kernel as the input, an
    # activation-sized window over it): only the one tap that meets the kernel is work.
    swapped = hlo.parse("""HloModule m
ENTRY %main (k: bf16[1,1,32,16], x: bf16[64,112,112,32]) -> bf16[64,112,112,16] {
  %k = bf16[1,1,32,16]{2,3,1,0} parameter(0)
  %x = bf16[64,112,112,32]{0,3,2,1} parameter(1)
  ROOT %c = bf16[64,112,112,16]{0,3,2,1} convolution(%k, %x), window={size=112x112 pad=111_0x111_0}, dim_labels=01fb_o01i->f01b
}
""")
    assert [o.flops for o in hlo.op_costs(swapped)] == [2 * 64 * 112 * 112 * 16 * 32]
    # Bytes: operands + result, by element type (bf16 2, f32 4).
    assert ops["fusion"].bytes == 8 * 16 * 16 * 4 * 2 + 3 * 3 * 4 * 32 * 2 + 8 * 16 * 16 * 32 * 4
    assert hlo.collectives(program) == {"all-reduce": {"count": 2, "bytes": 64 * 10 * 4 + 16 * 4}}
    peak, bw = 100e12, 1e12
    expect = sum(max(ops[k].flops / peak, ops[k].bytes / bw) for k in ("fusion", "fusion.1",
                                                                        "dot"))
    assert hlo.roofline_s(list(ops.values()), peak, bw) == pytest.approx(expect)


def test_ring_allreduce_time():
    chip = tpu.CHIPS["v5e"]
    coll = {"all-reduce": {"count": 3, "bytes": 1e6}, "all-gather": {"count": 1, "bytes": 1e6}}
    # 8 chips: an all-reduce moves 2 * 7/8 of its bytes per chip, an all-gather 7/8.
    assert tpu.allreduce_s(coll, chip, 8) == pytest.approx((2 + 1) * 7 / 8 * 1e6
                                                           / chip.allreduce_bandwidth)
    assert tpu.allreduce_s(coll, chip, 1) == 0.0


@pytest.mark.parametrize("name,expect", [
    ("v5e:2x4", ("v5e", "2x4")), ("v4:2x2x1", ("v4", "2x2x1")), ("v4-8", ("v4", "2x2x1")),
    ("v4-32", ("v4", "2x2x4")), ("v5litepod-16", ("v5e", "4x4")), ("v6e-8", ("v6e", "2x4")),
    ("v5p-8", ("v5p", "2x2x1")), ("V5E:2x2", ("v5e", "2x2"))])
def test_topology_names(name, expect):
    chip, shape = tpu.parse_name(name)
    assert (chip.generation, shape) == expect


@pytest.mark.parametrize("name,words", [
    ("v9:2x2", "unknown TPU generation"), ("v5e", "not of the form"),
    ("v4:2x2", "3 dimensions"), ("v5litepod-12", "no standard v5e shape")])
def test_bad_topology_names_say_what_is_wrong(name, words):
    with pytest.raises(ConfigError, match=words):
        tpu.parse_name(name)


def test_padded_costs_round_features_to_the_mxu_and_arrays_to_their_tiles():
    """With ``mxu`` a conv's contracted and output features, and a dot's contracted size and
    output minor dimension, round up to the matrix unit's width; with ``padded`` an array counts
    at its tiled layout's size (the most minor dimension of its layout to the tile's last
    size, the next to the first); arrays without a tile stay as they are."""
    program = hlo.parse(HLO_TEXT)
    ops = {o.name: o for o in hlo.op_costs(program, mxu=128, padded=True)}
    assert ops["fusion"].flops == 2 * (8 * 16 * 16 * 128) * (3 * 3 * 128)  # 4 -> 128, 32 -> 128
    assert ops["fusion.1"].flops == 2 * (8 * 16 * 16 * 128) * (3 * 3 * 128) / 4
    assert ops["dot"].flops == 2 * 64 * 128 * 128  # 10 output features -> 128
    # fusion's result f32[8,16,16,32]{3,2,1,0:T(8,128)}: dim 3 32 -> 128, dim 2 16 -> 16.
    logical = {o.name: o for o in hlo.op_costs(program)}
    assert ops["fusion"].bytes == logical["fusion"].bytes + 8 * 16 * 16 * (128 - 32) * 4
    assert hlo.nbytes("bf16[8,14,14,40]{3,0,2,1:T(8,128)(2,1)}", padded=True) == (
        2 * 128 * 14 * 14 * 8)  # minor dim 3 -> 128; next minor, dim 0 (8), already 8
    assert hlo.nbytes("bf16[6,14,14,40]{3,0,2,1:T(8,128)(2,1)}", padded=True) == (
        2 * 128 * 14 * 14 * 8)  # dim 0: 6 -> 8
    # A depthwise conv (one channel per group) is no MXU pass: its FLOPs stay logical.
    dw = hlo.parse("""HloModule m
ENTRY %main (x: bf16[8,16,16,32], k: bf16[3,3,1,32]) -> bf16[8,16,16,32] {
  %x = bf16[8,16,16,32]{3,2,1,0} parameter(0)
  %k = bf16[3,3,1,32]{3,2,1,0} parameter(1)
  ROOT %c = bf16[8,16,16,32]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, feature_group_count=32
}
""")
    assert [o.flops for o in hlo.op_costs(dw, mxu=128)] == [2 * 8 * 16 * 16 * 32 * 9]
    assert hlo.nbytes("f32[100]{0:T(256)}", padded=True) == 4 * 256
    assert hlo.nbytes("f32[100]{0:T(256)}") == 4 * 100
    assert hlo.nbytes("(f32[3,5]{1,0}, s32[]{:T(128)})", padded=True) == 4 * 15 + 4


def test_conv_roofline_matches_an_independent_count(monkeypatch):
    """A VALID conv compiled for one v5e chip: the per-op FLOPs equal 2*N*Ho*Wo*Cout*Cin*k*k
    and XLA's own count, and the estimate is at least the roofline of the whole program."""
    for k in ("SAP_JAX_XLA_CPU_DEFAULTS", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_SKIP_MDS_QUERY"):
        monkeypatch.setenv(k, "1")  # what topology() sets, undone for this worker's next tests
    topo = tpu.topology("v5e:2x2")
    dev = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(dev)
    n, h, cin, cout, k = 32, 28, 64, 128, 3

    def f(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    args = (jax.ShapeDtypeStruct((n, h, h, cin), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((k, k, cin, cout), jnp.bfloat16, sharding=sharding))
    cost = tpu.analyse(jax.jit(f).lower(*args).compile(), topo.chip, 1)
    ho = h - k + 1
    expect = 2 * n * ho * ho * cout * cin * k * k
    assert cost["flops"] == pytest.approx(expect, rel=1e-6)
    assert cost["xla_cost"]["flops"] == pytest.approx(expect, rel=0.01)
    # On the MXU the 64 input channels take a 128-wide pass: twice the work.
    assert cost["flops_padded"] == pytest.approx(2 * expect, rel=1e-6)
    assert cost["estimated_s"] >= cost["estimated_s_logical"]
    whole = max(expect / topo.chip.peak_flops, cost["bytes"] / topo.chip.hbm_bandwidth)
    assert cost["estimated_s"] >= whole * (1 - 1e-9)
    assert cost["collectives"] == {} and cost["hbm_bytes"] > 0


def _aot(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "sap_jax.aot", f"--config={TINY}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


@pytest.fixture(scope="module")
def tiny_v4():  # about 30 s on 2 cores
    """Every step of the tiny config compiled for v4:2x2x1 (4 chips), once."""
    r = _aot("--topology=v4:2x2x1")
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_compiles_every_step_and_ends_with_json(tiny_v4):
    r, out = tiny_v4
    assert out["topology"] == "v4:2x2x1" and out["chips"] == 4
    assert out["hbm_capacity_bytes"] == 32 * 2**30 and out["fits"] is True
    assert set(out["steps"]) == {"plain", "sap", "agn", "eval", "finetune", "finetune_r128"}
    for name, s in out["steps"].items():
        assert s["estimated_s"] > 0 and s["images_per_s"] > 0, name
        assert 0 < s["hbm_bytes"] <= out["hbm_needed_bytes"], name
        assert s["compile_s"] > 0
    # Data parallelism: the weight steps all-reduce gradients across the 4 chips.
    assert out["steps"]["plain"]["collectives"]["all-reduce"] >= 1
    # SAP's penalty adds a little work to the same step, never a different program size.
    assert 1.0 <= out["sap_over_plain"] < 1.5
    # The pruned model (half the prunable MACs) trains faster than the dense one; the tiny
    # model's groups are narrower than 128, so "rounded to 128" keeps them whole.
    assert out["pruned_speedup_estimated"]["finetune"] > 1.0
    assert out["pruned_macs_ratio"]["finetune"] <= 0.5
    widths = out["pruned_widths"]
    assert len(widths["finetune"]) == len(widths["finetune_r128"])
    # The table a person reads comes before the JSON line.
    assert "img/s/chip" in r.stdout and "compiler estimates" in r.stdout


def test_a_step_that_does_not_fit_exits_2_with_what_to_change():
    r = _aot("--topology=v5e:2x2", "--steps=eval", "--config.eval_batch_size=8388608")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: does not fit: step 'eval' needs at least")
    assert "GiB per chip" in last and "batch_size" in last and "bfloat16" in last
    out = json.loads(r.stdout.strip().splitlines()[-1])  # valid JSON: no Infinity
    assert out["fits"] is False
    # The compiler's own figure: finite, and more than the chip has.
    assert out["hbm_capacity_bytes"] < out["steps"]["eval"]["hbm_bytes"] < 1e12


def test_a_compiler_crash_exits_2_with_one_line_naming_the_step():
    """libtpu 0.0.42 dies with SIGSEGV compiling a v6e training step (docs/scaling.md): the
    compiles run in a child process, so the CLI still ends in one line and exit code 2."""
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}  # the pinned one
    r = _aot("--topology", "v6e:2x2", "--steps=eval,plain", env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the TPU compiler crashed (SIGSEGV) compiling the plain "
                                "step for v6e:2x2 (libtpu 0.0.42"), lines[-1]
    assert "benchmarks/libtpu_v6e_repro.py" in lines[-1]
    assert any(x.startswith("eval: compiled in") for x in lines)  # the steps before it report
    assert not any("Fatal Python error" in x or "Extension modules" in x for x in lines)


def _child(*lines: str, signum: int) -> list[str]:
    """A child that reports ``lines`` on stderr, then dies of ``signum``."""
    say = "".join(f"print({x!r}, file=sys.stderr, flush=True); " for x in lines)
    return [sys.executable, "-c", f"import os, sys; {say}os.kill(os.getpid(), {int(signum)})"]


@pytest.mark.parametrize("sig, words", [
    ("SIGSEGV", ["the TPU compiler crashed (SIGSEGV) compiling the sap step for v5e:2x2",
                 "compiler bug", "TPU_LIBRARY_PATH"]),
    ("SIGABRT", ["the TPU compiler crashed (SIGABRT) compiling the sap step"]),
    ("SIGKILL", ["compiling the sap step for v5e:2x2 was killed (SIGKILL)", "out-of-memory",
                 "--steps"]),
])
def test_a_dying_compiler_process_is_named_by_its_signal_and_step(capfd, sig, words):
    import signal

    from sap_jax import aot

    rc = aot.supervise(["--topology", "v5e:2x2"], command=_child(
        "plain: compiling", "plain: compiled in 1.0 s", "sap: compiling",
        "Fatal Python error: Segmentation fault", "  File x.py, line 1",
        signum=getattr(signal, sig)))
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and err[:3] == [
        "plain: compiling", "plain: compiled in 1.0 s", "sap: compiling"], err
    assert len(err) == 4  # the fault handler's dump is dropped: one line says it all
    for w in words:
        assert w in err[-1], (w, err[-1])


def test_a_compile_stopped_from_outside_is_not_called_a_crash(capfd):
    import signal

    from sap_jax import aot

    rc = aot.supervise(["--topology=v5e:2x2"], command=_child("eval: compiling",
                                                               signum=signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM
    assert "crashed" not in capfd.readouterr().err


def test_unknown_topology_exits_2():
    r = _aot("--topology=v9:2x2")
    assert r.returncode == 2
    assert "unknown TPU generation" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_compiles_at_once_share_libtpu():
    """libtpu's machine-wide lock file: a second process loading it fails unless
    ALLOW_MULTIPLE_LIBTPU_LOAD is set, which the CLI does itself."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    cmd = [sys.executable, "-m", "sap_jax.aot", f"--config={TINY}", "--topology=v5e:2x2",
           "--steps=eval"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["fits"] is True
    assert np.isfinite(json.loads(outs[0][0].strip().splitlines()[-1])["steps"]["eval"]
                       ["estimated_s"])
