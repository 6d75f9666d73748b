"""vae_ext.cli.data: IDX files (written here, gzipped and raw), splits, .npz, digits, real MNIST when present."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_ext.cli.data import load_data, load_mnist, parse_split
from vae_ext.cli.errors import ConfigError, DataError
from vae_ext.cli.idx import parse_idx, read_idx

from helpers import mnist_dir


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: 0, 0, type code, ndim, big-endian int32 dims, big-endian data."""
    big = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(big).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, code: int = 0x08) -> Path:
    raw = idx_bytes(arr, code)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def images(n=10, h=6, w=5, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("code,arr", [
    (0x08, images()),
    (0x08, np.arange(7, dtype=np.uint8)),  # a labels file (1-d)
    (0x09, np.array([[-3, 4], [5, -128]], dtype=np.int8)),
    (0x0B, np.array([1, -2, 30000], dtype=np.int16)),
    (0x0C, np.array([[1, -2], [70000, 3]], dtype=np.int32)),
    (0x0D, np.array([0.5, -1.25], dtype=np.float32)),
    (0x0E, np.array([[1e300]], dtype=np.float64)),
])
def test_read_idx_round_trip(tmp_path, gz, code, arr):
    got = read_idx(write_idx(tmp_path / "f", arr, gz=gz, code=code))
    assert got.shape == arr.shape and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("raw,match", [
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02" + bytes(7),
     r"truncated IDX file: shape 2x2x2 needs 8 bytes of data, found 7"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", r"truncated IDX file: the header needs 16 bytes"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x02" + bytes(3), r"trailing bytes"),
    (b"\x00\x00\x08\x00", r"not an IDX file \(magic number 0x00000800\)"),  # 0 dimensions
    (b"\x00\x00\x07\x03" + bytes(20), r"not an IDX file \(magic number 0x00000703\)"),  # unknown type code
    (b"\x01\x02\x08\x03" + bytes(20), r"not an IDX file \(magic number 0x01020803\)"),
    (b"PK\x03\x04 a zip, not an IDX file", r"not an IDX file"),
    (b"\x00\x00", r"not an IDX file"),
    (b"", r"not an IDX file"),
])
def test_malformed_idx_is_a_data_error(tmp_path, raw, match):
    p = tmp_path / "bad-idx"
    for data in (raw, gzip.compress(raw)):  # the same message through gzip
        p.write_bytes(data)
        with pytest.raises(DataError, match=match) as e:
            read_idx(p)
        assert str(p) in str(e.value)


def test_corrupt_or_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(images()))
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(p)
    p.write_bytes(good[:10] + bytes(len(good) - 10))
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(p)


def test_missing_idx_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)


def test_parse_idx_without_a_file():
    arr = images(3)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)


# --------------------------------------------------------------------------- MNIST folders and splits


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_mnist_folder_with_only_t10k_is_split_in_order(tmp_path, gz):
    imgs = images(10)
    write_idx(tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")), imgs, gz=gz)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))  # ignored
    d = load_data(f"mnist:{tmp_path}", train_split=8, binarize_mode="none")
    assert d.train.shape == (8, 1, 6, 5) and d.test.shape == (2, 1, 6, 5)
    assert d.train.dtype == torch.float32
    expected = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    torch.testing.assert_close(d.train, expected[:8])  # first 8 train, last 2 test, no shuffling
    torch.testing.assert_close(d.test, expected[8:])
    d = load_data(f"mnist:{tmp_path}", binarize_mode="none")  # default 0.8
    assert (len(d.train), len(d.test)) == (8, 2)
    d = load_data(f"mnist:{tmp_path}", train_split="0.5", binarize_mode="none")
    assert (len(d.train), len(d.test)) == (5, 5)
    with pytest.raises(ConfigError, match="at least one"):
        load_data(f"mnist:{tmp_path}", train_split=10)


def test_mnist_folder_with_train_and_test_pairs(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images(12, seed=1), gz=True)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images(4, seed=2))  # the other spelling, raw
    d = load_data(f"mnist:{tmp_path}", binarize_mode="none")
    assert (len(d.train), len(d.test)) == (12, 4)
    tr, te = load_mnist(tmp_path)
    np.testing.assert_array_equal(te, images(4, seed=2))
    with pytest.raises(ConfigError, match="own test set"):
        load_data(f"mnist:{tmp_path}", train_split=8)


