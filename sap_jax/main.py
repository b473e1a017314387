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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint step at INFO; keep our progress readable.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
    from sap_jax import parallel

    parallel.initialize_distributed()  # before any other JAX call; no-op on one host
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
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
