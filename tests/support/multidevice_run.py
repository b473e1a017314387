"""Run a few tiny training steps on N simulated CPU devices and print the losses as JSON.

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
losses, phases = [], []


def on_step(phase, step, m):
    losses.append(float(m["loss"]))
    phases.append(phase)


r = train.train_and_evaluate(c, sys.argv[2], hooks=train.Hooks(on_step=on_step))
print("RESULT " + json.dumps({"losses": losses, "dense_steps": phases.count("dense"),
                              "widths": r["widths"], "final_acc": r["final_acc"],
                              "sharding": str(jax.devices())}))