def test_mnist_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_data(f"mnist:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no MNIST image files"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_data(f"mnist:{tmp_path / 'f'}")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.arange(10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected images of shape \(N, H, W\)"):
        load_data(f"mnist:{tmp_path}")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images(5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte", images(5, 8, 8))
    with pytest.raises(DataError, match="train images are"):
        load_data(f"mnist:{tmp_path}")


@pytest.mark.parametrize("value,expected", [
    (None, None), ("8000", 8000), (8000, 8000), ("0.8", 0.8), (0.25, 0.25), ("1e3", 1000), (5.0, 5),
])
def test_parse_split(value, expected):
    got = parse_split(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "abc", "", 0, 0.0, 1.0 + 1e-9, True, "1.0", 1.0])
def test_parse_split_rejects(value):
    with pytest.raises(ConfigError, match="--train-split"):
        parse_split(value)


# --------------------------------------------------------------------------- other sources


def test_digits_default_split_and_binarization():
    d = load_data("digits", binarize_mode="none")
    assert d.image_shape == (1, 8, 8) and (len(d.train), len(d.test)) == (1438, 359)
    assert 0 <= d.train.min() and d.train.max() == 1
    s1, s2 = load_data("digits", binarize_mode="static"), load_data("digits", binarize_mode="static")
    assert set(s1.train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(s1.train, s2.train) and torch.equal(s1.test, s2.test)  # fixed seed
    dyn = load_data("digits", binarize_mode="dynamic")
    assert torch.equal(dyn.test, s1.test)  # the same binarized test set for every mode and run
    assert torch.equal(dyn.train, d.train)  # left in [0, 1]: the trainer draws each batch
    with pytest.raises(ConfigError, match="--binarize"):
        load_data("digits", binarize_mode="threshold")
    with pytest.raises(ConfigError, match="--data"):
        load_data("cifar")


def test_npz_sources(tmp_path):
    p = tmp_path / "pair.npz"
    np.savez(p, train=images(6), test=images(3))
    d = load_data(str(p), binarize_mode="none")
    assert (len(d.train), len(d.test)) == (6, 3) and d.image_shape == (1, 6, 5)
    p = tmp_path / "pool.npz"
    np.savez(p, images=np.random.default_rng(0).random((10, 2, 4, 4)).astype(np.float32))
    d = load_data(f"npz:{p}", train_split=7, binarize_mode="none")
    assert (len(d.train), len(d.test)) == (7, 3) and d.image_shape == (2, 4, 4)
    p = tmp_path / "flat.npz"
    np.savez(p, np.zeros((5, 16), dtype=np.uint8))
    assert load_data(str(p), binarize_mode="none").image_shape == (1, 4, 4)


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.full((4, 3, 3), 2.0, dtype=np.float32)}, r"float pixel values must lie in \[0, 1\]"),
    ({"x": np.full((4, 3, 3), 300, dtype=np.int32)}, r"0\.\.255"),
    ({"x": np.zeros((4, 15), dtype=np.uint8)}, "not square"),
    ({"x": np.zeros((4, 2, 2, 2, 2), dtype=np.uint8)}, r"expected images of shape"),
    ({"a": np.zeros((4, 3, 3)), "b": np.zeros((4, 3, 3))}, r"found \['a', 'b'\]"),
    ({"train": np.zeros((4, 3, 3)), "test": np.zeros((4, 4, 4))}, "train images are"),
])
def test_bad_npz_contents(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load_data(str(p), binarize_mode="none")


def test_unreadable_npz(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(str(tmp_path / "junk.npz"))


# --------------------------------------------------------------------------- the real MNIST test set


def test_real_mnist_t10k():
    folder = mnist_dir("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    imgs = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert imgs.shape == (10000, 28, 28) and imgs.dtype == np.uint8
    # the well-known first test digits
    assert labels.shape == (10000,) and labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    d = load_data(f"mnist:{folder}", train_split=8000, binarize_mode="none")
    assert d.train.shape == (8000, 1, 28, 28) and d.test.shape == (2000, 1, 28, 28)
    torch.testing.assert_close(d.test[-1, 0], torch.from_numpy(imgs[-1]).float() / 255)
