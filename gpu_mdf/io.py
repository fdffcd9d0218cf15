"""Small file helpers: atomic writes (temporary name in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)   # read once, at import (single-threaded)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success only.

    The file gets the mode a plain ``open(path, "w")`` would give (mkstemp's is 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def safe_join(base: str | Path, name: str, what: str = "name") -> Path:
    """``base / name`` for a name that comes from input (a job item, a config): refused
    when it would leave ``base`` (an absolute path, ``..``, a symbolic link pointing out)."""
    from .errors import OutputError
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\x00" in name:
        raise OutputError(f"{what} {name!r} must be a plain relative name inside {base}")
    base_r = Path(base).resolve()
    target = (base_r / name).resolve()
    if target != base_r and base_r not in target.parents:
        raise OutputError(f"{what} {name!r} leads outside {base} (to {target}); refused")
    return base_r / name


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
