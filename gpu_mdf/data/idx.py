"""IDX, the original MNIST distribution format, plain or gzipped: single files and
folders holding ``train-``/``t10k-images-idx3-ubyte[.gz]`` (labels found beside them)."""

from __future__ import annotations

import gzip
import struct
import threading
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset, check_labels, raw_reader
from .sources import OpenOptions, PathSource, source

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return ``(dtype, shape, header_bytes)`` of an IDX file."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number {head.hex()})")
            ndim = head[3]
            dims = f.read(4 * ndim)
            if len(dims) != 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable IDX file ({e})") from None
    shape = struct.unpack(f">{ndim}I", dims)
    return np.dtype(_IDX_DTYPES[head[2]]), shape, 4 + 4 * ndim


def read_idx(path: str | Path) -> np.ndarray:
    """Read a whole IDX file into memory (used for labels and small files)."""
    path = Path(path)
    dtype, shape, off = read_idx_header(path)
    with _open_maybe_gz(path) as f:
        f.seek(off)
        raw = f.read()
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < need:
        raise DataError(f"{path}: truncated IDX data ({len(raw)} of {need} bytes)")
    return np.frombuffer(raw[:need], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + a.tobytes())


def _gz_reader(images: Path, dtype: np.dtype, item_shape: tuple, offset: int):
    """Items [a, b) of a gzipped IDX file: one decompressor, shared (readers take turns);
    a forward seek is a sequential read, so chunks in order stream the file once."""
    item_bytes = int(np.prod(item_shape)) * dtype.itemsize
    state: dict = {}
    lock = threading.Lock()

    def reader(a: int, b: int) -> np.ndarray:
        with lock:
            f = state.get("f")
            if f is None:
                f = state["f"] = gzip.open(images, "rb")
            f.seek(offset + a * item_bytes)
            raw = f.read((b - a) * item_bytes)
        if len(raw) != (b - a) * item_bytes:
            raise DataError(f"{images}: truncated IDX data at image {a}")
        return np.frombuffer(raw, dtype=dtype).reshape((b - a,) + item_shape)
    return reader


def _plain_reader(images: Path, dtype: np.dtype, item_shape: tuple, offset: int, n: int):
    """Items [a, b) of a plain IDX file, by positioned reads (IDX is big-endian)."""
    expected = offset + n * int(np.prod(item_shape)) * dtype.itemsize
    if images.stat().st_size < expected:
        raise DataError(f"{images}: truncated IDX data ({images.stat().st_size} of {expected} bytes)")
    raw = raw_reader(images, offset, dtype, item_shape, n)

    def reader(a: int, b: int) -> np.ndarray:
        return raw(a, b).astype(dtype.newbyteorder("="), copy=False)
    return reader


def _idx_dataset(images: Path, labels: Path | None) -> Dataset:
    dtype, shape, off = read_idx_header(images)
    if len(shape) != 3:
        raise DataError(f"{images}: expected a 3-d IDX image file, got shape {shape}")
    n, item_shape = shape[0], tuple(shape[1:])
    reader = _gz_reader(images, dtype, item_shape, off) if images.suffix == ".gz" else \
        _plain_reader(images, dtype, item_shape, off, n)
    y = read_idx(labels) if labels is not None else None
    return Dataset(images.name, n, item_shape, dtype, reader, check_labels(images.name, y, n))


def _labels_beside(img: Path) -> Path | None:
    name = img.name.replace("images-idx3", "labels-idx1")
    for cand in (img.with_name(name), img.with_name(name.removesuffix(".gz")),
                 img.with_name(name.removesuffix(".gz") + ".gz")):
        if cand.exists() and cand != img:
            return cand
    return None


@source(".idx", ".idx.gz", fallback=True)
class IdxFile(PathSource):
    """An IDX image file: named ``*.idx[.gz]`` or holding ``idx3`` in its name (tried after
    the other file kinds); labels from ``--labels`` or the ``labels-idx1`` file beside it."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return super().accepts(path) or (not path.is_dir() and "idx3" in path.name.lower())

    def open(self, options: OpenOptions) -> Dataset:
        return _idx_dataset(self.path, options.labels or _labels_beside(self.path))


@source(folder=True)
class IdxFolder(PathSource):
    """A folder of IDX files: ``--split`` picks ``train-`` or ``t10k-images-idx3-ubyte[.gz]``."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.is_dir() and any(path.glob("*-images-idx3-ubyte*"))

    def open(self, options: OpenOptions) -> Dataset:
        prefix = "train" if options.split == "train" else "t10k"
        for ext in ("", ".gz"):
            img = self.path / f"{prefix}-images-idx3-ubyte{ext}"
            if img.exists():
                return _idx_dataset(img, options.labels or _labels_beside(img))
        raise DataError(f"{self.path}: no {prefix}-images-idx3-ubyte[.gz] in this folder")
