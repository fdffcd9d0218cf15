"""MNIST data: the embedded copy, the usual on-disk formats, normalisation, streaming.

Never imports TensorFlow: this module sits on the inference path.

Readers return a :class:`Dataset`, whose images are read lazily (memory-mapped
``.npy`` and plain IDX, sequential reads for gzipped IDX, one file at a time for
PNG folders), so a bulk job can stream millions of images in bounded memory.

Supported sources (see :func:`open_dataset`):

* ``mnist`` / ``mnist:test`` / ``mnist:train``: the embedded MNIST copy;
* ``file.npz``: keras layout (``x_train, y_train, x_test, y_test``), ``--split`` picks;
* ``dir/`` or ``file-images-idx3-ubyte[.gz]``: IDX files (labels found beside them);
* ``file.npy``: an array of images, ``(N, 28, 28)``, ``(N, 28, 28, 1)`` or flattened
  ``(N, 784)``; optional labels ``.npy``;
* ``file.csv``: Kaggle's MNIST layout (``label,pixel0..pixel783`` or just the pixels,
  with or without a header), read row ranges at a time;
* ``dir/`` of image files (PNG, JPEG, BMP, TIFF, GIF) of any size and colour, brought
  to MNIST's format (see :mod:`gpu_mdf.images`); labels from digit-named sub-folders.
"""

from __future__ import annotations

import gzip
import re
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine.preprocess import NORMALIZATIONS, check_finite, normalize  # noqa: F401  (re-exported)
from .errors import DataError
from .io import file_sha256

EMBEDDED_MNIST = Path(__file__).parent / "_data" / "mnist.npz"
EMBEDDED_MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"

