"""Starting from trained weights: torchvision state_dicts (.safetensors and .pth, read without
torch) and sap_jax's own saved models."""

import json
import struct
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize, slow
from conftest import tiny_config as tiny
from support import torch_fixtures

from sap_jax import models, surgery
from sap_jax.runtime.errors import ConfigError
from sap_jax.structure import slicing
from sap_jax.surgery import pretrained, torchfile
from sap_jax.train import config as config_lib


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


def _write_safetensors(path, arrays):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"] + slow(["resnet50"]))
def test_torchvision_safetensors_give_torchvision_logits(tmp_path, name):
    """Seeded NumPy weights (every tensor of torchvision's state_dict, random BN statistics
    too) written as .safetensors and loaded through init_from's path: the eval logits equal
    those torchvision computed on the same weights (committed by tests/fixtures/torch/make.py)
    within 1e-4 relative. No torch here."""
    weights = torch_fixtures.seeded_state_dict(torch_fixtures.manifest(name))
    path = _write_safetensors(tmp_path / "model.safetensors", weights)
    model = models.create(name)
    assert pretrained.load_into(model, f"torchvision:{path}") == len(slicing.flat_arrays(model))
    model.eval()
    want = np.load(torch_fixtures.FIXTURES / f"{name}_logits.npy")
    got = np.asarray(model(jnp.asarray(torch_fixtures.seeded_input().transpose(0, 2, 3, 1))))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name}: max |jax - torchvision| / max |torchvision| = {err:.2e}")
    assert err < 1e-4


def test_a_safetensors_with_a_wrong_or_missing_tensor_names_it(tmp_path):
    model = models.create("resnet_tiny")
    sd = _as_torchvision(randomize(model, seed=1))
    assert pretrained.load_into(models.create("resnet_tiny"), "torchvision:" + str(
        _write_safetensors(tmp_path / "ok.safetensors", sd))) > 0
    bad = dict(sd, **{"layer1.0.bn2.running_var": np.ones(3, np.float32)})
    with pytest.raises(pretrained.PretrainedError,
                       match=r"layer1\.0\.bn2\.running_var.*has shape \(3,\)"):
        pretrained.load_into(model, "torchvision:" + str(
            _write_safetensors(tmp_path / "bad.safetensors", bad)))
    sd.pop("fc.bias")
    with pytest.raises(pretrained.PretrainedError, match=r"lacks 'fc\.bias'"):
        pretrained.load_into(model, "torchvision:" + str(
            _write_safetensors(tmp_path / "missing.safetensors", sd)))


def test_a_genuine_pth_reads_without_torch():
    """tiny.pth, written by torch.save: every dtype torchvision files use, a transposed view and
    a slice at an offset into one shared storage, a Parameter, 0-d and empty tensors, and the
    checkpoint's plain values."""
    obj = torchfile.load(torch_fixtures.FIXTURES / "tiny.pth")
    assert {k: v for k, v in obj.items() if k not in ("state_dict", "bn")} == {
        "epoch": 3, "arch": "tiny", "best": 0.5, "names": ["a", "b"], "shape": (1, 2)}
    bn = obj["bn"]  # BatchNorm1d(3).state_dict(): its _metadata comes through BUILD
    assert bn._metadata == {"": {"version": 2}}
    assert [(k, v.dtype.name, v.shape) for k, v in bn.items()] == [
        ("weight", "float32", (3,)), ("bias", "float32", (3,)), ("running_mean", "float32", (3,)),
        ("running_var", "float32", (3,)), ("num_batches_tracked", "int64", ())]
    got, want = obj["state_dict"], torch_fixtures.tiny_expected()
    assert list(got) == ["f32", "f32_t", "f32_slice", "f16", "f64", "i64", "i32", "i8", "u8",
                         "bool", "scalar", "empty", "bn.num_batches_tracked", "bf16", "param"]
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert got[k].tobytes() == np.ascontiguousarray(w).tobytes(), k  # bit for bit
        assert got[k].flags.c_contiguous and got[k].flags.writeable, k
    # init_from takes the state_dict out of the checkpoint dict; integer entries are ignored
    assert set(pretrained.read_torch(str(torch_fixtures.FIXTURES / "tiny.pth"))) == set(want)


def test_a_pth_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the payload would write PWNED here
    with pytest.raises(torchfile.UnsafePickle, match=r"asks for 'posix\.system'"):
        torchfile.load(torch_fixtures.FIXTURES / "unsafe.pth")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(pretrained.PretrainedError, match="must not run code"):
        pretrained.load_into(models.create("resnet_tiny"),
                             f"torchvision:{torch_fixtures.FIXTURES / 'unsafe.pth'}")
    assert not (tmp_path / "PWNED").exists()


