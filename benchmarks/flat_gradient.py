"""Does a flattened gradient cut the all-reduces of a data-parallel weight step on a TPU slice?

    python benchmarks/flat_gradient.py [--config=tests/support/tiny_config.py]
        [--topology=v5e:2x2]                      # needs the [tpu] extra, no TPU

The run's weight step leaves the gradient's reduction to XLA's partitioner, which all-reduces
every gradient leaf and every BN batch statistic (docs/scaling.md counts them after XLA's
combiner). This compiles the gradient of the run's loss three ways for the slice and prints
their all-reduce counts and estimated times (``sap_jax.runtime.tpu.analyse``):

- ``partitioner``: ``jit`` with the batch sharded, as the run does (synchronised BN);
- ``per leaf``: ``shard_map``, each chip's gradient reduced leaf by leaf (the ``psum`` JAX
  puts on the cotangent of every replicated input);
- ``flattened``: ``shard_map``, each chip's gradient raveled into one vector and reduced once.

The two ``shard_map`` forms normalise with each chip's own batch statistics (as PyTorch's DDP
without SyncBatchNorm), so they also drop the forward's statistic all-reduces: compare them
with each other for what flattening alone changes. The estimate models bytes moved on a ring,
not a per-collective latency, so it cannot show what many small all-reduces cost on a real
slice; the counts are the compiler's own.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tests/support/tiny_config.py")
    ap.add_argument("--topology", default="v5e:2x2")
    args = ap.parse_args()

    from sap_jax.runtime import tpu

    topo = tpu.topology(args.topology)
    import jax
    import optax
    from jax.flatten_util import ravel_pytree
    from jax.sharding import PartitionSpec as P

    from sap_jax.structure.codec import ModuleCodec
    from sap_jax.train import aot
    from sap_jax.train import config as config_lib
    from sap_jax.train import spec as spec_lib

    spec = spec_lib.from_config(config_lib.load_file(os.path.join(ROOT, args.config)))
    mesh = aot.mesh_of(topo)
    planner = aot.Planner(spec, mesh, config_lib.NUM_CLASSES.get(spec.data.dataset, 10))
    model = planner.model()
    codec = ModuleCodec(model)
    params, rest = planner.state(model)
    batch = planner.batch(spec.data.batch_size)
    n = topo.chips

    def loss(params, rest, batch):
        m = codec.merge(params, rest)
        m.train()
        logits = m(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def per_leaf(params, rest, batch):
        # The cotangent of an input replicated over "data" is summed over it by JAX itself:
        # one psum per leaf, which XLA's combiner may merge.
        return jax.tree.map(lambda g: g / n, jax.grad(loss)(params, rest, batch))

    def flattened(params, rest, batch):
        # Parameters cast to per-chip copies: each chip's own gradient, raveled, summed once.
        local = jax.tree.map(lambda x: jax.lax.pcast(x, "data", to="varying"), params)
        flat, unravel = ravel_pytree(jax.grad(loss)(local, rest, batch))
        return unravel(jax.lax.psum(flat, "data") / n)

    specs = dict(mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
    variants = {
        "partitioner": jax.jit(jax.grad(loss)),
        "per leaf": jax.jit(jax.shard_map(per_leaf, **specs)),
        "flattened": jax.jit(jax.shard_map(flattened, **specs)),
    }
    leaves = len(jax.tree.leaves(params))
    print(f"{args.config} on {topo.name} ({n} chips), global batch {spec.data.batch_size}, "
          f"{leaves} gradient leaves\n")
    print("| gradient reduction | all-reduces | all-reduce MB | ring all-reduce, est. ms "
          "| gradient step, est. ms |\n|---|---|---|---|---|")
    for name, fn in variants.items():
        cost = tpu.analyse(fn.lower(params, rest, batch).compile(), topo.chip, n)
        count = cost["collectives"].get("all-reduce", 0)
        mb = cost["collective_bytes"].get("all-reduce", 0.0) / 1e6
        print(f"| {name} | {count} | {mb:.3f} | {cost['collectives_s'] * 1e3:.4f} | "
              f"{cost['estimated_s'] * 1e3:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
