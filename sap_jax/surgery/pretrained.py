"""Start from weights someone already trained: torchvision ``.pth``/``.safetensors`` files and
sap_jax's own.

``init_from`` (a config field, or :func:`load_into`) names the source:

* ``"torchvision:/path/resnet50.pth"`` or ``"torchvision:/path/model.safetensors"``: a
  torchvision ResNet-18/34/50/101 or MobileNetV2 ``state_dict`` (or a ``.pth`` checkpoint dict
  holding one under ``state_dict``/``model``; a ``module.`` prefix from DataParallel is
  dropped), converted
  to the matching built-in model: OIHW kernels to HWIO, linear weights transposed, BN
  ``weight/bias/running_mean/running_var`` to ``scale/bias/mean/var``. Nothing else needs
  changing: the built-in models already follow torchvision where it matters for the logits
  (ResNet v1.5's stride on the 3x3 conv, PyTorch's symmetric ``kernel // 2`` padding where
  XLA's ``SAME`` would pad a stride-2 conv asymmetrically, max-pool padding 1, BN
  epsilon 1e-5). timm's ResNets use the same names (``timm/resnet50.tv_in1k`` is such a
  ``.safetensors``). ``num_batches_tracked`` and other integer entries are ignored. Neither
  format needs PyTorch: ``.safetensors`` is read with ``safetensors``, ``.pth`` with
  :mod:`sap_jax.surgery.torchfile`, which unpickles tensors and plain containers only and
  refuses anything else without running it.
* ``"sap_jax:/path"``: a model saved by :func:`sap_jax.surgery.save` (a directory with
  ``model.json``), or a run's workdir (the weights of its latest checkpoint).

Every tensor of the model must come from the source with its exact shape; the first that does
not is named in a :class:`PretrainedError` (exit code 2 from ``sap_jax.main``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sap_jax.runtime.errors import ConfigError
from sap_jax.structure import groups as G
from sap_jax.structure import slicing
from sap_jax.surgery import torchfile

SOURCES = ("torchvision", "sap_jax")
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class PretrainedError(ConfigError):
    """Weights that cannot start this model; the message names the tensor or the file."""


def parse(spec: str) -> tuple[str, str]:
    """``"kind:path"`` -> ``(kind, path)``, or a PretrainedError saying how to write it."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in SOURCES or not path:
        raise PretrainedError(f"init_from = {spec!r}: write 'torchvision:/path/model.pth' or "
                              f"'sap_jax:/path/workdir_or_saved_model'.")
    return kind, os.path.expanduser(path)


# --------------------------------------------------------------------------
# torchvision names -> ours
# --------------------------------------------------------------------------

def _conv(tv: str, ours: G.Path) -> dict[str, tuple[G.Path, str]]:
    return {f"{tv}.weight": (ours + ("kernel",), "conv")}


def _bn(tv: str, ours: G.Path) -> dict[str, tuple[G.Path, str]]:
    return {f"{tv}.{k}": (ours + (v,), "vector") for k, v in _BN.items()}


def _resnet_names(model) -> dict[str, tuple[G.Path, str]]:
    names = {**_conv("conv1", ("stem_conv",)), **_bn("bn1", ("stem_bn",))}
    for path, block in model.blocks():
        _, s, i = path
        tv, ours = f"layer{s + 1}.{i}", G.as_path(path)
        for j in (1, 2, 3) if model.block == "bottleneck" else (1, 2):
            names.update(_conv(f"{tv}.conv{j}", ours + (f"conv{j}",)))
            names.update(_bn(f"{tv}.bn{j}", ours + (f"bn{j}",)))
        if block.projects:
            names.update(_conv(f"{tv}.downsample.0", ours + ("down_conv",)))
            names.update(_bn(f"{tv}.downsample.1", ours + ("down_bn",)))
    names["fc.weight"], names["fc.bias"] = (
        (("head", "kernel"), "linear"), (("head", "bias"), "vector"))
    return names


