"""Starting from trained weights: torchvision state_dicts and sap_jax's own saved models."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize, slow
from conftest import tiny_config as tiny

from sap_jax import models, surgery
from sap_jax.runtime.errors import ConfigError
from sap_jax.structure import slicing
from sap_jax.surgery import pretrained
from sap_jax.train import config as config_lib

TORCHVISION = ["resnet18", "mobilenet_v2"] + slow(["resnet34", "resnet50", "resnet101"])


def _as_torchvision(model) -> dict[str, np.ndarray]:
    """``model``'s arrays in torchvision's names and layouts (OIHW kernels, (out, in) linears),
    built from the name table in reverse: what a torchvision checkpoint of it would hold."""
    names = (pretrained._resnet_names(model) if isinstance(model, models.ResNet)
             else pretrained._mobilenet_v2_names(model))
    flat = slicing.flat_arrays(model)
    out = {}
    for tv, (path, kind) in names.items():
        a = np.asarray(flat[path])
        out[tv] = a.transpose(3, 2, 0, 1) if kind == "conv" else (a.T if kind == "linear" else a)
        if tv.endswith("running_var"):
            out[tv[:-len("running_var")] + "num_batches_tracked"] = np.int64(7)
    return out


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_bottleneck_tiny", "mobilenet_v2_tiny"])
def test_torchvision_names_cover_every_tensor_and_round_trip(name):
    """Without torch: every tensor of the model has exactly one torchvision name, and the
    layouts convert back to the very same arrays."""
    model = randomize(models.create(name), seed=0)
    arrays, names = pretrained.torchvision_arrays(_as_torchvision(model), model)
    mine = slicing.flat_arrays(model)
    assert set(arrays) == set(mine) and len(set(names.values())) == len(mine)
    for p, a in mine.items():
        assert np.array_equal(arrays[p], np.asarray(a)), p


def test_a_mismatched_state_dict_names_the_tensor():
    model = models.create("resnet_tiny")
    sd = _as_torchvision(model)
    sd["layer2.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    arrays, names = pretrained.torchvision_arrays(sd, model)
    with pytest.raises(pretrained.PretrainedError, match=r"layer2\.0\.conv1\.weight.*has shape"):
        pretrained.load_arrays(models.create("resnet_tiny"), arrays, names)
    sd = _as_torchvision(model)
    sd["layer9.0.conv1.weight"] = sd.pop("layer2.0.conv1.weight")
    with pytest.raises(pretrained.PretrainedError, match="layer9.0.conv1.weight"):
        pretrained.torchvision_arrays(sd, model)


_TORCHVISION_SIDE = """
import sys, numpy as np, torch, torchvision.models as tvm
name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
net = getattr(tvm, name)(weights=None)
with torch.no_grad():  # non-trivial BN statistics and affine, so every tensor matters
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.5, 0.5)
net.eval()
torch.save(net.state_dict(), out + "/w.pth")
x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
with torch.no_grad():
    np.save(out + "/logits.npy", net(torch.from_numpy(x)).numpy())
np.save(out + "/x.npy", x)
"""


@pytest.mark.parametrize("name", TORCHVISION)
def test_converted_torchvision_models_match_torchvision_logits(tmp_path, name):
    """A randomly initialised torchvision model (random BN statistics too), its .pth loaded
    through init_from's path: torchvision's own eval logits within 1e-4 relative. torchvision
    runs in a fresh interpreter: its triton import crashes next to TensorFlow."""
    pytest.importorskip("torch", reason="the optional extra [torch] is not installed")
    r = subprocess.run([sys.executable, "-c", _TORCHVISION_SIDE, name, str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model = models.create(name)
    assert pretrained.load_into(model, f"torchvision:{tmp_path / 'w.pth'}") > 0
    model.eval()
    x, want = np.load(tmp_path / "x.npy"), np.load(tmp_path / "logits.npy")
    got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name}: max |jax - torch| / max |torch| = {err:.2e}")
    assert err < 1e-4


def test_a_damaged_pth_file_is_named(tmp_path):
    pytest.importorskip("torch", reason="the optional extra [torch] is not installed")
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(pretrained.PretrainedError, match=r"cannot read .*w\.pth as a PyTorch file"):
        pretrained.load_into(models.create("resnet_tiny"), f"torchvision:{tmp_path / 'w.pth'}")


def test_a_saved_sap_jax_model_starts_another(tmp_path):
    src = randomize(models.create("resnet_tiny"), seed=3)
    surgery.save(tmp_path / "dense", src, image_size=32)
    dst = models.create("resnet_tiny")
    assert (pretrained.load_into(dst, f"sap_jax:{tmp_path / 'dense'}")
            == len(slicing.flat_arrays(src)))
    src.eval(), dst.eval()
    x = jnp.ones((1, 32, 32, 3))
    assert np.array_equal(np.asarray(src(x)), np.asarray(dst(x)))
    wrong = models.create("resnet_tiny", widths=[2, 8, 8, 16])
    with pytest.raises(pretrained.PretrainedError,
                       match=r"tensor stages/0/0/\S+ has shape \(4,.*needs \(2,"):
        pretrained.load_into(wrong, f"sap_jax:{tmp_path / 'dense'}")


def test_init_from_is_validated_before_anything_runs(tmp_path):
    for value, msg in (("resnet50.pth", "write 'torchvision:"),
                       (f"sap_jax:{tmp_path / 'none'}", "is not a directory"),
                       (f"torchvision:{tmp_path / 'none.pth'}", "is not a file")):
        with pytest.raises(ConfigError, match=msg):
            config_lib.validate(tiny(init_from=value), device_count=1, process_count=1)
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match="convert to the ImageNet ResNets and MobileNetV2"):
        config_lib.validate(tiny(init_from=f"torchvision:{tmp_path / 'w.pth'}"), device_count=1,
                            process_count=1)


@pytest.mark.slow
def test_a_run_starts_from_the_given_weights_and_a_mismatch_exits_2(tmp_path):
    """The run's first evaluation (before any step) is the source model's accuracy on the
    same test split; a source of other widths stops with exit 2 naming the tensor."""
    from sap_jax.train import data

    c = tiny()
    src = randomize(models.create(c.model, num_classes=10), seed=4)
    surgery.save(tmp_path / "src", src, image_size=c.image_size)
    ds = data.load(c.dataset, image_size=c.image_size, seed=c.seed, val_size=c.val_size)
    src.eval()
    correct = total = 0
    for b in ds.eval_batches(c.eval_batch_size, "test"):  # normalised; the last batch masked
        logits = src(jnp.asarray(b["image"], jnp.float32))
        hit = np.argmax(np.asarray(logits), -1) == np.asarray(b["label"])
        correct += int((hit * b["mask"]).sum())
        total += int(b["mask"].sum())
    cmd = [sys.executable, "-m", "sap_jax.main", "--config=tests/support/tiny_config.py",
           f"--workdir={tmp_path / 'run'}", f"--config.init_from=sap_jax:{tmp_path / 'src'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["init_from"]["test_acc"] == pytest.approx(correct / total, abs=1e-9)
    other = models.create(c.model, num_classes=10, widths=[1] * src.num_groups)
    surgery.save(tmp_path / "small", other, image_size=c.image_size)
    cmd[-2:] = [f"--workdir={tmp_path / 'run2'}",
                f"--config.init_from=sap_jax:{tmp_path / 'small'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and "tensor stages/0/0/" in r.stderr and "has shape" in r.stderr, (
        r.stderr[-2000:])
