"""IDX files (the MNIST format, http://yann.lecun.com/exdb/mnist/), gzipped or raw.

The header (magic, type code, dimension count, big-endian uint32 dimensions) says how big the data
is, so a file is refused before its data is read or inflated when it cannot be what it claims: too
many dimensions, more memory than :mod:`vae_ext.cli.memory` allows, or (raw) a file size that does not
match. A gzip stream is read into an array of exactly the promised size and stopped there, so a
decompression bomb costs no more than its header admits to.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError
from .memory import check_fits, format_bytes

__all__ = ["read_idx", "parse_idx", "MAX_DIMS"]

# IDX type codes: big-endian data after a big-endian header.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_DIMS = 32  # numpy 1.x's limit (2.x allows 64); an image file has 3
# Deflate inflates at most 1032-fold, so a gzip file of n bytes holds at most this many times n:
# a header that promises more is truncated, known before anything is allocated.
_GZIP_MAX_RATIO = 1032
_CHUNK = 1 << 22


def _read_exactly(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _read_idx_stream(f, name: str, size: int | None, extra_bytes_per_value: int,
                     max_size: int | None = None) -> np.ndarray:
    """Read an IDX file from the binary stream ``f`` (``size``: its length, when known; ``max_size``:
    the most it can be, when only that is known)."""
    head = _read_exactly(f, 4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or head[3] == 0:
        magic = int.from_bytes(head.ljust(4, b"\0"), "big")
        raise DataError(f"{name}: not an IDX file (magic number 0x{magic:08x})")
    ndim = head[3]
    header = 4 + 4 * ndim
    if ndim > MAX_DIMS:
        raise DataError(f"{name}: the IDX header claims {ndim} dimensions; at most {MAX_DIMS} are supported")
    rest = _read_exactly(f, 4 * ndim)
    if len(rest) < 4 * ndim:
        raise DataError(f"{name}: truncated IDX file: the header needs {header} bytes, found {4 + len(rest)}")
    dims = struct.unpack(f">{ndim}I", rest)
    dtype = np.dtype(_IDX_DTYPES[head[2]])
    count = math.prod(dims)
    need = count * dtype.itemsize
    shape = "x".join(map(str, dims))
    if size is not None and size - header != need:
        what = "truncated IDX file" if size - header < need else "IDX file with trailing bytes"
        raise DataError(f"{name}: {what}: shape {shape} needs {need} bytes of data, found {size - header}")
    if max_size is not None and header + need > max_size:
        raise DataError(f"{name}: truncated IDX file: shape {shape} needs {need} bytes of data, more than "
                        f"the compressed file can hold")
    check_fits(need + count * extra_bytes_per_value, f"{name}: its IDX header (shape {shape}, {dtype.name})")
    arr = np.empty(count, dtype=dtype)
    view = memoryview(arr).cast("B")
    got = 0
    while got < need:
        n = f.readinto(view[got:got + _CHUNK])
        if not n:
            raise DataError(f"{name}: truncated IDX file: shape {shape} needs {need} bytes of data, found {got}")
        got += n
    if f.read(1):
        raise DataError(f"{name}: IDX file with trailing bytes: shape {shape} needs {need} bytes of data "
                        f"({format_bytes(need)}), found more")
    if not dtype.isnative:
        arr = arr.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return arr.reshape(dims)


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into an array of its shape and type."""
    return _read_idx_stream(io.BytesIO(raw), name, len(raw), 0)


def read_idx(path, *, extra_bytes_per_value: int = 0) -> np.ndarray:
    """Read an IDX file, gzipped (detected from its first bytes, not its name) or raw.

    The memory check counts the data plus ``extra_bytes_per_value`` for each value (what the caller
    will make of it, e.g. float32 images).
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            if f.read(2) == b"\x1f\x8b":
                f.seek(0)
                most = _GZIP_MAX_RATIO * os.fstat(f.fileno()).st_size + 1024
                with gzip.GzipFile(fileobj=f, mode="rb") as g:
                    return _read_idx_stream(g, str(path), None, extra_bytes_per_value, most)
            f.seek(0)
            return _read_idx_stream(f, str(path), os.fstat(f.fileno()).st_size, extra_bytes_per_value)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
