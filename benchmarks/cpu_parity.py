"""JAX vs PyTorch eager: one CIFAR ResNet-56 train step on the CPU (a benchmark, not a test).

    pip install torch==2.13.0        # benchmark-only; a CPU build installs here
    python benchmarks/cpu_parity.py [--batch 128] [--steps 5] [--depth 56] [--jax-only]

Both sides run the same network (3 stages of (depth-2)/6 basic blocks, widths
16/32/64, shortcut A: stride-2 subsampling plus zero channel padding, BN,
ReLU, global pooling, a linear classifier) and the same step: forward,
softmax cross-entropy, backward, SGD with momentum 0.9 and weight decay
5e-4, BN running statistics updated. fp32, NHWC for JAX (its native layout),
NCHW for PyTorch (its native layout). The JAX step is the trainer's own
``make_train_step`` without the penalty. Each framework runs in its own
process, alternating for ``--rounds`` rounds; medians and minima of all timed
steps (two warm-up steps per process excluded) are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import optax
from harness import train_step_runner


def jax_step(depth: int, batch: int):
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    return train_step_runner(f"resnet{depth}", batch, 32, tx)


def torch_step(depth: int, batch: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            s = x
            if self.stride != 1 or self.pad:
                s = x[:, :, ::self.stride, ::self.stride]
                s = nn.functional.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return torch.relu(y + s)

    n = (depth - 2) // 6
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for i, w in enumerate((16, 32, 64)):
        for j in range(n):
            layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    net = nn.Sequential(*layers).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    return run, torch.__version__, torch.get_num_threads()


def _worker(framework: str, depth: int, batch: int, steps: int) -> list[float]:
    """Time ``steps`` steps of one framework after two warm-up steps."""
    run = jax_step(depth, batch) if framework == "jax" else torch_step(depth, batch)[0]
    run()
    run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def _spawn(framework: str, args) -> list[float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework,
           "--depth", str(args.depth), "--batch", str(args.batch), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; each runs every framework once, in its own process")
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--jax-only", action="store_true", help="skip PyTorch (not installed)")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # child process: time one framework, print the step times
        print(json.dumps(_worker(args.worker, args.depth, args.batch, args.steps)))
        return {}
    frameworks = ["jax"]
    info = {"jax": jax.__version__}
    if not args.jax_only:
        try:
            import torch
        except ImportError:
            raise SystemExit(
                "PyTorch is not installed: pip install torch==2.13.0, or pass --jax-only"
            ) from None
        frameworks.append("torch")
        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    # Separate processes, alternating: interleaving the two in one process made
    # JAX's steps 1.3-1.7x slower than alone (cause not isolated;
    # OMP_WAIT_POLICY=PASSIVE did not change it).
    times = {k: [] for k in frameworks}
    for _ in range(args.rounds):
        for k in frameworks:
            times[k] += _spawn(k, args)
    r = {"depth": args.depth, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
         **info,
         "median_s": {k: statistics.median(v) for k, v in times.items()},
         "min_s": {k: min(v) for k, v in times.items()}}
    print(f"ResNet-{args.depth}, batch {args.batch}, 32px, fp32, CPU; median of "
          f"{args.rounds} x {args.steps} steps")
    for k in frameworks:
        print(f"  {k:<6} {r['median_s'][k]:.4f} s/step  "
              f"{args.batch / r['median_s'][k]:8.1f} images/s")
    if "torch" in times:
        r["jax_over_torch"] = r["median_s"]["jax"] / r["median_s"]["torch"]
        print(f"  JAX time / PyTorch time: {r['jax_over_torch']:.3f} (minima "
              f"{r['min_s']['jax'] / r['min_s']['torch']:.3f})")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
