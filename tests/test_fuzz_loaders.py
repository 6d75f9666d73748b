"""Fuzzing the loaders the command trusts least: IDX files (raw and gzipped), .npz arrays and
checkpoints, corrupted in every region and in seeded random ways.

Every case must either load or raise a VaeExtError whose one-line message names the file; never
another exception, a hang, or a big allocation (tracemalloc's peak stays small while the hostile
headers claim terabytes). Deterministic (seeded) and a few seconds in all; each test asserts how
many cases it tried, so a generator that quietly makes none fails too.
"""
from __future__ import annotations

import gzip
import io
import random
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from vae_ext import cli
from vae_ext.cli.checkpoint import load_checkpoint
from vae_ext.cli.data import load_data
from vae_ext.cli.errors import VaeExtError

from helpers import train_one_epoch

SEED = 20261202
PEAK_LIMIT = 16 << 20  # no case may make numpy or Python allocate more than this


def idx_file(arr: np.ndarray, code: int = 0x08) -> bytes:
    big = {0x08: "u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(big).tobytes()


def npz_file(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def images(n=5, h=4, w=4) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def flips(data: bytes, n: int, rng: random.Random):
    """n copies of data, each with 1 to 4 bytes set to random values."""
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b)


def truncations(data: bytes, every: int = 1):
    """data cut at every `every`-th offset (every region: header, dimensions, data, trailer)."""
    return (data[:k] for k in range(0, len(data), every))


class Outcomes:
    def __init__(self):
        self.loaded = self.refused = 0

    @property
    def tried(self):
        return self.loaded + self.refused


def _try(load, name: str, outcomes: Outcomes) -> None:
    try:
        load()
    except VaeExtError as e:
        msg = str(e)
        assert "\n" not in msg and name in msg, msg
        outcomes.refused += 1
    else:
        outcomes.loaded += 1


@pytest.fixture
def peak():
    tracemalloc.start()
    yield
    used = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert used < PEAK_LIMIT, f"peak allocation {used} bytes"


def _idx_cases(rng):
    good = idx_file(images())
    yield from truncations(good)
    yield from flips(good, 300, rng)
    yield good[:2] + b"\x07" + good[3:]  # unknown type code
    yield b"\x12\x34" + good[2:]  # wrong magic
    for ndim in (1, 2, 4, 5, 255):  # dimension counts an image file cannot have
        yield bytes([0, 0, 8, ndim]) + struct.pack(f">{ndim}I", *([2] * ndim)) + bytes(2**min(ndim, 5))
    for dims in ((2**32 - 1, 2**32 - 1, 2**32 - 1), (2**31, 28, 28), (5, 2**32 - 1, 1)):  # terabytes
        yield bytes([0, 0, 8, 3]) + struct.pack(">3I", *dims) + bytes(100)
    yield bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", 5, 4, 4) + np.full(80, np.nan, ">f4").tobytes()  # NaN pixels
    yield bytes([0, 0, 0x0B, 3]) + struct.pack(">3I", 5, 4, 4) + np.full(80, 300, ">i2").tobytes()  # > 255
    yield bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", 5, 4, 4) + np.full(80, 1.5, ">f4").tobytes()  # > 1


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_loader_fuzz(tmp_path, peak, gz):
    rng = random.Random(SEED + gz)
    outcomes = Outcomes()
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    files = [gzip.compress(raw, mtime=0) if gz else raw for raw in _idx_cases(rng)]
    if gz:  # and the gzip stream of the good file itself, cut at every byte and flipped
        good = gzip.compress(idx_file(images()), mtime=0)
        files += list(truncations(good)) + list(flips(good, 300, rng))
    for i, data in enumerate(files):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / name).write_bytes(data)
        _try(lambda folder=folder: load_data(f"mnist:{folder}", binarize_mode="none"), str(folder), outcomes)
    print(f"IDX ({'gzip' if gz else 'raw'}): {outcomes.tried} cases, {outcomes.refused} refused, "
          f"{outcomes.loaded} loaded")
    assert outcomes.tried > (700 if gz else 350) and outcomes.refused > outcomes.tried // 2


