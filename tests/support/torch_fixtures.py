"""The NumPy side of the committed PyTorch fixtures (tests/fixtures/torch/): the arrays each
fixture was made from, regenerated from seeds, so the tests know what a file must hold
without torch. ``tests/fixtures/torch/make.py`` (run once, with torch) uses the same
functions to write the files."""

from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "torch"
#: torchvision models whose eval logits on seeded weights are committed.
TORCHVISION_MODELS = ("resnet18", "mobilenet_v2", "resnet50")
INPUT_SHAPE = (2, 3, 64, 64)  # NCHW, as torchvision takes it


def base() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)


def tiny_expected() -> dict[str, np.ndarray]:
    """What ``tiny.pth``'s ``state_dict`` holds, by name: every dtype torchvision files use,
    views (a transpose, a slice at an offset into a shared storage), a parameter, a 0-d and
    an empty tensor."""
    b = base()
    return {
        "f32": b, "f32_t": b.T, "f32_slice": b[1:3, 2:],
        "f16": b.astype(np.float16), "bf16": b.astype(ml_dtypes.bfloat16),
        "f64": b.astype(np.float64) * 2, "i64": np.arange(12, dtype=np.int64).reshape(3, 4),
        "i32": np.arange(-3, 3, dtype=np.int32), "i8": np.arange(-4, 4, dtype=np.int8),
        "u8": np.arange(250, 256, dtype=np.uint8), "bool": np.array([True, False, True]),
        "param": b[::-1].copy() + 1, "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32), "bn.num_batches_tracked": np.array(7, np.int64),
    }


def manifest(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """torchvision ``name``'s state_dict as (key, shape, dtype), in order (recorded by make.py)."""
    return [(k, tuple(s), d) for k, s, d in json.loads((FIXTURES / f"{name}.json").read_text())]


def seeded_state_dict(entries) -> dict[str, np.ndarray]:
    """Weights for every entry, from NumPy seeds: He-scaled conv/linear weights, non-trivial BN
    affine and statistics (so every tensor changes the logits), small biases."""
    out = {}
    for i, (key, shape, dtype) in enumerate(entries):
        rng = np.random.default_rng([17, i])
        if dtype == "int64":
            out[key] = np.array(rng.integers(0, 100), np.int64).reshape(shape)
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) > 1:  # conv or linear
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif leaf == "running_var":
            a = rng.uniform(0.5, 2.0, shape)
        elif leaf == "weight":  # BN scale
            a = rng.uniform(0.5, 1.5, shape)
        else:  # BN bias, running_mean, linear bias
            a = rng.uniform(-0.5, 0.5, shape)
        out[key] = a.astype(np.float32)
    return out


def seeded_input() -> np.ndarray:
    return np.random.default_rng(5).uniform(-2, 2, INPUT_SHAPE).astype(np.float32)
