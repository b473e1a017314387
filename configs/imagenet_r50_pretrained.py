"""ResNet-50 on ImageNet from torchvision's pretrained weights, p = 0.37: a practical variant.

    python -m sap_jax.main --config=configs/imagenet_r50_pretrained.py \
        --config.init_from=torchvision:/path/resnet50-11ad3fa6.pth --workdir=gs://bucket/sap_r50_pt

Not the paper's protocol (supplement §A trains 90 dense epochs from scratch and starts the
search at epoch 18): the weights are already trained, so there is no dense phase
(``sap.e_start = 0``): the generator searches and the partial group lasso aligns from the first
step. The schedule, reasoned:

* 30 search/alignment epochs (a third of the paper's 90, the span its search runs after
  E_start = 18 is 72): the penalty only has to move the dropped channels, not train the network,
  and the weights start where the paper's alignment would end its dense phase;
* LR 0.01 (batch 256), x0.1 at epoch 20: a tenth of the from-scratch 0.1, the usual fine-tuning
  rate for pretrained weights, so the search does not first wreck what was learned;
* fine-tuning 40 epochs, LR 0.01 x0.1 at 20 and 30: the extracted model starts close to a good
  one (the aligned channels carried little), so less than the paper's 100.

The weights are the ones torchvision ships for ``resnet50`` (v1 or v2 recipes both convert);
``init_from`` may also name a sap_jax saved model or workdir.
"""

from configs import default, imagenet_r50


def get_config():
    c = imagenet_r50.get_config()
    c.init_from = ""  # required: pass --config.init_from=torchvision:/path/resnet50.pth
    c.num_epochs = 30
    c.sap.e_start = 0  # no dense phase: the weights are trained
    c.optim = default.optimizer(0.01, (20,))
    c.optim.base_batch_size = 256
    c.finetune = default.optimizer(0.01, (20, 30))
    c.finetune.base_batch_size = 256
    c.finetune.num_epochs = 40
    return c
