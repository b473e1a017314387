"""Run SAP end to end: ``python -m sap_jax.main --config=configs/NAME.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g.
``--config.num_epochs=3 --config.sap.p=0.5``. Rerunning with the same
workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results and plots.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: HOST:PORT of process 0. Not needed on Cloud TPU or under Slurm.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes in the job.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
flags.DEFINE_float("distributed_timeout_s", 300.0,
                   "Multi-process: how long start-up waits for every process before giving up.")
flags.mark_flags_as_required(["config", "workdir"])

#: Exit codes: 0 done; 2 bad config, missing dataset or non-finite loss (message on stderr);
#: 3 the multi-process job could not form (parallel.EXIT_DISTRIBUTED_SETUP).
EXIT_BAD_INPUT = 2


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint step at INFO; keep our progress readable.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
    from sap_jax import parallel

    try:  # before any other JAX call; a no-op on one host
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, timeout_s=FLAGS.distributed_timeout_s)
    except parallel.DistributedSetupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(parallel.EXIT_DISTRIBUTED_SETUP)
    import jax

    from sap_jax import config as config_lib
    from sap_jax import data as data_lib
    from sap_jax import train

    # TensorFlow (input pipeline only) must not grab accelerators.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # noqa: BLE001 - TF absent or already initialised: nothing to hide
        pass
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, data_lib.DatasetNotPrepared, train.NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    app.run(main)
