"""Does jax2onnx convert sap_jax's exported models? (an evaluation, run in its own venv)

jax2onnx 0.17.1 requires orbax-checkpoint < 0.11.37, which our constraints.txt cannot take, so
this runs in a separate venv, with orbax resolved by pip:

    python3 -m venv /tmp/onnxv
    grep -v orbax-checkpoint constraints.txt > /tmp/onnx_constraints.txt
    /tmp/onnxv/bin/pip install -c /tmp/onnx_constraints.txt -e . jax2onnx==0.17.1
    /tmp/onnxv/bin/python benchmarks/onnx_probe.py [--pruned DIR ...] [--no-materialize]
        [--no-fold]

For each model (a saved model directory or workdir given with --pruned, plus a random
ResNet-18 and MobileNetV2 at 64 px) it builds the serving function ``sap_jax.export`` exports
(normalisation baked in, BNs folded unless --no-fold), converts it with ``jax2onnx.to_onnx``
(symbolic batch), runs it in onnxruntime and prints the largest relative difference from the
JAX logits, or the converter's error. ``--no-materialize`` replaces the XLA:CPU fusion barrier
(``models.common.materialize``, a ``lax.platform_dependent``) by the identity, to see what
else stops the converter. The decision it informed: docs/design.md, "A lean core".
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pruned", nargs="*", default=[], help="saved models or run workdirs")
    ap.add_argument("--no-materialize", action="store_true")
    ap.add_argument("--no-fold", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort
    from jax2onnx import to_onnx

    from sap_jax import export, models, surgery
    from sap_jax.models import blocks, common

    if args.no_materialize:
        common.materialize = blocks.materialize = lambda x, anchor: x
    tmp = tempfile.mkdtemp()
    dirs = [export.resolve(d) for d in args.pruned]
    for name in ("resnet18", "mobilenet_v2"):
        d = f"{tmp}/{name}"
        surgery.save(d, models.create(name), image_size=64, metadata={"input": {
            "mean": [0.5] * 3, "std": [0.25] * 3, "pixel_range": [0, 1], "image_size": 64}})
        dirs.append(d)
    for d in dirs:
        t0 = time.perf_counter()
        try:
            fn, contract = export.serving_fn(d, fold_bn=not args.no_fold)
            size = contract["image_size"]
            x = np.random.default_rng(0).uniform(0, 1, (3, size, size, 3)).astype(np.float32)
            want = np.asarray(jax.jit(fn)(x))
            t0 = time.perf_counter()
            proto = to_onnx(fn, [("B", size, size, 3)], model_name="sap_jax")
        except Exception as e:  # noqa: BLE001 - report whatever the converter raises
            print(f"{d}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        sess = ort.InferenceSession(proto.SerializeToString())
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"{d} ({contract['class']}): converted in {time.perf_counter() - t0:.1f} s, "
              f"onnxruntime vs JAX max relative difference {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
