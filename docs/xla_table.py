from sap_jax import models
from sap_jax.structure import flops
for name in ["resnet56", "resnet110", "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v2_cifar"]:
    size = models.get_preset(name).image_size
    m = models.create_abstract(name)
    s = m.structure(size)
    std = flops.count(s).macs; valid = flops.count(s, count_padding=False).macs
    raw = flops.xla_forward_flops(m, size, optimized=False); comp = flops.xla_forward_flops(m, size)
    print(f"| {name} | {std/1e6:.2f}M | {valid/1e6:.2f}M | {(raw-2*valid)/flops.activations(s):.2f} | {comp/(2*std):.3f} |")
