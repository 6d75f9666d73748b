"""Issue 19: inputs that used to end `vae-ext` with a traceback now end it with one line, status 1.

Zero-size images, an IDX header with 255 dimensions, data that cannot fit in memory (refused before
it is inflated, under a small VAE_EXT_MEMORY_LIMIT so that nothing here allocates much), and
checkpoints that carry the format marker but malformed fields. Every test drives the command
(``vae_ext.cli.main``) and builds its hostile files small.
"""
from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli, train_one_epoch

TINY = ["--hidden", "8", "--latent", "2", "--batch-size", "256", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")




def idx_header(*dims, code=0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """header + `zeros` zero bytes, gzipped in chunks (never holding the inflated stream)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as g:
        g.write(header)
        chunk = bytes(1 << 20)
        while zeros > 0:
            g.write(chunk[:min(zeros, len(chunk))])
            zeros -= len(chunk)
    return buf.getvalue()


def npy_member(zf: zipfile.ZipFile, name: str, shape, dtype="u1", data_bytes: int | None = None) -> None:
    """An .npy member whose header claims `shape`, followed by `data_bytes` zero bytes (streamed)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": tuple(shape)})
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize if data_bytes is None else data_bytes
    with zf.open(name, "w", force_zip64=True) as f:
        f.write(header.getvalue())
        chunk = bytes(1 << 20)
        while n > 0:
            f.write(chunk[:min(n, len(chunk))])
            n -= len(chunk)


# --------------------------------------------------------------------------- 5: zero-size images


@pytest.mark.parametrize("dims", [(5, 0, 28), (5, 0, 0), (5, 28, 0)])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_images_with_a_zero_size_dimension(capsys, tmp_path, dims, gz):
    raw = idx_header(*dims)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(raw) if gz else raw)
    rc, _, err = run_cli(capsys, "train", "--data", f"mnist:{tmp_path}", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(rc, err, "have no pixels")


@pytest.mark.parametrize("shape", [(20, 0, 0), (20, 0), (20, 0, 4, 4), (20, 1, 4, 0)])
def test_npz_images_with_a_zero_size_dimension(capsys, tmp_path, shape):
    np.savez(tmp_path / "d.npz", images=np.zeros(shape, np.uint8))
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "d.npz", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(rc, err, "d.npz", "have no pixels")


# --------------------------------------------------------------------------- 6: 255 dimensions


def test_idx_header_with_255_dimensions(capsys, tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_header(*[1] * 255) + b"\x07")
    rc, _, err = run_cli(capsys, "train", "--data", f"mnist:{tmp_path}", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(rc, err, "t10k-images-idx3-ubyte", "claims 255 dimensions")


# --------------------------------------------------------------------------- 7: what cannot fit


def test_gzip_bomb_is_refused_before_it_is_inflated(capsys, tmp_path, monkeypatch):
    """A gzip of 20,000 28x28 images of zeros (15 MiB inflated, 16 KiB on disk) under an 8 MiB limit."""
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "8M")
    n = 20_000
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip_stream(idx_header(n, 28, 28), n * 28 * 28))
    assert (tmp_path / "t10k-images-idx3-ubyte.gz").stat().st_size < 100_000
    tracemalloc.start()
    try:
        rc, _, err = run_cli(capsys, "train", "--data", f"mnist:{tmp_path}", "--out", tmp_path / "r", "--epochs", "0",
                         *TINY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(rc, err, "t10k-images-idx3-ubyte.gz", "20000x28x28", "would need about",
                          "VAE_EXT_MEMORY_LIMIT=8M")
    assert peak < 4 << 20, peak


def test_gzip_stream_longer_than_its_header_is_stopped(capsys, tmp_path):
    """The header promises 10 images; the stream inflates to 64 MiB more. Reading stops at the promise."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip_stream(idx_header(10, 28, 28), 64 << 20))
    tracemalloc.start()
    try:
        rc, _, err = run_cli(capsys, "train", "--data", f"mnist:{tmp_path}", "--out", tmp_path / "r", *TINY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(rc, err, "trailing bytes")
    assert peak < 8 << 20, peak


def test_valid_npz_too_big_for_the_limit(capsys, tmp_path, monkeypatch):
    """A valid uint8 .npz (15 MiB; 61 MiB as float32) under a 32 MiB limit."""
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "32M")
    np.savez(tmp_path / "big.npz", images=np.zeros((20_000, 28, 28), np.uint8))
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "big.npz", "--out", tmp_path / "r", "--epochs", "0",
                         *TINY)
    assert_one_line_error(rc, err, "big.npz", "'images'", "20000x28x28", "would need about", "more than the 32.0 MiB")
    assert not (tmp_path / "r").exists()


def test_compressed_npz_bomb_is_refused_before_it_is_inflated(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "8M")
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        npy_member(zf, "images.npy", (20_000, 28, 28))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    tracemalloc.start()
    try:
        rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "bomb.npz", "--out", tmp_path / "r", "--epochs", "0",
                         *TINY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(rc, err, "bomb.npz", "would need about")
    assert peak < 4 << 20, peak


def test_npz_whose_zip_directory_claims_more_than_its_header(capsys, tmp_path, monkeypatch):
    """A small array whose zip member claims to inflate to 64 MiB: refused on the directory's word."""
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "8M")
    with zipfile.ZipFile(tmp_path / "liar.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        npy_member(zf, "images.npy", (10, 4, 4), data_bytes=64 << 20)
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "liar.npz", "--out", tmp_path / "r", "--epochs", "0",
                         *TINY)
    assert_one_line_error(rc, err, "liar.npz", "would need about")


def test_a_bad_memory_limit_is_named(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "lots")
    np.savez(tmp_path / "d.npz", images=np.zeros((20, 4, 4), np.uint8))
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "d.npz", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(rc, err, "VAE_EXT_MEMORY_LIMIT='lots'")


def test_overflowing_float_pixels_give_no_numpy_warning(capsys, tmp_path):
    x = np.full((20, 4, 4), 0.5)
    x[3, 1, 2] = 1e300  # beyond float32: a cast first would warn "overflow encountered in cast"
    np.savez(tmp_path / "d.npz", images=x)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "d.npz", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(rc, err, "float pixel values must lie in [0, 1], found 0.5..1e+300")
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]


