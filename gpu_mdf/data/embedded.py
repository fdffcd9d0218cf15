"""The embedded MNIST copy and keras-layout ``.npz`` files (``x_train, y_train, x_test, y_test``)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import file_sha256
from .dataset import Dataset, array_dataset
from .sources import Identity, OpenOptions, PathSource, Source, source

EMBEDDED_MNIST = Path(__file__).parent.parent / "_data" / "mnist.npz"
EMBEDDED_MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"

_verified: set[Path] = set()


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
    """One split of a keras-layout npz (only that split is decompressed)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    arrays = _read_npz(path, (f"x_{split}", f"y_{split}"))
    return array_dataset(f"{path.name}:{split}", arrays[f"x_{split}"], arrays[f"y_{split}"])


@source()
class EmbeddedMnist(Source):
    """``mnist``, ``mnist:test``, ``mnist:train``: the copy shipped with gpu-mdf
    (checksum verified); plain ``mnist`` takes the asked-for split."""

    NAME = re.compile(r"mnist(?::(train|test))?")

    @classmethod
    def claims(cls, spec: str) -> bool:
        return cls.NAME.fullmatch(spec) is not None

    @classmethod
    def names(cls) -> list[str]:
        return ["mnist", "mnist:test", "mnist:train"]

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return False          # a file is never the embedded copy, whatever its name

    def open(self, options: OpenOptions) -> Dataset:
        verify_embedded()
        split = self.NAME.fullmatch(self.spec).group(1) or options.split
        ds = _npz_dataset(EMBEDDED_MNIST, split)
        ds.name = f"mnist:{split}"
        return ds

    def identity(self) -> Identity:
        return Identity(self.spec, embedded_sha256=EMBEDDED_MNIST_SHA256)


@source(".npz")
class NpzFile(PathSource):
    """A keras-layout ``.npz``; ``split`` picks the arrays."""

    def open(self, options: OpenOptions) -> Dataset:
        return _npz_dataset(self.path, options.split)
