"""The :class:`Dataset` every source returns, and the pieces its readers share."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from .sources import Source


@dataclass
class Dataset:
    """Images (N, H, W) read lazily, with labels when known.

    ``reader(start, stop)`` returns the images ``[start, stop)`` as a NumPy array;
    ``source`` is what :func:`~gpu_mdf.data.open_dataset` opened (its
    :meth:`~gpu_mdf.data.sources.Source.identity` names the data for resume, metrics
    and Dask workers).
    """

    name: str
    length: int
    image_shape: tuple[int, ...]
    dtype: np.dtype
    reader: Callable[[int, int], np.ndarray] = field(repr=False)
    labels: np.ndarray | None = None
    item_names: Callable[[int], str] | None = field(default=None, repr=False)
    inverted: dict | None = field(default=None, repr=False)   # image folders: index -> inverted?
    source: Source | None = field(default=None, repr=False)

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


def array_dataset(name: str, x: np.ndarray, y: np.ndarray | None) -> Dataset:
    """A dataset over arrays already at hand (in memory or memory-mapped)."""
    x = check_images(name, x)
    y = check_labels(name, y, len(x))
    return Dataset(name, len(x), tuple(x.shape[1:]), x.dtype, lambda a, b: np.asarray(x[a:b]), y)


def check_images(name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{name}: expected images shaped (N, H, W), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name}: expected uint8 or float images, got dtype {x.dtype}")
    return x


def check_labels(name: str, y: np.ndarray | None, n: int) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{name}: {len(y) if y.ndim else 0} labels for {n} images (shape {y.shape})")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


class SharedDescriptor:
    """One read-only file descriptor, opened on first use and shared by reader threads
    (positioned reads on one descriptor are thread-safe; opening it once is not)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def fd(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd


def raw_reader(path: Path, offset: int, dtype: np.dtype, item_shape: tuple, n: int):
    """Read items [a, b) of a fixed-layout file with positioned reads.

    Unlike a memory map, pages read this way do not stay in the process's resident
    memory, so streaming a file of any size keeps memory bounded.
    """
    item_bytes = int(np.prod(item_shape)) * dtype.itemsize
    descriptor = SharedDescriptor(path)

    def reader(a: int, b: int) -> np.ndarray:
        fd = descriptor.fd()
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