def test_out_of_memory_is_one_line(capsys, tmp_path, monkeypatch):
    """What the limit does not foresee (another process took the memory meanwhile) is one line too."""
    import vae_ext.cli.train as T

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 2.9 GiB for an array with shape (1000000, 784)")

    monkeypatch.setattr(T, "load_data", no_memory)
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", *TINY)
    assert_one_line_error(rc, err, "out of memory (Unable to allocate 2.9 GiB")


# --------------------------------------------------------------------------- 8: malformed checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = train_one_epoch(tmp_path_factory.mktemp("ck") / "run", *TINY)
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _set(key, value):
    return lambda ck: ck.__setitem__(key, value)


def _drop(key):
    return lambda ck: ck.pop(key)


MALFORMED = {
    "version-str": (_set("version", "1"), "'version'"),
    "version-none": (_set("version", None), "'version'"),
    "config-missing": (_drop("config"), "'config'"),
    "config-list": (_set("config", [1, 2]), "'config'"),
    "model_config-missing": (_drop("model_config"), "'model_config'"),
    "model_config-list": (_set("model_config", ["mlp"]), "'model_config'"),
    "model_state-list": (_set("model_state", [torch.zeros(2)]), "'model_state'"),
    "model_state-other-model": (lambda ck: ck["model_state"].__setitem__(
        next(iter(ck["model_state"])), torch.zeros(3, 3)), "'model_state'"),
    "epoch-missing": (_drop("epoch"), "'epoch'"),
    "epoch-str": (_set("epoch", "1"), "'epoch'"),
    "epoch-float": (_set("epoch", 1.0), "'epoch'"),
    "history-missing": (_drop("history"), "'history'"),
    "history-int": (_set("history", 3), "'history'"),
    "history-row-without-step": (lambda ck: ck["history"][0].pop("step"), "'history'"),
    "optimizer_state-garbage": (_set("optimizer_state", {"state": 5}), "'optimizer_state'"),
    "optimizer_state-wrong-count": (_set("optimizer_state", {"state": {}, "param_groups": [{"params": [0]}]}),
                                    "'optimizer_state'"),
    "latent-1e9": (lambda ck: ck["model_config"].__setitem__("latent_size", 10**9), "would need about"),
    # a float size is refused, not truncated to an int (vae_ext/models/base.py _positive_ints)
    "latent-float": (lambda ck: ck["model_config"].__setitem__("latent_size", 2.5),
                     "latent_size: expected integer sizes, got 2.5"),
}


@pytest.mark.parametrize("command", ["eval", "resume"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_fields_are_named(capsys, tmp_path, good_checkpoint, command, case):
    import copy

    mutate, match = MALFORMED[case]
    ck = copy.deepcopy(good_checkpoint)
    mutate(ck)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(ck, run_dir / "checkpoint.pt")
    before = (run_dir / "checkpoint.pt").read_bytes()
    argv = (["eval", run_dir, "--k", "2", "--no-progress"] if command == "eval"
            else ["train", "--resume", run_dir, "--epochs", "2", "--no-progress"])
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, "checkpoint.pt", match)
    assert out == ""  # refused on load: nothing evaluated, nothing trained
    assert (run_dir / "checkpoint.pt").read_bytes() == before
