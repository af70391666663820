"""A reader for IDX files, the format of MNIST and Fashion-MNIST, gzipped or not.

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 TYPE NDIM`` (TYPE 0x08 for unsigned bytes, …), then NDIM sizes as big-endian
uint32, then the values in row-major (C) order, big-endian. MNIST's label files therefore start
with 0x00000801 and its image files with 0x00000803.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from gradtool.data.base import DataError

# the IDX type byte → NumPy dtype (big-endian, as the format stores it)
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", file=path)
    data = path.read_bytes()
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except EOFError as exc:  # the stream stops before gzip's end marker
        raise DataError(f"truncated gzip file ({len(data)} bytes): {exc}", file=path,
                        hint="download or copy the file again") from None
    except (OSError, zlib.error) as exc:  # bad header, bad CRC, bad deflate data
        raise DataError(f"corrupt gzip file: {exc}", file=path,
                        hint="download or copy the file again") from None


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzip-compressed or not, told by its first
    bytes, not by its name), in native byte order and the IDX shape.

    ``ndim``: the number of dimensions the caller expects (1 for labels, 3 for images); the
    magic number must say so. Raises :class:`DataError` naming the file when it is missing,
    a corrupt or truncated gzip stream, has a bad magic number or an unknown type byte, or
    holds more or fewer bytes than its header promises ("expected 47040016 bytes, found 1000").
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"truncated IDX file: {len(data)} bytes, shorter than the 4-byte magic "
                        "number", file=path)
    magic = int.from_bytes(data[:4], "big")
    zero, type_code, dims = data[:2], data[2], data[3]
    if zero != b"\0\0" or type_code not in IDX_DTYPES or dims == 0:
        raise DataError(f"bad magic number 0x{magic:08X}: not an IDX file (IDX files start "
                        "with 0x000008NN for unsigned bytes, NN the number of dimensions)",
                        file=path)
    if ndim is not None and dims != ndim:
        expected = (type_code << 8) | ndim
        raise DataError(f"bad magic number 0x{magic:08X}: an IDX file of {dims} dimension(s), "
                        f"expected {ndim} (magic 0x{expected:08X})", file=path,
                        hint="are the image and label files swapped?")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(f"truncated IDX file: expected at least {header} header bytes, found "
                        f"{len(data)}", file=path)
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "corrupt"
        raise DataError(f"{kind} IDX file: expected {expected} bytes, found {len(data)} (its "
                        f"header promises {shape} values of {dtype.name})", file=path,
                        hint="download or copy the file again")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native byte order
