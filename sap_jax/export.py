"""Export a saved (pruned) model for serving, without sap_jax on the other side.

    python -m sap_jax.export --pruned=DIR --format=stablehlo|savedmodel --out=OUT
        [--fold_bn=true|false]

``DIR`` is a directory written by ``surgery.save`` or a run's workdir (its ``pruned_model/``).
Both formats take a batch of RGB images, NHWC float32 with pixels in [0, 1], of any batch size,
and return the logits: the input normalisation recorded in the model's ``model.json`` is baked
in, so the caller only scales pixels to [0, 1].

* ``stablehlo``: ``OUT/model.stablehlo``, a serialized ``jax.export.Exported`` with a symbolic
  batch dimension; ``jax.export.deserialize(open(f, "rb").read()).call(images)`` runs it.
* ``savedmodel``: a TensorFlow SavedModel in ``OUT/`` (via ``jax2tf``) whose ``serve``
  signature maps ``images`` to ``logits``; TF Serving or ``tf.saved_model.load`` runs it.
  Needs the optional extra ``[tf]``; without it the command exits 2 naming the install line.

By default every BatchNorm that directly follows a conv is folded into it
(:func:`sap_jax.surgery.fold_bn`: scaled kernel, one bias; the logits agree with the unfolded
model's to float rounding); ``--fold_bn=false`` exports the BatchNorms as they are.

``OUT/export.json`` records the input contract, the model's metadata (classes, source), and
``fold_bn`` with ``folded_batch_norms``, how many BatchNorms were folded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sap_jax import surgery
from sap_jax.runtime import extras, parallel

FORMATS = ("stablehlo", "savedmodel")


def resolve(directory: str) -> str:
    """``directory`` itself if it holds a saved model, else its ``pruned_model/`` (a workdir)."""
    inner = str(parallel.path(directory) / "pruned_model")
    if not surgery.is_saved_model(directory) and surgery.is_saved_model(inner):
        return inner
    return directory


def serving_fn(directory: str, fold_bn: bool = True
               ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
    """The eval-mode forward pass of the saved model with its normalisation baked in
    (``images`` in [0, 1] -> logits), and the input contract from its model.json (with
    ``folded_batch_norms``: how many BatchNorms ``fold_bn`` folded into their convs)."""
    info = surgery.read_info(directory)
    x = (info.get("metadata") or {}).get("input")
    if x is None:
        raise ValueError(f"{directory} does not record its input normalisation (model.json's "
                         "metadata.input); re-save it with this version of sap_jax.")
    model = surgery.load(directory)
    model.eval()
    if fold_bn:
        size = x["image_size"]
        model = surgery.fold_bn(model, (1, size, size, model.in_channels))
    folded = len(surgery.folded_batch_norms(model))
    graphdef, state = nnx.split(model)
    mean = jnp.asarray(x["mean"], jnp.float32)
    std = jnp.asarray(x["std"], jnp.float32)

    def fn(images: jax.Array) -> jax.Array:
        # Fresh variables at the export's trace level: a layer that advances a stored random
        # stream (nnx.bridge modules do, even in eval mode) cannot mutate closed-over ones.
        m = nnx.merge(graphdef, state, copy=True)
        return m((images.astype(jnp.float32) - mean) / std)

    return fn, {**x, "folded_batch_norms": folded, "source": directory, "class": info["class"],
                "widths": info["widths"],
                "metadata": {k: v for k, v in (info.get("metadata") or {}).items() if k != "input"}}


def export_stablehlo(fn: Callable, size: int, out: str) -> str:
    batch = jax.export.symbolic_shape("b")[0]
    exported = jax.export.export(jax.jit(fn))(
        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
    path = os.path.join(out, "model.stablehlo")
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return path


def export_savedmodel(fn: Callable, size: int, out: str) -> str:
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(fn, polymorphic_shapes=["(b, ...)"], with_gradient=False)
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"logits": converted(images)}, autograph=False,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
    return out


def export(directory: str, fmt: str, out: str, *, fold_bn: bool = True) -> dict[str, Any]:
    """Write ``directory``'s model to ``out`` in ``fmt``, with each BatchNorm that directly
    follows a conv folded into it unless ``fold_bn`` is false; returns what export.json
    records."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}.")
    if fmt == "savedmodel":  # before any tracing
        extras.require("tf", "--format=savedmodel (jax2tf)")
    directory = resolve(directory)
    fn, contract = serving_fn(directory, fold_bn)
    os.makedirs(out, exist_ok=True)
    size = contract["image_size"]
    path = (export_stablehlo if fmt == "stablehlo" else export_savedmodel)(fn, size, out)
    record = {"format": fmt, "path": path, "input": {
        "shape": ["batch", size, size, 3], "dtype": "float32", "layout": "NHWC",
        "pixel_range": contract["pixel_range"], "normalisation": "baked in"},
        "fold_bn": bool(fold_bn), "folded_batch_norms": contract["folded_batch_norms"],
        **{k: contract[k] for k in ("num_classes", "class_names", "mean", "std", "source",
                                   "class", "widths", "metadata")}}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sap_jax.export",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--pruned", required=True, metavar="DIR",
                    help="a saved model directory, or a run's workdir (its pruned_model/)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--fold_bn", type=_flag, nargs="?", const=True, default=True,
                    metavar="true|false",
                    help="fold each BatchNorm that directly follows a conv into it (default: "
                         "true)")
    args = ap.parse_args(argv)
    try:
        record = export(args.pruned, args.format, args.out, fold_bn=args.fold_bn)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {record['class']} (widths {record['widths']}) to {record['path']}: "
          f"{record['input']['shape']} float32 images in [0, 1] -> {record['num_classes']} logits"
          f" ({record['folded_batch_norms']} BatchNorms folded into their convs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["export", "serving_fn", "resolve", "FORMATS"]
