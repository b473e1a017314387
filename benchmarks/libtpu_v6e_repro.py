"""The smallest program found that crashes libtpu's compiler for v6e (docs/scaling.md).

    python benchmarks/libtpu_v6e_repro.py            # needs the [tpu] extra, no TPU

A conv, a batch-statistics normalisation and a ReLU, then a stride-2 conv added to a stride-2
slice of the same activation: the gradient of that, with the batch sharded over the slice's
chips, is what every training step of a CIFAR or ImageNet ResNet contains (a BN'd stem or block
output feeding a downsampling block with its shortcut). Each case compiles in its own process,
since the crash is a signal; the table says which compile and which crash.
"""

from __future__ import annotations

import os
import subprocess
import sys

CASES = {  # name: (topology, batch sharded over the chips?, normalise with batch statistics?)
    "v6e, batch sharded": ("v6e:2x2", True, True),
    "v6e, batch replicated": ("v6e:2x2", False, True),
    "v6e, batch sharded, no normalisation": ("v6e:2x2", True, False),
    "v5e, batch sharded": ("v5e:2x2", True, True),
    "v4, batch sharded": ("v4:2x2x1", True, True),
}


def compile_case(topology: str, sharded: bool, normalise: bool) -> None:
    from sap_jax.runtime import tpu

    topo = tpu.topology(topology)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(topo.devices, ("data",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    conv = lambda x, k, s: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(k0, k1, x):
        h = conv(x, k0, 1)
        if normalise:
            h = (h - h.mean((0, 1, 2))) * jax.lax.rsqrt(h.var((0, 1, 2)) + 1e-5)
        h = jax.nn.relu(h)
        return ((conv(h, k1, 2) + h[:, ::2, ::2]) ** 2).sum()

    k = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32, sharding=rep)
    x = jax.ShapeDtypeStruct((16, 16, 16, 8), jnp.float32, sharding=split if sharded else rep)
    jax.jit(jax.grad(loss, argnums=(0, 1))).lower(k, k, x).compile()


def main() -> int:
    from sap_jax import aot

    print(f"| program (gradient of conv, BN, ReLU, stride-2 conv + stride-2 slice) | "
          f"{aot.libtpu()[0]} |\n|---|---|")
    for name, case in CASES.items():
        p = subprocess.run([sys.executable, __file__, *map(str, case)], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        outcome = ("compiles" if p.returncode == 0 else
                   f"crashes (signal {-p.returncode})" if p.returncode < 0 else
                   f"fails: {(p.stderr.strip().splitlines() or ['?'])[-1][:120]}")
        print(f"| {name} | {outcome} |", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4:
        compile_case(sys.argv[1], sys.argv[2] == "True", sys.argv[3] == "True")
    else:
        sys.exit(main())
