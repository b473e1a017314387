"""The training program (docs/design.md, "How a run flows").

``train_and_evaluate(config, workdir)`` runs the whole method and resumes from the latest
checkpoint in ``workdir``:

* :mod:`.spec`: the config read once, into a frozen :class:`~.spec.RunSpec` (all below read it);
* :mod:`.run`: the driver (spec -> Env, restore or initialise, the phases in order, the cut);
* :mod:`.loop`: the one epoch loop every phase goes through, and :class:`Hooks`;
* :mod:`.search`: SAP's hooks of the search phase (AGN steps, search metrics, best/last);
* :mod:`.steps`: the jitted step builders and optimizers;
* :mod:`.state`: :class:`Progress` and the checkpointed arrays, typed (``Weights``,
  ``SearchState``);
* :mod:`.checkpoints`: orbax, the workdir's config guard and the preemption watch.
"""

from sap_jax.runtime.errors import (
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    CheckpointError,
    CheckpointWriteError,
    NonFiniteLoss,
    Preempted,
)
from sap_jax.train.checkpoints import CKPT_DIR, latest_progress
from sap_jax.train.loop import Hooks
from sap_jax.train.run import PRUNED_DIR, train_and_evaluate
from sap_jax.train.state import Progress
from sap_jax.train.steps import (
    NEVER_FIT,
    lr_schedule,
    make_agn_optimizer,
    make_agn_step,
    make_eval_step,
    make_fit_tracker,
    make_norms,
    make_optimizer,
    make_train_step,
)

__all__ = ["train_and_evaluate", "Hooks", "Progress", "latest_progress", "CKPT_DIR", "PRUNED_DIR",
           "lr_schedule", "make_optimizer", "make_agn_optimizer", "make_train_step",
           "make_eval_step", "make_agn_step", "make_fit_tracker", "make_norms", "NEVER_FIT",
           "NonFiniteLoss", "Preempted", "CheckpointError", "CheckpointWriteError",
           "EXIT_PREEMPTED", "EXIT_WRITE_FAILED"]
