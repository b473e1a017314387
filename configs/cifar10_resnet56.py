"""ResNet-56 on CIFAR-10, p = 0.48, E_start = 40 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/cifar10_resnet56.py --workdir=/tmp/sap_r56
"""

from configs import default


def get_config():
    return default.get_config()  # the defaults are this setting