def _mobilenet_v2_names(model) -> dict[str, tuple[G.Path, str]]:
    names = {**_conv("features.0.0", ("stem_conv",)), **_bn("features.0.1", ("stem_bn",))}
    blocks = list(model.blocks())
    for j, (path, block) in enumerate(blocks):
        tv, ours = f"features.{j + 1}.conv", G.as_path(path)
        layers = ([("0.0", "expand_conv"), ("0.1", "expand_bn"), ("1.0", "dw_conv"),
                   ("1.1", "dw_bn"), ("2", "project_conv"), ("3", "project_bn")]
                  if block.expand else
                  [("0.0", "dw_conv"), ("0.1", "dw_bn"), ("1", "project_conv"),
                   ("2", "project_bn")])
        for k, name in layers:
            add = _bn if name.endswith("_bn") else _conv
            names.update(add(f"{tv}.{k}", ours + (name,)))
    last = f"features.{len(blocks) + 1}"
    names.update({**_conv(f"{last}.0", ("last_conv",)), **_bn(f"{last}.1", ("last_bn",))})
    names["classifier.1.weight"] = (("head", "kernel"), "linear")
    names["classifier.1.bias"] = (("head", "bias"), "vector")
    return names


def _is_weight(name: str, value) -> bool:
    """A floating-point tensor: ``num_batches_tracked`` and other integer entries are not."""
    if hasattr(value, "is_floating_point"):  # a torch tensor, passed in directly
        floating = bool(value.is_floating_point())
    else:
        dtype = np.asarray(value).dtype
        floating = dtype.kind == "f" or dtype == ml_dtypes.bfloat16
    return floating and not name.endswith("num_batches_tracked")


def torchvision_arrays(state_dict: Mapping[str, Any], model
                       ) -> tuple[dict[G.Path, np.ndarray], dict[G.Path, str]]:
    """A torchvision ``state_dict`` as ``model``'s arrays by path (HWIO kernels), and the
    torchvision name of each."""
    from sap_jax import models as M

    if isinstance(model, M.ResNet):
        names = _resnet_names(model)
    elif isinstance(model, M.MobileNetV2):
        names = _mobilenet_v2_names(model)
    else:
        raise PretrainedError(f"torchvision weights convert to ResNet-18/34/50/101 and "
                              f"MobileNetV2 only, not to a {type(model).__name__}.")
    given = {k: v for k, v in state_dict.items() if _is_weight(k, v)}
    unused = sorted(set(given) - set(names))
    if unused:
        raise PretrainedError(f"the torchvision state_dict has {len(unused)} tensor(s) this "
                              f"{type(model).__name__} has no place for, e.g. {unused[0]!r}: is "
                              f"it the same architecture (model = ...)?")
    out, source = {}, {}
    for tv, (path, kind) in names.items():
        if tv not in given:
            raise PretrainedError(f"the torchvision state_dict lacks {tv!r} (for "
                                  f"{'/'.join(path)}): is it the same architecture?")
        a = np.asarray(given[tv].detach().cpu().numpy() if hasattr(given[tv], "detach")
                       else given[tv]).astype(np.float32)
        if kind == "conv" and a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO (a depthwise O,1,H,W -> H,W,1,O)
        elif kind == "linear" and a.ndim == 2:
            a = a.T
        out[path], source[path] = a, tv
    return out, source


