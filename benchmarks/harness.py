"""Shared by the benchmark scripts: one of the trainer's own train steps on a fixed synthetic
batch."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sap_jax import models, train
from sap_jax.structure.codec import ModuleCodec


def train_step_runner(model_name: str, batch: int, image_size: int,
                      tx: optax.GradientTransformation) -> Callable[[], None]:
    """A closure that runs one ``make_train_step`` step (fp32, no penalty, all channels kept),
    carries the state forward and blocks until it is done. The step is built (jitted) here and
    compiled at the first call."""
    model = models.create(model_name)
    codec = ModuleCodec(model)
    step = train.make_train_step(codec, model.structure(image_size), tx, penalty_form="none")
    params, rest = codec.split(model)
    state = [params, rest, tx.init(params)]
    rng = np.random.default_rng(0)
    b = {"image": jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)}
    arch = [jnp.ones(w) for w in model.widths]

    def run() -> None:
        nonlocal state
        out = step(*state, b, arch, jnp.float32(0))
        jax.block_until_ready(out)
        state = list(out[:3])

    return run
