"""``.npy`` arrays of images: ``(N, H, W)``, ``(N, H, W, 1)`` or flattened ``(N, H*W)``,
with an optional labels ``.npy``; read by positioned reads, so any size streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset, array_dataset, check_images, check_labels, raw_reader
from .sources import OpenOptions, PathSource, source


def _read_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data_offset)`` of a ``.npy`` file."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            return shape, fortran, dtype, f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable .npy ({e})") from None


def _load(file: Path, images: Path, what: str, **kwargs) -> np.ndarray:
    """``np.load`` of ``file``; a failure is a :class:`DataError` about the ``images`` file."""
    try:
        return np.load(file, allow_pickle=False, **kwargs)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{images}: unreadable {what} ({e})") from None


@source(".npy")
class NpyFile(PathSource):
    """A ``.npy`` array; ``labels`` a ``.npy`` of integers beside it."""

    def open(self, options: OpenOptions) -> Dataset:
        path = self.path
        shape, fortran, dtype, offset = _read_header(path)
        y = None if options.labels is None else _load(options.labels, path, "labels .npy")
        if fortran or dtype.hasobject or len(shape) < 2:     # the unusual layouts: through a memory map
            return array_dataset(path.name, _load(path, path, ".npy", mmap_mode="r"), y)
        check_images(path.name, np.empty((0,) + tuple(shape[1:]), dtype))
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < need:
            raise DataError(f"{path}: truncated .npy ({path.stat().st_size} of {need} bytes)")
        reader = raw_reader(path, offset, dtype, tuple(shape[1:]), shape[0])
        return Dataset(path.name, shape[0], tuple(shape[1:]), dtype, reader, check_labels(path.name, y, shape[0]))