def file_format(path: str) -> str | None:
    """``"safetensors"``, ``"pth"`` (a PyTorch zip), ``"pth-legacy"`` (PyTorch's pre-1.6
    format, which :func:`read_torch` refuses naming the fix) or None, from the file's first
    bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if torchfile.is_pytorch_zip(path):
        return "pth"
    return "pth-legacy" if torchfile.is_legacy(path) else None


def read_torch(path: str) -> Mapping[str, Any]:
    """The state_dict in a ``.pth`` or ``.safetensors`` file, as NumPy arrays (a ``.pth`` may
    hold it under ``state_dict``/``model``); without PyTorch."""
    if not os.path.isfile(path):
        raise PretrainedError(f"init_from: {path} is not a file.")
    fmt = file_format(path)
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            obj = load_file(path)
        except (SafetensorError, ValueError, OSError) as e:
            raise PretrainedError(f"init_from: cannot read {path} as .safetensors "
                                  f"({type(e).__name__}: {e}).") from e
    elif fmt in ("pth", "pth-legacy"):
        try:
            obj = torchfile.load(path)
        except torchfile.TorchFileError as e:
            raise PretrainedError(f"init_from: {e}") from e
    else:
        raise PretrainedError(f"init_from: {path} is neither a PyTorch .pth (zip) file nor "
                              ".safetensors.")
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"init_from: {path} holds a {type(obj).__name__}, not a state_dict.")
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from DataParallel
    return obj


# --------------------------------------------------------------------------
# sap_jax's own weights
# --------------------------------------------------------------------------

def sap_jax_arrays(path: str) -> dict[G.Path, np.ndarray]:
    """The arrays of a saved model directory, or of a workdir's latest checkpoint."""
    from flax import traverse_util

    from sap_jax import surgery

    if not os.path.isdir(path):
        raise PretrainedError(f"init_from: {path} is not a directory (a saved model or a workdir).")
    if surgery.is_saved_model(path):
        return slicing.flat_arrays(surgery.load(path))
    ckpt_dir = os.path.join(path, surgery.CKPT_DIR)
    steps = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) if os.path.isdir(
        ckpt_dir) else []
    if not steps:
        raise PretrainedError(f"init_from: {path} holds neither a saved model (model.json) nor "
                              f"a run's checkpoints ({surgery.CKPT_DIR}/).")
    import orbax.checkpoint as ocp
    try:
        with ocp.CheckpointManager(ckpt_dir) as mgr:
            state = mgr.restore(steps[-1], args=ocp.args.Composite(
                state=ocp.args.StandardRestore()))["state"]
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable data
        raise PretrainedError(f"init_from: cannot read checkpoint {steps[-1]} in {ckpt_dir} "
                              f"({type(e).__name__}: {e}).") from e
    flat = {}
    for part in ("params", "rest"):
        flat.update({G.as_path(k): np.asarray(v) for k, v in
                     traverse_util.flatten_dict(dict(state[part])).items()})
    return flat


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

def source_arrays(spec: str, model) -> tuple[dict[G.Path, np.ndarray], dict[G.Path, str]]:
    """The source's arrays by the model's paths, and their names in the source where those
    differ (torchvision's)."""
    kind, path = parse(spec)
    if kind == "torchvision":
        return torchvision_arrays(read_torch(path), model)
    return sap_jax_arrays(path), {}


def load_into(model, spec: str) -> int:
    """Replace every array of ``model`` (in place) by the source's; returns how many.

    Raises :class:`PretrainedError` naming the first tensor the source lacks, has in
    another shape, or has that the model does not.
    """
    flat, names = source_arrays(spec, model)
    return load_arrays(model, flat, names, spec)


def load_arrays(model, flat: dict[G.Path, np.ndarray], names: dict[G.Path, str] | None = None,
                source: str = "the source") -> int:
    """:func:`load_into` for arrays already keyed by the model's paths (``names``: what the
    source calls them, for messages). Nothing is written unless every tensor fits."""
    names = names or {}
    mine = slicing.flat_arrays(model)

    def label(p):
        return f"{'/'.join(p)}" + (f" (torchvision {names[p]!r})" if p in names else "")

    for p, a in mine.items():
        if p not in flat:
            raise PretrainedError(f"init_from {source}: the source has no tensor for "
                                  f"{'/'.join(p)} of this {type(model).__name__}.")
        if tuple(np.shape(flat[p])) != tuple(np.shape(a)):
            raise PretrainedError(f"init_from {source}: tensor {label(p)} has shape "
                                  f"{tuple(np.shape(flat[p]))}, the model needs "
                                  f"{tuple(np.shape(a))} (a different model or widths?).")
    extra = sorted(set(flat) - set(mine))
    if extra:
        raise PretrainedError(f"init_from {source}: tensor {label(extra[0])} has no place in "
                              f"this {type(model).__name__} ({len(extra)} such tensors).")
    slicing.set_arrays(model, flat)
    return len(mine)
