"""Run SAP end to end: ``python -m sap_jax.main --config=configs/NAME.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g.
``--config.num_epochs=3 --config.budget.p=0.5``. Rerunning with the same
workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys

# TensorFlow (the input pipeline) prints C++ banners at import; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

from sap_jax import cli
from sap_jax.runtime import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results and plots.")
flags.DEFINE_boolean("allow_config_change", False,
                     "Continue a started run in --workdir although a field that changes results "
                     "differs from its config (recorded in results.json's config_changes).")
flags.DEFINE_boolean("remeasure_speed", False,
                     "On a finished run in --workdir: time the dense and pruned models again and "
                     "report the new figures (the earlier ones stay in results.json's "
                     "speed_earlier); nothing else is redone.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: HOST:PORT of process 0. Not needed on Cloud TPU or under "
                    "Slurm.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes in the job.")
flags.DEFINE_integer("process_id", None,
                     "Multi-process: this process's index in [0, num_processes).")
flags.DEFINE_float("distributed_timeout_s", 300.0,
                   "Multi-process: how long start-up waits for every process before giving up.")
flags.mark_flags_as_required(["config", "workdir"])

#: Exit codes (message on stderr): sap_jax.runtime.errors; 0 = done.
EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT

#: Hooks passed to the run (sap_jax.train.Hooks); set by code that embeds the CLI via run().
_HOOKS = None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sap_jax.runtime import console, host_memory, parallel

    console.setup_terminal(FLAGS.verbosity)
    # Before any JAX backend starts: threads keep the malloc arena they first use.
    host_memory.apply_config_value(FLAGS.config.get("host_memory"))

    try:  # before any other JAX call; a no-op on one host
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, timeout_s=FLAGS.distributed_timeout_s)
    except errors.DistributedSetupError as e:
        _fail(e)
    import jax

    from sap_jax import train  # (TensorFlow only later, for a TFDS dataset: train.data)

    console.setup_file(FLAGS.workdir, jax.process_index())
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, hooks=_HOOKS,
                                 allow_config_change=FLAGS.allow_config_change,
                                 remeasure_speed=FLAGS.remeasure_speed)
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one before training started
        print("aborted by Ctrl-C without saving; rerun to resume from the last checkpoint.",
              file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_ABORTED)
    except Exception as e:  # noqa: BLE001 - the documented ones exit with their code, bugs raise
        if errors.exit_code(e) is None:
            raise
        _fail(e)


def _fail(e: BaseException) -> None:
    """One line on stderr and the documented exit code for ``e`` (sap_jax.runtime.errors). A
    preempted run also leaves its marker file in the workdir (process 0,
    train.checkpoints.PREEMPTED_MARKER)."""
    word = "stopped" if isinstance(e, errors.Preempted) else "error"
    if isinstance(e, errors.Preempted) and FLAGS.workdir:
        import jax

        from sap_jax.runtime import parallel
        from sap_jax.train import checkpoints

        if jax.process_index() == 0:
            marker = parallel.path(FLAGS.workdir) / checkpoints.PREEMPTED_MARKER
            parallel.write_text_atomic(marker, str(e))
    print(f"{word}: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.exit_code(e))


def run(hooks=None) -> None:
    """The command line; ``hooks`` (sap_jax.train.Hooks) observe the run, e.g. in tests."""
    global _HOOKS
    _HOOKS = hooks
    rest = cli.parse_or_exit(sys.argv)
    app.run(main, flags_parser=lambda _argv: rest)  # parsed above, once


if __name__ == "__main__":
    run()
