"""Re-estimate BatchNorm running statistics with forward passes only (no gradient step).

Right after a cut, or for a dense model gated by ``v``, the running statistics
were collected for a different network: the layers after a dropped channel see
other inputs than the ones their statistics describe. Accuracy measured with
those stale statistics mostly measures the mismatch (docs/method.md, "BN
re-estimation"). :func:`reestimate` replaces them with the exact population
statistics of a few training batches:

* each batch runs in train mode with every BN momentum set to 0, so the
  running statistics it leaves are that batch's own mean and (biased) variance;
* the batches are pooled exactly: ``mean = E_b[mean_b]`` and
  ``var = E_b[var_b] + Var_b[mean_b]`` (equal batch sizes).

Nothing else changes: parameters are read only, and the statistics of layers
that are not BatchNorm are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sap_jax.runtime import xla_cpu
from sap_jax.structure.codec import ModuleCodec

Tree = dict[str, Any]


def make_batch_stats_step(codec: ModuleCodec, dtype: Any = jnp.float32) -> Callable:
    """``(params, rest, batch, arch) -> rest`` whose BN statistics are those of ``batch``.

    ``arch`` gates the forward pass like the model's own (``None`` entries or a
    list of ones: the whole model), so a gated sub-network gets its own statistics.
    """
    def step(params, rest, batch, arch):
        model = codec.merge(params, _zero_bn(rest))  # the old statistics are never read
        model.train()
        for _, m in nnx.iter_modules(model):
            if isinstance(m, nnx.BatchNorm):
                m.momentum = 0.0  # running statistics := this batch's statistics
        model(batch["image"].astype(dtype), arch)
        return codec.rest_of(model)

    return xla_cpu.jit(step)


def _is_bn(node: Any) -> bool:
    return isinstance(node, dict) and "mean" in node and "var" in node


def _zero_bn(rest: Tree) -> Tree:
    """``rest`` with every BN's statistics zeroed (momentum 0 then leaves exactly the batch's)."""
    if _is_bn(rest):
        return {**rest, "mean": jnp.zeros_like(rest["mean"]), "var": jnp.zeros_like(rest["var"])}
    if isinstance(rest, dict):
        return {k: _zero_bn(v) for k, v in rest.items()}
    return rest


def _pool(total: Tree, total_sq: Tree, old: Tree, n: int) -> Tree:
    """Population statistics from per-batch sums; non-BN entries keep their ``old`` value."""
    if _is_bn(old):
        mean = total["mean"] / n
        var = total["var"] / n + jnp.maximum(total_sq["mean"] / n - mean * mean, 0.0)
        return {**old, "mean": mean.astype(old["mean"].dtype), "var": var.astype(old["var"].dtype)}
    if isinstance(old, dict):
        return {k: _pool(total[k], total_sq[k], v, n) for k, v in old.items()}
    return old


def reestimate(step: Callable, params: Tree, rest: Tree, batches: Iterable[dict[str, Any]],
               arch: Any) -> Tree:
    """``rest`` with every BN's statistics re-estimated over ``batches`` (at least one).

    ``step`` comes from :func:`make_batch_stats_step`; ``batches`` are global
    batches (already on the mesh) of equal size.
    """
    total = total_sq = None
    n = 0
    for b in batches:
        stats = step(params, rest, b, arch)
        sq = jax.tree.map(lambda x: x * x, stats)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        total_sq = sq if total_sq is None else jax.tree.map(jnp.add, total_sq, sq)
        n += 1
    if n == 0:
        raise ValueError("BN re-estimation needs at least one batch.")
    return _pool(total, total_sq, rest, n)


__all__ = ["make_batch_stats_step", "reestimate"]
