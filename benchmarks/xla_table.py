"""The MAC count against XLA's own FLOP count, per dense preset: the table of docs/design.md
("MACs against XLA").

    python benchmarks/xla_table.py
"""

from sap_jax import models
from sap_jax.structure import flops

PRESETS = ["resnet56", "resnet110", "resnet18", "resnet34", "resnet50", "resnet101",
           "mobilenet_v2", "mobilenet_v2_cifar"]


def main() -> None:
    print("| model | MACs | MACs w/o padding taps | extra FLOPs per conv output (pre-opt) "
          "| compiled / (2·MACs) |")
    print("|---|---|---|---|---|")
    for name in PRESETS:
        size = models.get_preset(name).image_size
        m = models.create_abstract(name)
        s = m.structure(size)
        std = flops.count(s).macs
        valid = flops.count(s, count_padding=False).macs
        raw = flops.xla_forward_flops(m, size, optimized=False)
        comp = flops.xla_forward_flops(m, size)
        print(f"| {name} | {std / 1e6:.2f}M | {valid / 1e6:.2f}M | "
              f"{(raw - 2 * valid) / flops.activations(s):.2f} | {comp / (2 * std):.3f} |")


if __name__ == "__main__":
    main()