def _npz_cases(rng):
    good = npz_file(train=images(6), test=images(3))
    yield from truncations(good, 2)
    yield from flips(good, 300, rng)
    yield b"PK\x05\x06" + bytes(18)  # an empty zip
    yield npz_file(images=np.full((5, 4, 4), np.nan))
    yield npz_file(images=np.full((5, 4, 4), 1.5))
    yield npz_file(images=np.full((5, 4, 4), -0.1))
    yield npz_file(images=np.full((5, 4, 4), 300, np.int16))
    yield npz_file(images=np.array([[1, 2]], dtype=object).repeat(5, 0))  # pickled objects
    yield npz_file(images=np.zeros((5, 4), np.complex64))
    yield npz_file(a=images(), b=images())  # no recognisable names
    yield npz_file(train=images(5, 4, 4), test=images(5, 3, 3))  # different sizes
    for shape in ((2**40, 28, 28), (5, 2**31, 2**31)):  # headers that claim terabytes
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
            zf.writestr("images.npy", header.getvalue() + bytes(64))
        yield buf.getvalue()


def test_npz_loader_fuzz(tmp_path, peak):
    rng = random.Random(SEED)
    outcomes = Outcomes()
    for i, data in enumerate(_npz_cases(rng)):
        path = tmp_path / f"case{i}.npz"
        path.write_bytes(data)
        _try(lambda path=path: load_data(str(path), binarize_mode="none"), str(path), outcomes)
    print(f"npz: {outcomes.tried} cases, {outcomes.refused} refused, {outcomes.loaded} loaded")
    assert outcomes.tried > 500 and outcomes.refused > outcomes.tried // 2


class NotWeights:
    """A pickled object: weights_only loading must refuse it (and never run its code)."""

    def __reduce__(self):
        return (print, ("this must not run",))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    out = train_one_epoch(tmp_path_factory.mktemp("fuzz") / "run",
                          "--hidden", "4", "--latent", "2", "--batch-size", "512", "--no-progress")
    return (out / "checkpoint.pt").read_bytes()


def _checkpoint_cases(good: bytes, rng):
    yield from truncations(good, max(1, len(good) // 150))
    yield from flips(good, 150, rng)
    ck = torch.load(io.BytesIO(good), weights_only=True)

    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    yield saved(NotWeights())
    yield saved({"format": "vae_ext.checkpoint", "version": 1, "payload": NotWeights()})
    other = dict(ck, model_config=dict(ck["model_config"], hidden_sizes=[5]))  # another model's weights
    yield saved(other)
    yield saved(dict(ck, model_config=dict(ck["model_config"], input_shape=[2**20, 2**20, 2**20])))  # terabytes
    yield saved([1, 2, 3])
    yield b"\x80\x04 not a checkpoint"
    yield b""


def test_checkpoint_loader_fuzz(tmp_path, checkpoint_bytes, capsys, peak):
    rng = random.Random(SEED)
    outcomes = Outcomes()
    for i, data in enumerate(_checkpoint_cases(checkpoint_bytes, rng)):
        path = tmp_path / f"case{i}.pt"
        path.write_bytes(data)
        _try(lambda path=path: load_checkpoint(path), str(path), outcomes)
    assert "this must not run" not in capsys.readouterr().out
    print(f"checkpoint: {outcomes.tried} cases, {outcomes.refused} refused, {outcomes.loaded} loaded")
    assert outcomes.tried > 300 and outcomes.refused > outcomes.tried // 2


@pytest.mark.parametrize("kind", ["idx", "npz", "checkpoint"])
def test_the_command_reports_a_hostile_file_in_one_line(tmp_path, capsys, kind, checkpoint_bytes):
    """Through the command: one line naming the file, exit status 1 (the loaders' errors above)."""
    if kind == "idx":
        (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 28, 28))
        argv, name = ["train", "--data", f"mnist:{tmp_path}"], "t10k-images-idx3-ubyte"
    elif kind == "npz":
        (tmp_path / "d.npz").write_bytes(npz_file(images=np.full((5, 4, 4), np.nan)))
        argv, name = ["train", "--data", str(tmp_path / "d.npz")], "d.npz"
    else:
        (tmp_path / "c.pt").write_bytes(checkpoint_bytes[: len(checkpoint_bytes) // 2])
        argv, name = ["eval", str(tmp_path / "c.pt")], "c.pt"
    if kind != "checkpoint":
        argv += ["--out", str(tmp_path / "r")]
    rc = cli.main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and name in err and "Traceback" not in err, err
