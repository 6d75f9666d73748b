"""Image data for the ``vae-ext`` command: sklearn's 8x8 digits, MNIST IDX files, ``.npz`` arrays.

Every loader returns :class:`ImageData`: float32 tensors of shape (N, C, H, W) with values in [0, 1],
a training set and a test set. Sources (the ``--data`` option):

``digits``
    scikit-learn's 1,797 8x8 digits (bundled with scikit-learn, no download), scaled from 0..16.
``mnist:DIR``
    MNIST in its IDX format, gzipped or raw: ``train-images-idx3-ubyte[.gz]`` and/or
    ``t10k-images-idx3-ubyte[.gz]`` (``train-images.idx3-ubyte`` spellings too). Labels are not used.
``FILE.npz`` (or ``npz:FILE``)
    arrays ``train`` and ``test`` (or ``x_train`` and ``x_test``), or one array of images
    (the only array in the file, or the one named ``images`` or ``x``); each (N, H, W), (N, C, H, W)
    or (N, D) with D a square; uint8 (0..255) or floats in [0, 1].

**Splits.** A source with a training set and a test set is used as it is. A source with one pool of
images (digits; an MNIST folder holding only the t10k files, or only the train files; an ``.npz``
with one array) is split in order, without shuffling: ``train_split=N`` takes the first N images
for training and the rest for testing, ``train_split=0.8`` the first 80 % (the default).
So ``--data mnist:DIR --train-split 8000`` on the 10,000 t10k images trains on the first 8,000
and tests on the last 2,000. ``train_split`` on a source that has its own test set is an error.

**Size.** A file is refused before its data is read or inflated when it would need more memory
than :mod:`vae_ext.memory` allows: its data plus :data:`EXTRA_BYTES_PER_VALUE` per pixel (IDX files
are read by :mod:`vae_ext.idx`; of an ``.npz``, only the arrays used are read).

**Binarization** (``binarize``): ``"dynamic"`` keeps the training images in [0, 1] and the trainer
draws x ~ Bernoulli(image) afresh for every batch; ``"static"`` draws the training set once;
``"none"`` keeps grey levels. With ``dynamic`` and ``static`` the test set is drawn once from a
fixed seed (:data:`TEST_BINARIZE_SEED`), so every run and every evaluation sees the same test set.
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
    "parse_split",
    "binarize",
]

BINARIZE_MODES = ("dynamic", "static", "none")
TEST_BINARIZE_SEED = 20_150_601  # fixed: the binarized test set is the same for every run

# What the loader makes of each value of a file, beyond the file's data itself: a float32 image
# (4 bytes) and room for a binarized float32 copy (4 more). The memory check counts these.
EXTRA_BYTES_PER_VALUE = 8


@dataclass
class ImageData:
    """A training and a test set of images, float32 (N, C, H, W) in [0, 1]."""

    train: torch.Tensor
    test: torch.Tensor
    name: str
    binarize: str = "none"

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train.shape[1:])

    def describe(self) -> str:
        c, h, w = self.image_shape
        return f"{self.name} ({len(self.train)} train / {len(self.test)} test, {c}x{h}x{w})"


# --------------------------------------------------------------------------- IDX


def _find_idx(folder: Path, prefix: str) -> Path | None:
    for stem in (f"{prefix}-idx3-ubyte", f"{prefix}.idx3-ubyte"):
        for suffix in (".gz", ""):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def _idx_images(path: Path) -> np.ndarray:
    arr = read_idx(path, extra_bytes_per_value=EXTRA_BYTES_PER_VALUE)
    if arr.ndim != 3:
        raise DataError(f"{path}: expected images of shape (N, H, W), got an IDX array of shape {arr.shape}")
    return arr


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
        raise DataError(f"{folder}: train images are {train.shape[1:]} but test images are {test.shape[1:]}")
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
        raise DataError(f"{name}: expected images of shape (N, H, W) or (N, C, H, W), got {arr.shape}")
    if len(arr) == 0:
        raise DataError(f"{name}: no images")
    if 0 in arr.shape[1:]:
        raise DataError(f"{name}: images of shape {'x'.join(map(str, arr.shape[1:]))} have no pixels")
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


def _npz_pick(path: Path, keys) -> tuple:
    """The names of the (train, test) arrays of an .npz, from its member names alone (test may be None)."""
    for tr, te in (("train", "test"), ("x_train", "x_test")):
        if tr in keys and te in keys:
            return tr, te
    if len(keys) == 1:
        return keys[0], None
    for k in ("images", "x"):
        if k in keys:
            return k, None
    raise DataError(
        f"{path}: expected arrays 'train' and 'test', or a single array of images; found {sorted(keys) or 'none'}"
    )


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


def _load_npz(path: Path) -> tuple:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with zf:
        keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        tr, te = _npz_pick(path, keys)
        return _npz_array(zf, path, tr), (None if te is None else _npz_array(zf, path, te))


def _load_digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32) / 16.0  # 0..16 -> [0, 1]


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
        if not (value.is_integer() and value >= 1.0):
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


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ Bernoulli(x): one binary draw per pixel."""
    return torch.bernoulli(x, generator=generator)


def load_data(spec: str = "digits", *, train_split=None, binarize_mode: str = "dynamic") -> ImageData:
    """Load a data source (see the module docstring) and split and binarize it.

    Raises :class:`~vae_ext.errors.DataError` for a missing or malformed file and
    :class:`~vae_ext.errors.ConfigError` for an unusable option.
    """
    if binarize_mode not in BINARIZE_MODES:
        raise ConfigError(f"--binarize: expected one of {', '.join(BINARIZE_MODES)}, got {binarize_mode!r}")
    split = parse_split(train_split)
    if spec == "digits":
        name, train, test = "digits", _to_images(_load_digits(), "digits"), None
    elif spec.startswith("mnist:"):
        folder = spec[len("mnist:"):]
        if not folder:
            raise ConfigError("--data mnist:DIR: the folder is missing")
        tr, te = load_mnist(folder)
        name = f"mnist:{folder}"
        if tr is None or te is None:  # one pool: split it
            train, test = _to_images(tr if tr is not None else te, name), None
        else:
            train, test = _to_images(tr, name), _to_images(te, name)
    elif spec.startswith("npz:") or spec.endswith(".npz"):
        path = Path(spec[len("npz:"):] if spec.startswith("npz:") else spec)
        tr, te = _load_npz(path)
        name = str(path)
        train = _to_images(tr, f"{path}")
        test = None if te is None else _to_images(te, f"{path}")
        if test is not None and train.shape[1:] != test.shape[1:]:
            raise DataError(f"{path}: train images are {tuple(train.shape[1:])} but test images are "
                            f"{tuple(test.shape[1:])}")
    else:
        raise ConfigError(f"--data: expected 'digits', 'mnist:DIR' or FILE.npz, got {spec!r}")

    if test is None:
        train, test = _split_pool(train, split, name)
    elif split is not None:
        raise ConfigError(f"--train-split: {name} has its own test set; the option only splits a single pool of images")

    if binarize_mode != "none":
        g = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
        test = binarize(test, g)
        if binarize_mode == "static":
            train = binarize(train, g)
    return ImageData(train=train.contiguous(), test=test.contiguous(), name=name, binarize=binarize_mode)