_verified: set[Path] = set()


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
@dataclass
class Dataset:
    """Images (N, H, W) read lazily, with labels when known.

    ``reader(start, stop)`` returns the images ``[start, stop)`` as a NumPy array.
    """

    name: str
    length: int
    image_shape: tuple[int, ...]
    dtype: np.dtype
    reader: Callable[[int, int], np.ndarray] = field(repr=False)
    labels: np.ndarray | None = None
    item_names: Callable[[int], str] | None = field(default=None, repr=False)
    inverted: dict | None = field(default=None, repr=False)   # image folders: index -> inverted?
    path: str | None = None                                   # the full path of the source

    def __len__(self) -> int:
        return self.length

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.length if stop is None else min(stop, self.length)
        return self.reader(start, stop)

    def item_name(self, i: int) -> str:
        return self.item_names(i) if self.item_names else f"{self.name}[{i}]"

    def chunks(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(offset, images)`` for consecutive chunks of ``batch_size``."""
        for lo in range(start, self.length, batch_size):
            yield lo, self.read(lo, lo + batch_size)

    def describe(self) -> str:
        lab = "with labels" if self.labels is not None else "no labels"
        return f"{self.name}: {self.length} images {self.image_shape} {self.dtype}, {lab}"


def _array_dataset(name: str, x: np.ndarray, y: np.ndarray | None) -> Dataset:
    x = _check_images(name, x)
    y = _check_labels(name, y, len(x))
    return Dataset(name, len(x), tuple(x.shape[1:]), x.dtype, lambda a, b: np.asarray(x[a:b]), y)


def _check_images(name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{name}: expected images shaped (N, H, W), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name}: expected uint8 or float images, got dtype {x.dtype}")
    return x


def _check_labels(name: str, y: np.ndarray | None, n: int) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{name}: {len(y) if y.ndim else 0} labels for {n} images (shape {y.shape})")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _raw_reader(path: Path, offset: int, dtype: np.dtype, item_shape: tuple, n: int):
    """Read items [a, b) of a fixed-layout file with positioned reads.

    Unlike a memory map, pages read this way do not stay in the process's resident
    memory, so streaming a file of any size keeps memory bounded.
    """
    import os

    item_bytes = int(np.prod(item_shape)) * dtype.itemsize
    fd_holder: dict = {}
    lock = threading.Lock()

    def reader(a: int, b: int) -> np.ndarray:
        with lock:  # positioned reads on one descriptor are thread-safe; opening it once is not
            fd = fd_holder.get("fd")
            if fd is None:
                fd = fd_holder["fd"] = os.open(path, os.O_RDONLY)
        b = min(b, n)
        out = np.empty((b - a,) + tuple(item_shape), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        want, pos, got = (b - a) * item_bytes, offset + a * item_bytes, 0
        while got < want:
            k = os.preadv(fd, [view[got:]], pos + got)
            if k <= 0:
                raise DataError(f"{path}: truncated data at image {a + got // item_bytes}")
            got += k
        return out
    return reader


# --------------------------------------------------------------------------- #
# Embedded copy and keras-layout npz
# --------------------------------------------------------------------------- #
def verify_embedded(path: Path = EMBEDDED_MNIST) -> None:
    """Check the embedded file against its published checksum (once per process)."""
    if path in _verified:
        return
    if not path.exists():
        raise DataError(f"embedded MNIST missing at {path}: reinstall gpu-mdf")
    digest = file_sha256(path)
    if digest != EMBEDDED_MNIST_SHA256:
        raise DataError(f"embedded MNIST at {path} is corrupt: sha256 {digest[:12]}..., "
                        f"expected {EMBEDDED_MNIST_SHA256[:12]}...")
    _verified.add(path)


def load_mnist(path: str | Path | None = None):
    """Return ``(x_train, y_train), (x_test, y_test)`` like ``keras.datasets.mnist.load_data``.

    ``path=None`` reads the embedded copy (checksum verified).
    """
    if path is None:
        verify_embedded()
        path = EMBEDDED_MNIST
    arrays = _read_npz(Path(path), ("x_train", "y_train", "x_test", "y_test"))
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: not a keras-layout MNIST npz, missing arrays {missing} "
                                f"(has {sorted(z.files)})")
            out = {k: z[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: unreadable npz ({type(e).__name__}: {e})") from None
    return out


def _npz_dataset(path: Path, split: str) -> Dataset:
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    arrays = _read_npz(path, (f"x_{split}", f"y_{split}"))
    return _array_dataset(f"{path.name}:{split}", arrays[f"x_{split}"], arrays[f"y_{split}"])


# --------------------------------------------------------------------------- #
# IDX (the original MNIST distribution format), plain or gzipped
# --------------------------------------------------------------------------- #
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


def _idx_dataset(images: Path, labels: Path | None) -> Dataset:
    dtype, shape, off = read_idx_header(images)
    if len(shape) != 3:
        raise DataError(f"{images}: expected a 3-d IDX image file, got shape {shape}")
    n, per = shape[0], int(np.prod(shape[1:]))
    if images.suffix == ".gz":
        state: dict = {}
        lock = threading.Lock()  # one decompressor, shared: readers take turns

        def reader(a: int, b: int) -> np.ndarray:
            with lock:
                f = state.get("f")
                if f is None:
                    f = state["f"] = gzip.open(images, "rb")
                f.seek(off + a * per * dtype.itemsize)  # forward seeks are sequential reads
                raw = f.read((b - a) * per * dtype.itemsize)
            if len(raw) != (b - a) * per * dtype.itemsize:
                raise DataError(f"{images}: truncated IDX data at image {a}")
            return np.frombuffer(raw, dtype=dtype).reshape((b - a,) + shape[1:])
    else:
        expected = off + n * per * dtype.itemsize
        if images.stat().st_size < expected:
            raise DataError(f"{images}: truncated IDX data ({images.stat().st_size} of {expected} bytes)")
        raw = _raw_reader(images, off, dtype, tuple(shape[1:]), n)   # IDX is big-endian

        def reader(a: int, b: int) -> np.ndarray:
            return raw(a, b).astype(dtype.newbyteorder("="), copy=False)

    y = read_idx(labels) if labels is not None else None
    return Dataset(images.name, n, tuple(shape[1:]), dtype, reader, _check_labels(images.name, y, n))


def _find_idx_pair(folder: Path, split: str) -> tuple[Path, Path | None]:
    prefix = "train" if split == "train" else "t10k"
    for ext in ("", ".gz"):
        img = folder / f"{prefix}-images-idx3-ubyte{ext}"
        if img.exists():
            return img, _labels_beside(img)
    raise DataError(f"{folder}: no {prefix}-images-idx3-ubyte[.gz] in this folder")


def _labels_beside(img: Path) -> Path | None:
    name = img.name.replace("images-idx3", "labels-idx1")
    for cand in (img.with_name(name), img.with_name(name.removesuffix(".gz")),
                 img.with_name(name.removesuffix(".gz") + ".gz")):
        if cand.exists() and cand != img:
            return cand
    return None


# --------------------------------------------------------------------------- #
# .npy and PNG folders
# --------------------------------------------------------------------------- #
def _npy_dataset(path: Path, labels: Path | None) -> Dataset:
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable .npy ({e})") from None
    y = None
    if labels is not None:
        try:
            y = np.load(labels, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: unreadable labels .npy ({e})") from None
    if fortran or dtype.hasobject or len(shape) < 2:
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: unreadable .npy ({e})") from None
        return _array_dataset(path.name, x, y)
    _check_images(path.name, np.empty((0,) + tuple(shape[1:]), dtype))
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise DataError(f"{path}: truncated .npy ({path.stat().st_size} of {need} bytes)")
    reader = _raw_reader(path, offset, dtype, tuple(shape[1:]), shape[0])
    return Dataset(path.name, shape[0], tuple(shape[1:]), dtype, reader,
                   _check_labels(path.name, y, shape[0]))


def _image_dataset(folder: Path, size=(28, 28), invert: str = "auto") -> Dataset:
    """A folder of image files, each brought to MNIST's format when it is read: any size,
    colour or polarity; a file that cannot be read fails alone (its own error)."""
    from .images import image_files, load_grey, to_mnist

    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: no image files (.png, .jpg, .bmp, .tif, .gif) in this folder")
    digit_dirs = all(p.parent != folder and re.fullmatch(r"\d", p.parent.name) for p in files)
    labels = np.array([int(p.parent.name) for p in files]) if digit_dirs else None
    inverted: dict[int, bool] = {}

    def reader(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a,) + tuple(size), np.uint8)
        for i, p in enumerate(files[a:b]):
            out[i], inverted[a + i] = to_mnist(load_grey(p), size, invert)
        return out

    return Dataset(folder.name, len(files), tuple(size), np.dtype(np.uint8), reader, labels,
                   item_names=lambda i: str(files[i]), inverted=inverted)


def _csv_dataset(path: Path) -> Dataset:
    """Kaggle's MNIST CSV: ``label,pixel0,...,pixel783`` (train.csv) or the pixels alone
    (test.csv), with or without a header line. One pass records each row's byte offset
    (and label); rows are then read range by range with positioned reads."""
    import array
    import os

    offsets, labels = array.array("q"), array.array("h")
    try:
        with open(path, "rb") as f:
            first = f.readline()
            fields = first.decode("utf-8", "replace").strip().split(",")
            header = any(c.isalpha() for c in first.decode("utf-8", "replace"))
            if header:
                has_label = fields[0].strip().strip('"').lower() == "label"
                pos = len(first)
            else:
                has_label = len(fields) == 785
                pos = 0
                f.seek(0)
            ncols = len(fields)
            for line in f:
                if line.strip():
                    offsets.append(pos)
                    if has_label:
                        try:
                            labels.append(int(line[:line.index(b",")]))
                        except ValueError:
                            raise DataError(f"{path}: row {len(offsets)}: the label is not an integer") from None
                pos += len(line)
    except OSError as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from None
    npix = ncols - int(has_label)
    if npix != 784:
        raise DataError(f"{path}: {ncols} columns; expected 784 pixels, with or without a label column first")
    n = len(offsets)
    offs = np.frombuffer(offsets, np.int64).copy() if n else np.zeros(0, np.int64)
    end = pos
    fd_holder: dict = {}
    lock = threading.Lock()

    def reader(a: int, b: int) -> np.ndarray:
        with lock:
            fd = fd_holder.get("fd")
            if fd is None:
                fd = fd_holder["fd"] = os.open(path, os.O_RDONLY)
        start = int(offs[a])
        stop = int(offs[b]) if b < n else end
        block = os.pread(fd, stop - start, start)
        try:
            vals = np.array(block.replace(b"\r", b"").replace(b"\n", b",").rstrip(b",").split(b","), dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: rows {a}-{b - 1}: a value is not a number") from None
        if vals.size != (b - a) * ncols:
            raise DataError(f"{path}: rows {a}-{b - 1}: expected {ncols} values per row")
        px = vals.reshape(b - a, ncols)[:, int(has_label):]
        if np.all((px >= 0) & (px <= 255) & (px == np.round(px))):
            return px.astype(np.uint8).reshape(b - a, 28, 28)
        return px.astype(np.float32).reshape(b - a, 28, 28)

    y = np.frombuffer(labels, np.int16).astype(np.int64) if has_label and n else None
    return Dataset(path.name, n, (28, 28), np.dtype(np.uint8), reader, y,
                   item_names=lambda i: f"{path.name} row {i}")


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #
def open_dataset(source: str | Path | None = None, split: str = "test",
                 labels: str | Path | None = None, image_size=(28, 28), invert: str = "auto") -> Dataset:
    """Open any supported source lazily; ``None`` means the embedded MNIST test set.

    ``image_size`` and ``invert`` apply to folders of image files (see :mod:`gpu_mdf.images`).
    """
    ds = _open(source, split, labels, image_size, invert)
    if ds.path is None and source is not None and not str(source).startswith("mnist"):
        ds.path = str(Path(source).resolve())
    return ds


def _open(source, split, labels, image_size, invert) -> Dataset:
    src = "mnist" if source is None else str(source)
    m = re.fullmatch(r"mnist(?::(train|test))?", src)
    if m:   # the embedded copy: verified, and only the asked-for split is decompressed
        verify_embedded()
        ds = _npz_dataset(EMBEDDED_MNIST, m.group(1) or split)
        ds.name = f"mnist:{m.group(1) or split}"
        return ds
    path = Path(src)
    lab = Path(labels) if labels is not None else None
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if any(path.glob("*-images-idx3-ubyte*")):
            img, found = _find_idx_pair(path, split)
            return _idx_dataset(img, lab or found)
        return _image_dataset(path, image_size, invert)
    name = path.name.lower()
    if name.endswith(".npz"):
        return _npz_dataset(path, split)
    if name.endswith(".npy"):
        return _npy_dataset(path, lab)
    if name.endswith(".csv"):
        return _csv_dataset(path)
    if "idx3" in name or name.endswith((".idx", ".idx.gz")):
        return _idx_dataset(path, lab or _labels_beside(path))
    raise DataError(f"{path}: unknown data format (expected .npz, .npy, .csv, IDX or a folder of images)")
