"""MobileNetV2 (CIFAR variant) on CIFAR-10, p = 0.54, E_start = 40 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/cifar10_mobilenetv2.py --workdir=/tmp/sap_mbv2_c10
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "mobilenet_v2_cifar"
    c.budget.p = 0.54
    # The paper's budget: metric "macs" (default). budget.round_to = 0 (default) rounds kept
    # widths on GPUs and CPUs (8) and TPUs (128) so the cut model is not slower than dense; the
    # paper's unrounded architecture on every backend: --config.budget.round_to=1.
    return c