def _rewrite(src, dst, change):
    """Copy the zip ``src`` to ``dst`` with ``change(name, data) -> data`` applied."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for n in z.namelist():
            out.writestr(n, change(n, z.read(n)))
    return dst


# Hand-written pickles (protocol 2 opcodes), for what torch.save never writes.
def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s):
    return b"X" + struct.pack("<I", len(s)) + s.encode()


def _int(i):
    return b"J" + struct.pack("<i", i)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor_op(size, stride, offset=0, key="0", numel=24):
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"),
                     _int(numel)) + b"Q"
    return (_global("torch._utils", "_rebuild_tensor_v2")
            + _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                     b"\x89", _global("collections", "OrderedDict") + b")R") + b"R")


def _pth(path, *ops, storage=np.arange(24, dtype=np.float32)):
    """A zip laid out as torch.save lays it out, around a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"".join(ops) + b".")
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", storage.tobytes())
    return path


def test_a_pickle_cannot_change_what_it_names_or_demand_unbounded_memory(tmp_path):
    import ml_dtypes

    ok = torchfile.load(_pth(tmp_path / "ok.pth", _tensor_op((4, 6), (6, 1))))
    assert np.array_equal(ok, np.arange(24, dtype=np.float32).reshape(4, 6))
    # BUILD (setstate) on a storage type, a dtype, an allowed function: refused
    for i, target in enumerate([_global("torch", "BFloat16Storage"), _global("torch", "bfloat16"),
                                _global("torch._utils", "_rebuild_parameter")]):
        state = b"}" + _str("itemsize") + _int(4096) + b"s"
        with pytest.raises(torchfile.UnsafePickle, match="sets the state of a"):
            torchfile.load(_pth(tmp_path / f"build{i}.pth", target + state + b"b"))
    assert np.dtype(ml_dtypes.bfloat16).itemsize == 2
    # a stride-0 view that would multiply its storage
    with pytest.raises(torchfile.TorchFileError, match="more elements than its storage"):
        torchfile.load(_pth(tmp_path / "expand.pth", _tensor_op((100000, 6), (0, 1))))
    # many full copies of one storage
    many = b"(" + _tensor_op((4, 6), (6, 1)) * 20000 + b"l"
    with pytest.raises(torchfile.TorchFileError, match="more than 4 times over"):
        torchfile.load(_pth(tmp_path / "many.pth", many,
                            storage=np.zeros(24, np.float32)))
    # a storage that claims more elements than its entry holds
    with pytest.raises(torchfile.TorchFileError, match="storage 0 holds 96 bytes"):
        torchfile.load(_pth(tmp_path / "claim.pth", _tensor_op((4, 6), (6, 1), numel=1 << 28)))


def test_damaged_and_legacy_pth_files_are_named(tmp_path):
    tiny_pth = torch_fixtures.FIXTURES / "tiny.pth"
    cases = {
        # storage 0 cut short
        "short.pth": (lambda n, d: d[:40] if n.endswith("data/0") else d,
                      r"storage 0 holds 40 bytes.*damaged"),
        # storage 0 recorded with 16 elements: the (4, 6) tensor would read past it
        "strides.pth": (lambda n, d: d.replace(b"cpuq\x13K\x18", b"cpuq\x13K\x10")
                        if n.endswith("data.pkl") else d, r"reaches element 23 of storage 0"),
        "nostorage.pth": (lambda n, d: d, r"lacks the storage tiny/data/5"),
    }
    for name, (change, msg) in cases.items():
        path = _rewrite(tiny_pth, tmp_path / name, change)
        if name == "nostorage.pth":
            with zipfile.ZipFile(tiny_pth) as z, zipfile.ZipFile(path, "w") as out:
                for n in z.namelist():
                    if not n.endswith("data/5"):
                        out.writestr(n, z.read(n))
        with pytest.raises(torchfile.TorchFileError, match=msg):
            torchfile.load(path)
    with pytest.raises(pretrained.PretrainedError, match="pre-1.6 format.*re-save it"):
        pretrained.read_torch(str(torch_fixtures.FIXTURES / "tiny_legacy.pth"))
    data = (torch_fixtures.FIXTURES / "tiny.pth").read_bytes()
    (tmp_path / "cd.pth").write_bytes(data[:-22] + b"\xff" * 22)  # end of central directory
    with pytest.raises(pretrained.PretrainedError, match="neither a PyTorch .pth"):
        pretrained.load_into(models.create("resnet_tiny"), f"torchvision:{tmp_path / 'cd.pth'}")
    with pytest.raises(ConfigError, match="neither a PyTorch .pth"):
        config_lib.validate(tiny(init_from=f"torchvision:{tmp_path / 'cd.pth'}"), device_count=1,
                            process_count=1)
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(pretrained.PretrainedError, match="neither a PyTorch .pth"):
        pretrained.load_into(models.create("resnet_tiny"), f"torchvision:{tmp_path / 'junk.pth'}")


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
    with pytest.raises(ConfigError, match="neither a PyTorch .pth .zip. file nor .safetensors"):
        config_lib.validate(tiny(init_from=f"torchvision:{tmp_path / 'w.pth'}"), device_count=1,
                            process_count=1)
    with pytest.raises(ConfigError, match="convert to the ImageNet ResNets and MobileNetV2"):
        config_lib.validate(tiny(init_from=f"torchvision:{torch_fixtures.FIXTURES / 'tiny.pth'}"),
                            device_count=1, process_count=1)


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
