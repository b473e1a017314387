"""MobileNetV2 (CIFAR variant) on CIFAR-10, p = 0.54, E_start = 40 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/cifar10_mobilenetv2.py --workdir=/tmp/sap_mbv2_c10
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "mobilenet_v2_cifar"
    c.budget.p = 0.54
    return c
