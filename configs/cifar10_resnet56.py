"""ResNet-56 on CIFAR-10, p = 0.48, E_start = 40 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/cifar10_resnet56.py --workdir=/tmp/sap_r56
"""

from configs import default


def get_config():
    # The defaults are this setting. The paper's budget: metric "macs" (default).
    # budget.round_to = 0 (default) rounds kept widths on GPUs and CPUs (8) and TPUs (128) so
    # the cut model is not slower than dense; the paper's unrounded architecture:
    # --config.budget.round_to=1.
    return default.get_config()
