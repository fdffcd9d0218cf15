"""The registry of data sources and :func:`open_dataset`.

A source kind is a :class:`Source` subclass registered with :func:`source`: for file
names ending with given suffixes (``@source(".npy")``), for folders
(``@source(folder=True)``), or for a name alone (the embedded MNIST copy overrides
:meth:`Source.claims`); a kind may refine :meth:`Source.accepts`, and ``fallback``
kinds (an IDX name without a suffix, any folder of images) are tried last. Each kind
has one :meth:`Source.identity`: what the data is, as the resume fingerprint,
metrics.json and Dask workers all name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import DataError
from .dataset import Dataset

FINGERPRINT_FILES = 10000     # a folder's fingerprint lists its first files, and counts them all


@dataclass(frozen=True)
class OpenOptions:
    """How to open a source; each kind uses the options that concern it."""

    split: str = "test"                       # of an npz, an IDX folder or the embedded copy
    labels: Path | None = None                # a labels file (.npy or IDX) beside the images
    image_size: tuple[int, int] = (28, 28)    # what image files are brought to
    invert: str = "auto"                      # polarity of image files: auto | yes | no


@dataclass(frozen=True)
class Identity:
    """What a source is: its ``location`` (the embedded copy's name, else an absolute
    path: what a Dask worker opens), and either the embedded copy's checksum or its
    files with their sizes and modification times (what a resumed job compares)."""

    location: str
    embedded_sha256: str | None = None
    files: tuple[tuple[str, int, int], ...] = ()   # (name from the source's folder, bytes, mtime in ns)
    file_count: int = 0

    @property
    def embedded(self) -> bool:
        return self.embedded_sha256 is not None

    def fingerprint(self, ds: Dataset) -> dict:
        """The data part of a job's fingerprint (job.json)."""
        ident = {"name": ds.name, "length": len(ds), "shape": list(ds.image_shape), "dtype": str(ds.dtype)}
        if self.embedded:
            ident["embedded_sha256"] = self.embedded_sha256
        else:
            ident["files"] = [list(f) for f in self.files]
            ident["file_count"] = self.file_count
        return ident

    def describe(self, ds: Dataset) -> str:
        """What metrics.json calls the data."""
        return f"embedded MNIST ({ds.name})" if self.embedded else self.location


class Source:
    """One kind of data source, opened lazily into a :class:`Dataset`."""

    suffixes: ClassVar[tuple[str, ...]] = ()   # set by @source
    folder: ClassVar[bool] = False
    fallback: ClassVar[bool] = False           # tried after the other kinds

    def __init__(self, spec: str):
        self.spec = spec                       # as the user gave it

    @classmethod
    def claims(cls, spec: str) -> bool:
        """Whether the name alone makes this the source (looked at before any file)."""
        return False

    @classmethod
    def names(cls) -> list[str]:
        """The names this kind claims, for suggestions when a name is mistyped."""
        return []

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """Whether an existing file or folder is of this kind."""
        if cls.folder:
            return path.is_dir()
        return not path.is_dir() and path.name.lower().endswith(cls.suffixes)

    def open(self, options: OpenOptions) -> Dataset:
        raise NotImplementedError

    def identity(self) -> Identity:
        raise NotImplementedError


class PathSource(Source):
    """A source that is a file or a folder."""

    def __init__(self, spec: str):
        super().__init__(spec)
        self.path = Path(spec)

    def identity(self) -> Identity:
        """The absolute path, and each file's name (from the source's own folder), size
        and modification time: an edited file is another source, whatever its name
        (``mnist_extra.npy`` is a file; only the names :class:`~.embedded.EmbeddedMnist` claims
        are the embedded copy)."""
        p = self.path
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        listed = tuple((str(q.relative_to(p.parent)), q.stat().st_size, q.stat().st_mtime_ns)
                       for q in files[:FINGERPRINT_FILES])
        return Identity(str(p.resolve()), files=listed, file_count=len(files))


_REGISTRY: list[type[Source]] = []


def source(*suffixes: str, folder: bool = False, fallback: bool = False):
    """Class decorator: register a :class:`Source` kind for file names ending with one of
    ``suffixes`` (any case), or for folders; ``fallback`` kinds are tried last."""
    def register(cls: type[Source]) -> type[Source]:
        cls.suffixes, cls.folder, cls.fallback = tuple(s.lower() for s in suffixes), folder, fallback
        _REGISTRY.append(cls)
        return cls
    return register


def find_source(spec: str | Path | None) -> Source:
    """The registered kind of ``spec`` (``None``: the embedded MNIST copy)."""
    spec = "mnist" if spec is None else str(spec)
    for cls in _REGISTRY:
        if cls.claims(spec):
            return cls(spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder{_suggestion(spec)}")
    for cls in sorted(_REGISTRY, key=lambda c: c.fallback):
        if cls.accepts(path):
            return cls(spec)
    raise DataError(f"{path}: unknown data format (expected .npz, .npy, .csv, IDX or a folder of images)")


def _suggestion(spec: str) -> str:
    """`` (did you mean X?)`` for a name close to a source name (``mnist:tset``) or to a
    file beside it (``digts.npy``); empty otherwise."""
    import difflib
    names = [n for cls in _REGISTRY for n in cls.names()]
    folder = Path(spec).parent
    try:
        beside = sorted(str(folder / p.name) if str(folder) != "." else p.name for p in folder.iterdir())[:1000]
    except OSError:
        beside = []
    close = difflib.get_close_matches(spec, names + beside, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def open_dataset(source: str | Path | None = None, split: str = "test", labels: str | Path | None = None,
                 image_size=(28, 28), invert: str = "auto") -> Dataset:
    """Open any supported source lazily; ``None`` means the embedded MNIST test set.

    ``labels``: a labels file for ``.npy`` or IDX images; ``image_size`` is what image
    files are brought to (see :mod:`gpu_mdf.data.images`) and how array items are looked
    at; ``invert`` (auto | yes | no) applies to every source of images
    (:mod:`gpu_mdf.data.polarity`).
    """
    found = find_source(source)
    ds = found.open(OpenOptions(split, None if labels is None else Path(labels), tuple(image_size), invert))
    ds.source = found
    if ds.inverted is None:                      # arrays of images: the same polarity rule as image files
        from .polarity import apply_to_dataset
        apply_to_dataset(ds, invert, tuple(image_size))
    return ds
