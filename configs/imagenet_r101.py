"""ResNet-101 on ImageNet, p = 0.41, E_start = 18 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/imagenet_r101.py --workdir=gs://bucket/sap_r101

Same schedule as configs/imagenet_r50.py.
"""

from configs import imagenet_r50


def get_config():
    c = imagenet_r50.get_config()
    c.model = "resnet101"
    c.budget.p = 0.41
    return c
