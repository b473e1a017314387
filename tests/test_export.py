"""Exported models (sap_jax/export.py) run without sap_jax and give the pruned model's logits."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import randomize

from sap_jax import export, info, models, surgery

pytestmark = pytest.mark.slow  # exports reloaded in fresh interpreters

INPUT = {"image_size": 32, "layout": "NHWC", "channels": "RGB", "pixel_range": [0.0, 1.0],
         "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "num_classes": 10,
         "class_names": [f"c{i}" for i in range(10)]}


@pytest.fixture(scope="module", params=["resnet_cifar_tiny", "mobilenet_v2_tiny"])
def saved(request, tmp_path_factory):
    """A pruned model saved as a run saves it (metadata with its input), inside a 'workdir', and
    the logits it gives for a fixed batch of [0, 1] images."""
    dense = models.create(request.param, num_classes=10, seed=1)
    randomize(dense, seed=2)
    arch = [np.arange(w) % 2 == 0 for w in dense.widths]  # keep every other channel
    pruned = surgery.extract(dense, [a.astype(np.float32) for a in arch])
    wd = tmp_path_factory.mktemp(request.param)
    surgery.save(wd / "pruned_model", pruned, dense_widths=dense.widths, image_size=32,
                 metadata={"dataset": "test", "input": INPUT})
    images = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    pruned.eval()
    want = np.asarray(pruned((images - np.float32(INPUT["mean"])) / np.float32(INPUT["std"])))
    return wd, images, want


def _run_elsewhere(tmp_path, code, images):
    """``code`` in a fresh interpreter that never imports sap_jax: it reads images.npy and
    writes logits.npy."""
    np.save(tmp_path / "images.npy", images)
    code = "import numpy as np\nimages = np.load('images.npy')\n" + textwrap.dedent(code) + \
        "\nimport sys\nassert not any(m.startswith('sap_jax') for m in sys.modules)\n" \
        "np.save('logits.npy', np.asarray(logits))\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    return np.load(tmp_path / "logits.npy")


def test_stablehlo_reloads_with_jax_alone_at_any_batch_size(saved, tmp_path, capsys):
    wd, images, want = saved
    assert export.main(["--pruned", str(wd), "--format", "stablehlo",
                        "--out", str(tmp_path / "x")]) == 0
    assert "float32 images in [0, 1] -> 10 logits" in capsys.readouterr().out
    record = json.loads((tmp_path / "x" / "export.json").read_text())
    assert record["input"]["shape"] == ["batch", 32, 32, 3] and record["class_names"][0] == "c0"
    got = _run_elsewhere(tmp_path / "x", """
        import jax
        exp = jax.export.deserialize(open('model.stablehlo', 'rb').read())
        logits = np.concatenate([exp.call(images[:1]), exp.call(images[1:])])
    """, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_batch_norm_is_folded_by_default_and_can_be_kept(saved, tmp_path, capsys):
    """Folded (the default) and ``--fold_bn=false`` both give the pruned model's logits; the
    folded program normalises nothing, export.json says which it is."""
    import jax
    from flax import nnx

    wd, images, want = saved
    n_bn = sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(
        surgery.load(wd / "pruned_model")))
    assert n_bn > 0  # every BatchNorm of the presets follows a conv
    for flag, folded in ((None, n_bn), ("--fold_bn=false", 0), ("--fold_bn=true", n_bn)):
        out = tmp_path / str(flag)
        argv = ["--pruned", str(wd), "--format", "stablehlo", "--out", str(out)]
        assert export.main(argv + ([flag] if flag else [])) == 0
        assert f"({folded} BatchNorms folded into their convs)" in capsys.readouterr().out
        record = json.loads((out / "export.json").read_text())
        assert record["fold_bn"] == (folded > 0) and record["folded_batch_norms"] == folded
        exp = jax.export.deserialize((out / "model.stablehlo").read_bytes())
        assert ("rsqrt" in exp.mlir_module()) == (folded == 0)
        got = np.asarray(exp.call(images))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(SystemExit):
        export.main(["--pruned", str(wd), "--format", "stablehlo", "--out", str(tmp_path),
                     "--fold_bn=maybe"])


def test_savedmodel_reloads_with_tensorflow_alone(saved, tmp_path):
    wd, images, want = saved
    export.export(str(wd / "pruned_model"), "savedmodel", str(tmp_path / "sm"))
    got = _run_elsewhere(tmp_path / "sm", """
        import tensorflow as tf
        serve = tf.saved_model.load('.').signatures['serving_default']
        logits = serve(images=tf.constant(images))['logits'].numpy()
    """, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_info_shows_how_to_feed_a_saved_model(saved, capsys):
    wd, _, _ = saved
    assert info.main(["--pruned", str(wd)]) == 0
    out = capsys.readouterr().out
    assert "input: 32x32 RGB NHWC, pixels in [0, 1], then (x - mean) / std" in out
    assert "mean (0.4900, 0.4800, 0.4500)" in out and "10 classes: c0, c1" in out


def test_a_model_without_its_input_record_is_refused(tmp_path, capsys):
    dense = models.create("resnet_cifar_tiny", num_classes=10)
    surgery.save(tmp_path / "m", dense, image_size=32)
    assert export.main(["--pruned", str(tmp_path / "m"), "--format", "stablehlo",
                        "--out", str(tmp_path / "x")]) == 2
    assert "does not record its input normalisation" in capsys.readouterr().err
