"""ResNet-34 on ImageNet, p = 0.54, E_start = 18 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/imagenet_r34.py --workdir=gs://bucket/sap_r34

Same schedule as configs/imagenet_r50.py.
"""

from configs import imagenet_r50


def get_config():
    c = imagenet_r50.get_config()
    c.model = "resnet34"
    c.budget.p = 0.54
    # The paper's budget: metric "macs" (default). budget.round_to = 0 (default) rounds kept
    # widths on GPUs and CPUs (8) and TPUs (128) so the cut model is not slower than dense; the
    # paper's unrounded architecture on every backend: --config.budget.round_to=1.
    return c
