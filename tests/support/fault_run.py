"""``python -m sap_jax.main`` with one injected fault, for the reliability tests.

    python tests/support/fault_run.py FAULT ARG -- MAIN_ARGS...

FAULT is one of
  none 0          run normally
  sigterm K       send this process SIGTERM right after weight step K
  sigint K        send it SIGINT (Ctrl-C) right after weight step K
  sigint2 K       send it SIGINT twice right after weight step K
  sigint-cut 0    send it SIGINT when the cut begins (outside any training step)
  sigkill K       SIGKILL this process right after weight step K
  sigkill-save N  SIGKILL this process while checkpoint N is being written
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

fault, arg = sys.argv[1], int(sys.argv[2])
assert sys.argv[3] == "--"
sys.argv = [sys.argv[0]] + sys.argv[4:]

from sap_jax.runtime import console  # noqa: E402

with console.quiet_stderr():  # as python -m sap_jax.main quiets TensorFlow's start-up banners
    import orbax.checkpoint as ocp  # noqa: E402

    from sap_jax import main, train  # noqa: E402

hooks = None
if fault in ("sigterm", "sigkill", "sigint", "sigint2"):
    sig = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}.get(fault, signal.SIGINT)

    def on_step(phase, step, metrics):
        if step == arg:
            for _ in range(2 if fault == "sigint2" else 1):
                os.kill(os.getpid(), sig)

    hooks = train.Hooks(on_step=on_step)
elif fault == "sigint-cut":
    hooks = train.Hooks(on_phase=lambda name: name == "cut" and os.kill(os.getpid(), signal.SIGINT))
elif fault == "sigkill-save":
    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        out = real_save(self, step, *a, **kw)  # asynchronous: returns while writing
        if step == arg:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    ocp.CheckpointManager.save = save
else:
    assert fault == "none", fault

main.run(hooks)
