"""Image data for the ``vae-ext`` command: sklearn's 8x8 digits, MNIST IDX files, ``.npz`` arrays.

Every loader returns :class:`ImageData`: float32 tensors of shape (N, C, H, W) with values in [0, 1],
a training set and a test set. Sources (the ``--data`` option):

``digits``
    scikit-learn's 1,797 8x8 digits (bundled with scikit-learn, no download), scaled from 0..16.
``mnist:DIR``
    MNIST in its IDX format, gzipped or raw: ``train-images-idx3-ubyte[.gz]`` and/or
    ``t10k-images-idx3-ubyte[.gz]`` (``train-images.idx3-ubyte`` spellings too); labels from
    ``train-labels-idx1-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
``FILE.npz`` (or ``npz:FILE``)
    arrays ``train`` and ``test`` (or ``x_train`` and ``x_test``), or one array of images
    (the only array in the file besides the labels, or the one named ``images`` or ``x``); each
    (N, H, W), (N, C, H, W) or (N, D) with D a square; uint8 (0..255) or floats in [0, 1]. Labels:
    ``y_train`` and ``y_test`` beside a train and a test array, ``labels`` (or ``y``) beside one.

**Labels** (``labels=True``, for a class-conditional model): class indices 0..C-1, one per image,
int64 tensors split as the images are; digits has its targets. A source without labels, or whose
label file is corrupt or does not match its images (count, shape, type, negative values), is
refused with one line (missing labels: ConfigError; bad ones: DataError). Without ``labels=True``
no label file is read, so a run that does not use them never fails on them.

**Splits.** A source with a training set and a test set is used as it is. A source with one pool of
images (digits; an MNIST folder holding only the t10k files, or only the train files; an ``.npz``
with one array) is split in order, without shuffling: ``train_split=N`` takes the first N images
for training and the rest for testing, ``train_split=0.8`` the first 80 % (the default).
So ``--data mnist:DIR --train-split 8000`` on the 10,000 t10k images trains on the first 8,000
and tests on the last 2,000. ``train_split`` on a source that has its own test set is an error.

**Size.** A file is refused before its data is read or inflated when it would need more memory
than :mod:`vae_ext.cli.memory` allows: its data plus :data:`EXTRA_BYTES_PER_VALUE` per pixel (IDX files
are read by :mod:`vae_ext.cli.idx`; of an ``.npz``, only the arrays used are read).

**Binarization** (``binarize``): ``"dynamic"`` keeps the training images in [0, 1] and the trainer
draws x ~ Bernoulli(image) afresh for every batch; ``"static"`` draws the training set once;
``"none"`` keeps grey levels. With ``dynamic`` and ``static`` the test set is drawn once from a
fixed seed (:data:`TEST_BINARIZE_SEED`), so every run and every evaluation sees the same test set.

**A grid in [-1, 1]** (``num_bits=B``, for ``--recon dmol``; no binarization): every value is rounded
to the nearest of the 2^B levels ``2 k / (2^B - 1) - 1``, the convention of PixelCNN++, VDVAE and
NVAE. MNIST's 8-bit pixels (v / 255) land exactly on the 8-bit grid; the digits' 17 levels (v / 16)
are rounded to the nearest 8-bit level (with B = 4, to one of 16 levels: two of them merge).
"""
from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
from .idx import read_idx
from .memory import check_fits

__all__ = [
    "ImageData",
    "BINARIZE_MODES",
    "TEST_BINARIZE_SEED",
    "load_data",
    "load_mnist",
    "load_mnist_labels",
    "parse_split",
    "MAX_CLASSES",
    "binarize",
    "to_signed_grid",
]

BINARIZE_MODES = ("dynamic", "static", "none")
TEST_BINARIZE_SEED = 20_150_601  # fixed: the binarized test set is the same for every run

# What the loader makes of each value of a file, beyond the file's data itself: a float32 image
# (4 bytes) and room for a binarized float32 copy (4 more). The memory check counts these.
EXTRA_BYTES_PER_VALUE = 8


# A class-conditional model holds a one-hot of this many entries per image, an embedding row per
# class and draws a row of samples per class: a label file claiming more classes is surely not one.
MAX_CLASSES = 10_000


