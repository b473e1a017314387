"""Run a few tiny training steps on N simulated CPU devices and print the losses as JSON,
with the XLA compiles of the weight step (``jit(step)``) made by the pre-flight check (before
the run enters "search") and those made after it, before the first step returned.

    python tests/support/multidevice_run.py N WORKDIR [MODEL]
"""

import json
import os
import sys

n = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # configs/, and support/ as under pytest

import jax  # noqa: E402
from support import tiny_config  # noqa: E402

from sap_jax import train  # noqa: E402

assert jax.device_count() == n, jax.devices()
c = tiny_config.get_config()
c.num_epochs, c.finetune.num_epochs, c.log_every_steps = 2, 1, 1
if len(sys.argv) > 3:
    c.model, c.model_prune = sys.argv[3], "all"
losses, phases, entered = [], [], []
step_compiles = {"preflight": 0, "first_step": 0}


def on_compile(event, secs, fun_name=None, **_):
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(step)":
        if not entered:
            step_compiles["preflight"] += 1
        elif not losses:
            step_compiles["first_step"] += 1


def on_step(phase, step, m):
    losses.append(float(m["loss"]))
    phases.append(phase)


jax.monitoring.register_event_duration_secs_listener(on_compile)
r = train.train_and_evaluate(c, sys.argv[2], hooks=train.Hooks(
    on_step=on_step, on_phase=lambda name: entered.append(name)))
print("RESULT " + json.dumps({"losses": losses, "dense_steps": phases.count("dense"),
                              "widths": r["widths"], "final_acc": r["final_acc"],
                              "sharding": str(jax.devices()), "step_compiles": step_compiles}))
