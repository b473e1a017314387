"""MobileNetV2 on ImageNet, p = 0.65, E_start = 30 (supplement Table 1 and §A).

    python -m sap_jax.main --config=configs/imagenet_mobilenetv2.py --workdir=gs://bucket/sap_mbv2

150 epochs, cosine from 0.045, weight decay 4e-5; fine-tune 100 epochs with
the same schedule.
"""

from configs import imagenet_r50


def get_config():
    c = imagenet_r50.get_config()
    c.model = "mobilenet_v2"
    c.num_epochs = 150
    c.optim = imagenet_r50.default.optimizer(0.045, (), schedule="cosine", weight_decay=4e-5)
    c.optim.base_batch_size = 256
    c.budget.p = 0.65
    # The paper's budget: metric "macs" (default). budget.round_to = 0 (default) rounds kept
    # widths on GPUs and CPUs (8) and TPUs (128) so the cut model is not slower than dense; the
    # paper's unrounded architecture on every backend: --config.budget.round_to=1.
    c.sap.e_start = 30
    c.finetune = imagenet_r50.default.optimizer(0.045, (), schedule="cosine", weight_decay=4e-5)
    c.finetune.base_batch_size = 256
    c.finetune.num_epochs = 100
    return c