@dataclass
class ImageData:
    """A training and a test set of images, float32 (N, C, H, W) in [0, 1], and their class labels
    (int64 (N,), 0..num_classes-1) when they were asked for."""

    train: torch.Tensor
    test: torch.Tensor
    name: str
    binarize: str = "none"
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    num_bits: int | None = None  # set: the images are on the 2^num_bits-level grid in [-1, 1] instead

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Images (or samples, reconstructions) of this data -> [0, 1], for drawing them."""
        return images if self.num_bits is None else (images + 1.0) * 0.5

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train.shape[1:])

    @property
    def num_classes(self) -> int:
        """1 + the largest label of either set (0 without labels)."""
        if self.train_labels is None:
            return 0
        return 1 + int(max(self.train_labels.max(), self.test_labels.max()))

    def describe(self) -> str:
        c, h, w = self.image_shape
        grid = "" if self.num_bits is None else f", {self.num_bits}-bit levels in [-1, 1]"
        return f"{self.name} ({len(self.train)} train / {len(self.test)} test, {c}x{h}x{w}{grid})"


# --------------------------------------------------------------------------- IDX


def _size(shape) -> str:
    """An image size as the messages write it: 28x28, 1x28x28 (an array's shape prints as a list)."""
    return "x".join(map(str, shape))


def _find_idx(folder: Path, prefix: str, kind: str = "idx3") -> Path | None:
    for stem in (f"{prefix}-{kind}-ubyte", f"{prefix}.{kind}-ubyte"):
        for suffix in (".gz", ""):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def _idx_images(path: Path) -> np.ndarray:
    arr = read_idx(path, extra_bytes_per_value=EXTRA_BYTES_PER_VALUE)
    if arr.ndim != 3:
        raise DataError(f"{path}: expected images of shape (N, H, W), got an IDX array of shape {list(arr.shape)}")
    return arr


def load_mnist_labels(folder, train: np.ndarray | None, test: np.ndarray | None) -> tuple:
    """The class labels of :func:`load_mnist`'s images, int64 tensors ``(train, test)`` (None where
    that set of images is absent). A set of images without its label file, or with one that is
    corrupt or does not match it, is a DataError naming the file."""
    folder = Path(folder)
    out = []
    for prefix, imgs in (("train", train), ("t10k", test)):
        if imgs is None:
            out.append(None)
            continue
        p = _find_idx(folder, f"{prefix}-labels", "idx1")
        if p is None:
            raise ConfigError(f"{folder}: no {prefix}-labels-idx1-ubyte[.gz] beside the {prefix} images "
                            f"(class labels are needed for --conditional)")
        arr = read_idx(p, extra_bytes_per_value=8)  # read as int64
        if arr.ndim != 1:
            raise DataError(f"{p}: expected labels of shape (N,), got an IDX array of shape {list(arr.shape)}")
        out.append(_to_labels(arr, len(imgs), str(p)))
    return tuple(out)


def load_mnist(folder) -> tuple:
    """MNIST images from a folder: ``(train, test)`` arrays (N, H, W), either one None if absent."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory (mnist:DIR expects the folder holding the IDX files)")
    train_p, test_p = _find_idx(folder, "train-images"), _find_idx(folder, "t10k-images")
    if train_p is None and test_p is None:
        raise DataError(
            f"{folder}: no MNIST image files (train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz])"
        )
    train = _idx_images(train_p) if train_p else None
    test = _idx_images(test_p) if test_p else None
    if train is not None and test is not None and train.shape[1:] != test.shape[1:]:
        raise DataError(f"{folder}: train images are {_size(train.shape[1:])} but test images are "
                        f"{_size(test.shape[1:])}")
    return train, test


# --------------------------------------------------------------------------- arrays -> tensors


def _to_images(arr: np.ndarray, name: str) -> torch.Tensor:
    """(N, H, W), (N, C, H, W) or (N, D) with D square -> float32 (N, C, H, W) in [0, 1]."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        side = math.isqrt(arr.shape[1])
        if side * side != arr.shape[1]:
            raise DataError(f"{name}: flat images of {arr.shape[1]} values are not square; store (N, H, W)")
        arr = arr.reshape(len(arr), 1, side, side)
    elif arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim != 4:
        raise DataError(f"{name}: expected images of shape (N, H, W) or (N, C, H, W), got {list(arr.shape)}")
    if len(arr) == 0:
        raise DataError(f"{name}: no images")
    if 0 in arr.shape[1:]:
        raise DataError(f"{name}: images of size {_size(arr.shape[1:])} have no pixels")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{name}: integer pixel values must lie in 0..255, found {lo}..{hi}")
        x = arr.astype(np.float32)
        if hi > 1:
            x /= np.float32(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        # Checked in the file's own type: casting first would turn values beyond float32 into inf,
        # with a numpy RuntimeWarning above the one-line error.
        if not np.isfinite(arr).all():
            raise DataError(f"{name}: pixel values contain NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{name}: float pixel values must lie in [0, 1], found {lo:g}..{hi:g}")
        x = arr.astype(np.float32)
    else:
        raise DataError(f"{name}: unsupported array dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x))


_NPZ_LABELS = ("y_train", "y_test", "labels", "y")


def _npz_pick(path: Path, keys) -> tuple:
    """The names of the (train, test) arrays of an .npz, from its member names alone (test may be None)."""
    for tr, te in (("train", "test"), ("x_train", "x_test")):
        if tr in keys and te in keys:
            return tr, te
    images = [k for k in keys if k not in _NPZ_LABELS]
    if len(images) == 1:
        return images[0], None
    for k in ("images", "x"):
        if k in keys:
            return k, None
    raise DataError(
        f"{path}: expected arrays 'train' and 'test', or a single array of images; found {sorted(keys) or 'none'}"
    )


def _npz_label_names(path: Path, keys, test: str | None) -> tuple:
    """The names of the label arrays that go with the images picked by :func:`_npz_pick`."""
    if test is not None:
        if "y_train" in keys and "y_test" in keys:
            return "y_train", "y_test"
        raise ConfigError(f"{path}: no labels: expected arrays 'y_train' and 'y_test' beside the train and "
                        f"test images (class labels are needed for --conditional); found {sorted(keys)}")
    for k in ("labels", "y"):
        if k in keys:
            return k, None
    raise ConfigError(f"{path}: no labels: expected an array 'labels' beside the images (class labels are "
                    f"needed for --conditional); found {sorted(keys)}")


# What reading a zip member can raise on a corrupt file: zipfile's own errors, zlib's, a truncated
# stream (EOFError), an unknown compression method (NotImplementedError), encryption (RuntimeError).
_ZIP_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def _npz_array(zf: zipfile.ZipFile, path: Path, key: str) -> np.ndarray:
    """One array of an .npz, refused before it is inflated if its header (or the zip directory)
    promises more than the memory limit allows."""
    info = zf.getinfo(key + ".npy")
    what = f"{path}: array {key!r}"
    try:
        with zf.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise DataError(f"{what}: .npy format version {version[0]}.{version[1]} is not supported")
            shape, _, dtype = read_header(fp)
    except _ZIP_ERRORS as e:
        raise DataError(f"{what}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise DataError(f"{what}: holds Python objects (pickled); only numeric arrays are read")
    count = math.prod(shape)
    need = max(count * dtype.itemsize, info.file_size) + count * EXTRA_BYTES_PER_VALUE
    shape_text = "x".join(map(str, shape)) or "scalar"
    check_fits(need, f"{what} (shape {shape_text}, {dtype.name})")
    try:
        with zf.open(info) as fp:
            return np.lib.format.read_array(fp, allow_pickle=False)
    except _ZIP_ERRORS as e:
        raise DataError(f"{what}: truncated or corrupt ({type(e).__name__}: {e})") from None


def _load_npz(path: Path, labels: bool = False) -> tuple:
    """``(train, test, train_labels, test_labels)`` arrays; test None for one pool of images, the
    labels None unless asked for."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with zf:
        keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        tr, te = _npz_pick(path, keys)
        arrays = [_npz_array(zf, path, tr), None if te is None else _npz_array(zf, path, te), None, None]
        if labels:
            ltr, lte = _npz_label_names(path, keys, te)
            arrays[2] = _npz_array(zf, path, ltr)
            arrays[3] = None if lte is None else _npz_array(zf, path, lte)
        return tuple(arrays)


def _to_labels(arr: np.ndarray, n_images: int, name: str) -> torch.Tensor:
    """Class labels, (N,) integers 0..MAX_CLASSES-1, one per image -> int64 (N,)."""
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise DataError(f"{name}: expected labels of shape (N,), got {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    if len(arr) != n_images:
        raise DataError(f"{name}: {len(arr)} labels for {n_images} images (one label per image)")
    if len(arr):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= MAX_CLASSES:
            raise DataError(f"{name}: class labels must lie in 0..{MAX_CLASSES - 1}, found {lo}..{hi}")
    return torch.from_numpy(arr.astype(np.int64))


def _load_digits() -> tuple:
    """The digits images in [0, 1] and their labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target  # 0..16 -> [0, 1]


# --------------------------------------------------------------------------- splits, binarization


def parse_split(value) -> int | float | None:
    """``"8000"`` or 8000 -> 8000 images; ``"0.8"`` or 0.8 -> a fraction; None -> None (default 0.8)."""
    if value is None:
        return None
    bad = ConfigError(f"--train-split: expected a number of images or a fraction in (0, 1), got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise bad from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if isinstance(value, float):
        if 0.0 < value < 1.0:
            return value
        if not (value.is_integer() and value > 1.0):  # a count ("1e4"); 1.0 surely meant 100 %, not 1 image
            raise bad
        value = int(value)
    if value < 1:
        raise bad
    return value


def _split_pool(pool: torch.Tensor, split, name: str) -> tuple:
    n = len(pool)
    split = 0.8 if split is None else split
    n_train = int(round(split * n)) if isinstance(split, float) else split
    if not 1 <= n_train < n:
        raise ConfigError(
            f"--train-split {split}: {name} has {n} images; the split must leave at least one for "
            f"training and one for testing"
        )
    return pool[:n_train], pool[n_train:]


def to_signed_grid(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Images in [0, 1] -> the nearest of the 2^num_bits levels ``2 k / (2^num_bits - 1) - 1`` in [-1, 1]."""
    top = float(2 ** num_bits - 1)
    return torch.round(x * top) * (2.0 / top) - 1.0


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ Bernoulli(x): one binary draw per pixel."""
    return torch.bernoulli(x, generator=generator)


def load_data(spec: str = "digits", *, train_split=None, binarize_mode: str = "dynamic",
              labels: bool = False, num_bits: int | None = None) -> ImageData:
    """Load a data source (see the module docstring) and split and binarize it; with ``labels``,
    its class labels too (a source without them is refused); with ``num_bits`` (and
    ``binarize_mode="none"``), on the 2^num_bits-level grid in [-1, 1] (:func:`to_signed_grid`).

    Raises :class:`~vae_ext.cli.errors.DataError` for a missing or malformed file and
    :class:`~vae_ext.cli.errors.ConfigError` for an unusable option.
    """
    if binarize_mode not in BINARIZE_MODES:
        raise ConfigError(f"--binarize: expected one of {', '.join(BINARIZE_MODES)}, got {binarize_mode!r}")
    if num_bits is not None and binarize_mode != "none":
        raise ConfigError(f"--binarize {binarize_mode}: the {num_bits}-bit grid in [-1, 1] keeps grey levels")
    split = parse_split(train_split)
    train_y = test_y = None
    if spec == "digits":
        imgs, targets = _load_digits()
        name, train, test = "digits", _to_images(imgs, "digits"), None
        train_y = _to_labels(targets, len(train), "digits") if labels else None
    elif spec.startswith("mnist:"):
        folder = spec[len("mnist:"):]
        if not folder:
            raise ConfigError("--data mnist:DIR: the folder is missing")
        tr, te = load_mnist(folder)
        if labels:
            train_y, test_y = load_mnist_labels(folder, tr, te)
        name = f"mnist:{folder}"
        if tr is None or te is None:  # one pool: split it
            train, test = _to_images(tr if tr is not None else te, name), None
            train_y = train_y if train_y is not None else test_y
            test_y = None
        else:
            train, test = _to_images(tr, name), _to_images(te, name)
    elif spec.startswith("npz:") or spec.endswith(".npz"):
        path = Path(spec[len("npz:"):] if spec.startswith("npz:") else spec)
        tr, te, ltr, lte = _load_npz(path, labels)
        name = str(path)
        train = _to_images(tr, f"{path}")
        test = None if te is None else _to_images(te, f"{path}")
        if test is not None and train.shape[1:] != test.shape[1:]:
            raise DataError(f"{path}: train images are {_size(train.shape[1:])} but test images are "
                            f"{_size(test.shape[1:])}")
        if labels:
            train_y = _to_labels(ltr, len(train), f"{path}: labels")
            test_y = None if test is None else _to_labels(lte, len(test), f"{path}: test labels")
    else:
        raise ConfigError(f"--data: expected 'digits', 'mnist:DIR' or FILE.npz, got {spec!r}")

    if test is None:
        n_train = len(_split_pool(train, split, name)[0])
        train, test = train[:n_train], train[n_train:]
        if train_y is not None:
            train_y, test_y = train_y[:n_train], train_y[n_train:]
    elif split is not None:
        raise ConfigError(f"--train-split: {name} has its own test set; the option only splits a single pool of images")

    if binarize_mode != "none":
        g = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
        test = binarize(test, g)
        if binarize_mode == "static":
            train = binarize(train, g)
    if num_bits is not None:
        train, test = to_signed_grid(train, num_bits), to_signed_grid(test, num_bits)
    return ImageData(train=train.contiguous(), test=test.contiguous(), name=name, binarize=binarize_mode,
                     train_labels=train_y, test_labels=test_y, num_bits=num_bits)
