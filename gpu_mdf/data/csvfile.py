"""Kaggle's MNIST CSV: ``label,pixel0,...,pixel783`` (train.csv) or the pixels alone
(test.csv), with or without a header line. One pass records each row's byte offset
(and label); rows are then read range by range with positioned reads."""

from __future__ import annotations

import array
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset, SharedDescriptor
from .sources import OpenOptions, PathSource, source

PIXELS = 784


@dataclass
class _RowIndex:
    """Where each row of a CSV file starts, and its label when the file has them."""

    offsets: np.ndarray      # int64 byte offset of each non-empty row
    labels: np.ndarray | None
    columns: int
    has_label: bool
    end: int                 # the file's length in bytes


def _index_rows(path: Path) -> _RowIndex:
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
                has_label = len(fields) == PIXELS + 1
                pos = 0
                f.seek(0)
            for line in f:
                if line.strip():
                    offsets.append(pos)
                    if has_label:
                        labels.append(_label(path, line, len(offsets)))
                pos += len(line)
    except OSError as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from None
    n = len(offsets)
    return _RowIndex(np.frombuffer(offsets, np.int64).copy() if n else np.zeros(0, np.int64),
                     np.frombuffer(labels, np.int16).astype(np.int64) if has_label and n else None,
                     len(fields), has_label, pos)


def _label(path: Path, line: bytes, row: int) -> int:
    try:
        return int(line[:line.index(b",")])
    except ValueError:
        raise DataError(f"{path}: row {row}: the label is not an integer") from None


def _rows_reader(path: Path, rows: _RowIndex):
    """Rows [a, b) as (b - a, 28, 28) images: uint8 when every value is a whole 0-255, else float32."""
    descriptor = SharedDescriptor(path)
    n, ncols, skip = len(rows.offsets), rows.columns, int(rows.has_label)

    def reader(a: int, b: int) -> np.ndarray:
        start = int(rows.offsets[a])
        stop = int(rows.offsets[b]) if b < n else rows.end
        block = os.pread(descriptor.fd(), stop - start, start)
        try:
            vals = np.array(block.replace(b"\r", b"").replace(b"\n", b",").rstrip(b",").split(b","), dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: rows {a}-{b - 1}: a value is not a number") from None
        if vals.size != (b - a) * ncols:
            raise DataError(f"{path}: rows {a}-{b - 1}: expected {ncols} values per row")
        px = vals.reshape(b - a, ncols)[:, skip:]
        if np.all((px >= 0) & (px <= 255) & (px == np.round(px))):
            return px.astype(np.uint8).reshape(b - a, 28, 28)
        return px.astype(np.float32).reshape(b - a, 28, 28)
    return reader


@source(".csv")
class CsvFile(PathSource):
    """Kaggle's MNIST CSV (see the module)."""

    def open(self, options: OpenOptions) -> Dataset:
        path = self.path
        rows = _index_rows(path)
        if rows.columns - int(rows.has_label) != PIXELS:
            raise DataError(f"{path}: {rows.columns} columns; expected 784 pixels, with or without a label "
                            "column first")
        return Dataset(path.name, len(rows.offsets), (28, 28), np.dtype(np.uint8), _rows_reader(path, rows),
                       rows.labels, item_names=lambda i: f"{path.name} row {i}")
