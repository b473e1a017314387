"""What one 3x3 convolution costs at narrow widths on this machine, lowered four ways.

    python benchmarks/narrow_conv.py [--batch 64] [--shapes 32:16:16,32:16:8,...] [--reps 30]

Why a cut's saved MACs do not all turn into time (issue 29): each shape ``H:CIN:COUT`` (an
H x H input, stride 1, SAME padding, fp32) is timed as

* ``xla``: ``lax.conv_general_dilated`` with the library's XLA:CPU options
  (``sap_jax.runtime.xla_cpu``: Eigen convolutions);
* ``xla defaults``: the same with XLA's own options (YNNPACK convolutions on the CPU);
* ``out matmul``: one matmul from CIN to the nine taps' COUT outputs, then the nine shifted
  slices summed (cheap when COUT is far below CIN);
* ``im2col``: the nine shifted inputs concatenated, then one matmul (cheap when CIN is small).

All four must agree with the first (the script stops otherwise). Medians of ``--reps``
interleaved rounds after a warm-up (``speed.time_interleaved``), in ms.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sap_jax.runtime import speed, xla_cpu

SHAPES = "32:16:16,32:16:8,32:16:1,32:8:16,16:32:32,16:32:16,16:32:4,8:64:64,8:64:32"


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def out_matmul(x, w):
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = x.shape
    y = x @ w.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)  # every tap's outputs at once
    y = jnp.pad(y.reshape(*y.shape[:3], kh, kw, cout),
                ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0), (0, 0), (0, 0)))
    return sum(y[:, i:i + h, j:j + wd, i, j] for i in range(kh) for j in range(kw))


def im2col(x, w):
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(kh) for j in range(kw)], -1)
    return cols @ w.reshape(kh * kw * cin, cout)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated H:CIN:COUT")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split(":")) for s in a.shapes.split(",")]
        assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes must be comma-separated H:CIN:COUT of positive integers, "
                 f"got {a.shapes!r}")
    ways = {"xla": xla_cpu.jit(conv), "xla defaults": jax.jit(conv),
            "out matmul": xla_cpu.jit(out_matmul), "im2col": xla_cpu.jit(im2col)}
    rng = np.random.default_rng(0)
    rows = []
    print(f"{jax.devices()[0].platform}, batch {a.batch}, fp32, median ms of {a.reps}")
    print(f"  {'H':>3} {'CIN':>4} {'COUT':>4} " + " ".join(f"{k:>12}" for k in ways))
    for h, cin, cout in shapes:
        x = jnp.asarray(rng.standard_normal((a.batch, h, h, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
        want = np.asarray(ways["xla"](x, w))
        for name, fn in ways.items():
            np.testing.assert_allclose(np.asarray(fn(x, w)), want, rtol=1e-3, atol=1e-3,
                                       err_msg=name)
        times = speed.time_interleaved([functools.partial(fn, x, w) for fn in ways.values()],
                                       a.reps)
        ms = {name: 1e3 * statistics.median(t) for name, t in zip(ways, times)}
        rows.append({"h": h, "cin": cin, "cout": cout, "batch": a.batch, "ms": ms})
        print(f"  {h:>3} {cin:>4} {cout:>4} " + " ".join(f"{ms[k]:>12.3f}" for k in ways))
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
