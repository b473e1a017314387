"""Add SAP's partial group lasso to your own Flax NNX training step.

    python examples/partial_penalty.py [--steps 300] [--gamma 0.05]

Trains a tiny CIFAR-style ResNet on scikit-learn's digits (upscaled to 16x16,
3 channels) with ``CE + gamma * R_w(W; v)`` for a fixed keep/drop mask ``v``
(in SAP the mask comes from :class:`sap_jax.method.agn.AGN`). Prints how the norms
of dropped and kept channels evolve: dropped ones are driven toward zero,
kept ones are not penalised. gamma here is large because the run is short;
the paper uses ~5e-4 over hundreds of epochs.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from sap_jax import models
from sap_jax.method import penalty


def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = np.kron(d.images / 16.0, np.ones((2, 2)))[..., None].repeat(3, -1)  # (N, 16, 16, 3)
    return x.astype(np.float32), d.target.astype(np.int32)


def slice_norms(model, structure, arch) -> tuple[float, float]:
    """Per channel, the sum over its group's tensors of slice L2 norms: mean over dropped, over
    kept."""
    params = nnx.state(model, nnx.Param)
    drop = penalty.group_penalties(params, arch, structure)
    keep = penalty.group_penalties(params, [1 - v for v in arch], structure)
    n_drop = sum(float(jnp.sum(1 - v)) for v in arch)
    n_keep = sum(float(jnp.sum(v)) for v in arch)
    return float(drop.sum()) / n_drop, float(keep.sum()) / n_keep


def main(
    steps: int = 300, gamma: float = 0.05, batch: int = 128, seed: int = 0
) -> dict[str, float]:
    x, y = digits()
    model = models.create("resnet_cifar_tiny", seed=seed)
    structure = model.structure(16)
    rng = np.random.default_rng(seed)
    arch = [jnp.asarray(rng.random(w) < 0.5, jnp.float32) for w in model.widths]  # 1 = keep
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    # ---- the ten lines that matter -------------------------------------------
    @nnx.jit
    def train_step(model, optimizer, images, labels, arch):
        def loss_fn(model):
            logits = model(images)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            reg = penalty.partial_group_lasso(nnx.state(model, nnx.Param), arch, structure)
            return ce + gamma * reg, (ce, reg)

        (_, (ce, reg)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return ce, reg
    # ---------------------------------------------------------------------------

    drop0, keep0 = slice_norms(model, structure, arch)
    history = []
    for step in range(steps):
        idx = rng.integers(0, len(x), batch)
        ce, reg = train_step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]), arch)
        history.append((float(ce), float(reg)))
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  ce {float(ce):.3f}  partial group lasso {float(reg):.3f}")
    drop1, keep1 = slice_norms(model, structure, arch)
    print(f"mean slice norm of dropped channels {drop0:.3f} -> {drop1:.3f}, "
          f"kept channels {keep0:.3f} -> {keep1:.3f}")
    return {"ce_first": history[0][0], "ce_last": float(np.mean([h[0] for h in history[-10:]])),
            "reg_first": history[0][1], "reg_last": history[-1][1],
            "dropped_norm": (drop0, drop1), "kept_norm": (keep0, keep1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gamma", type=float, default=0.05)
    args = ap.parse_args()
    main(args.steps, args.gamma)
