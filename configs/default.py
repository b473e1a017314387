"""Default configuration. The training issue extends it into the full SAP schedule.

Usage (today): python -m sap_jax.info --model=resnet56
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "resnet56"  # a name from sap_jax.models.names()
    c.image_size = 32  # input height = width; a multiple of the model's total stride
    return c
