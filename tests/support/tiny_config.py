"""A seconds-long run through every phase, for tests (tiny model, few steps).

A test fixture, not a user config; it imports ``configs``, so run from the repository root:

    python -m sap_jax.main --config=tests/support/tiny_config.py --workdir=/tmp/sap_tiny
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet_cifar_tiny"
    c.dataset = "digits"
    c.image_size = 16
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 3
    c.steps_per_epoch = 4  # cap: 4 steps per epoch
    c.optim = default.optimizer(0.05, (2,))
    c.optim.base_batch_size = 16
    c.budget.p = 0.5
    c.sap.e_start = 1
    c.sap.gamma = 1e-2
    c.sap.agn_every = 2
    c.agn.batch_size = 16
    c.agn.learning_rate = 1e-2
    c.finetune = default.optimizer(0.02, ())
    c.finetune.base_batch_size = 16
    c.finetune.num_epochs = 2
    c.log_every_steps = 2
    c.plots = False
    c.speed.enabled = False  # tests that time inference turn it on
    c.val_size = 16
    c.cut.bn_batches = 2
    return c
