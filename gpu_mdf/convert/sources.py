"""Model files as they arrive: what a file is (by its bytes, not its name), what it says about
its pixel normalisation, and ONNX files converted once and cached by content.

* :func:`model_kind`: ``keras`` (a ``.keras`` zip archive), ``h5`` (HDF5), ``onnx`` (an ONNX
  protobuf) or ``mdf`` (JSON, YAML or BSON MDF), from the file's first bytes; the suffix only
  breaks ties a format's bytes cannot.
* :func:`recorded_normalization`: the normalisation a model states: a Keras model that
  rescales its own input (``Rescaling``/``Normalization`` first), or one trained by
  ``gpu-mdf train`` (``train_metrics.json`` beside it). Nothing is guessed: a model that
  states none needs ``--normalize``.
* :func:`mdf_for`: an ``.onnx`` file as an MDF file, converted on first use and kept in a
  cache keyed by the file's SHA-256 (and the normalisation), bounded in bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelFileError
from ..io import file_sha256

KINDS = ("keras", "h5", "onnx", "mdf")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NORMALIZE_HINT = ("say how its pixels were normalised for training with --normalize l2|scale|none "
                  "(l2: keras.utils.normalize(x, axis=1), scale: x/255, none: fed as they are)")


def model_kind(path: str | Path) -> str:
    """What a model file is, by its content."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such model file")
    if p.is_dir():
        raise ModelFileError(f"{p}: a folder, not a model file")
    with open(p, "rb") as f:
        head = f.read(64)
    return kind_of_bytes(head, p.suffix.lower(), p)


def kind_of_bytes(head: bytes, suffix: str = "", name: str | Path = "the model") -> str:
    """A model's kind from its first bytes (``suffix`` only where the bytes leave a choice)."""
    if head.startswith(b"PK\x03\x04"):
        return "keras"
    if head.startswith(HDF5_MAGIC):
        return "h5"
    text = head.lstrip()
    if text[:1] == b"{" or suffix in (".json", ".yaml", ".yml") or (suffix == ".bson" and len(head) >= 5):
        return "mdf"
    if head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x28", b"\x32", b"\x3a", b"\x42") or suffix == ".onnx":
        return "onnx"       # a protobuf: ir_version, producer, graph... (checked for real by onnx.load)
    if suffix in (".keras", ".h5", ".hdf5"):       # damaged: its loader says how
        return "keras" if suffix == ".keras" else "h5"
    raise ModelFileError(f"{name}: not a model file gpu-mdf knows (.keras, .h5, .onnx or MDF JSON/YAML/BSON)")


# --------------------------------------------------------------------------- #
# Normalisation a model states
# --------------------------------------------------------------------------- #
def recorded_normalization(path: str | Path, keras_model=None) -> tuple[str, str] | None:
    """(normalisation, why) when the model states it; None when it does not."""
    p = Path(path)
    sidecar = p.with_name("train_metrics.json")
    if sidecar.is_file():
        try:
            norm = json.loads(sidecar.read_text())["config"]["data"]["normalize"]
        except (OSError, ValueError, KeyError, TypeError):
            norm = None
        if norm:
            return norm, f"{sidecar.name} beside it: trained by gpu-mdf with normalize={norm}"
    if keras_model is not None:
        first = _first_layer(keras_model)
        if first is not None and type(first).__name__ in ("Rescaling", "Normalization"):
            return "none", f"its first layer ({type(first).__name__} {first.name!r}) normalises the input itself"
    return None


def _first_layer(model):
    """The first layer after the input, descending into a nested model."""
    layers = [layer for layer in getattr(model, "layers", []) if type(layer).__name__ != "InputLayer"]
    if not layers:
        return None
    first = layers[0]
    return _first_layer(first) if hasattr(first, "layers") and getattr(first, "layers", None) else first


# --------------------------------------------------------------------------- #
# ONNX files, converted once
# --------------------------------------------------------------------------- #
def cache_dir() -> Path:
    return Path(os.environ.get("GPU_MDF_CACHE") or Path.home() / ".cache" / "gpu-mdf") / "onnx"


CACHE_LIMIT_BYTES = int(float(os.environ.get("GPU_MDF_CACHE_MB", "4096")) * 2**20)


def mdf_for(path: str | Path, normalize: str | None, opset: int | None = None, log=None) -> Path:
    """The MDF file (BSON) of an ONNX model, converted on first use and cached by the file's
    SHA-256 and the normalisation; the cache keeps its total under ``GPU_MDF_CACHE_MB``
    (default 4096), removing the least recently used first."""
    from .onnx import onnx_to_mdf_doc
    src = Path(path)
    digest = file_sha256(src)
    folder = cache_dir()
    target = folder / f"{digest[:32]}-{normalize or 'unset'}.mdf.bson"
    if target.is_file():
        os.utime(target)                      # recently used
        return target
    if log:
        log(f"converting {src.name} to MDF (once; cached in {folder})")
    from ..mdf import save_mdf
    doc = onnx_to_mdf_doc(src, model_id=src.stem, normalize=normalize)
    folder.mkdir(parents=True, exist_ok=True)
    save_mdf(doc, target)
    _trim(folder, keep=target)
    return target


def resolve_model(path: str | Path, normalize: str | None = None, log=None, need_normalize: bool = False) -> Path:
    """An MDF file to compile for ``path``: the file itself, or an ONNX model's MDF from the
    cache (``normalize`` is what the MDF records; with ``need_normalize`` (inference on
    pixels) an ONNX file without it is refused: ONNX never says how pixels were scaled).
    A Keras file is refused with the command that converts it."""
    p = Path(path)
    kind = model_kind(p)
    if kind == "mdf":
        return p
    if kind == "onnx":
        if need_normalize and normalize is None:
            raise ModelFileError(f"{p}: an ONNX model does not record how its pixels were normalised: "
                                 + NORMALIZE_HINT)
        return mdf_for(p, normalize, log=log)
    raise ModelFileError(f"{p}: a Keras model; convert it to MDF first: gpu-mdf convert {p} --normalize ... --out DIR")


def _trim(folder: Path, keep: Path, limit: int | None = None) -> None:
    limit = CACHE_LIMIT_BYTES if limit is None else limit
    files = sorted((p for p in folder.glob("*.mdf.bson") if p != keep), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files) + keep.stat().st_size
    for p in files:
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)


def keras_file_for_loading(path: Path, kind: str, scratch: Path) -> Path:
    """Keras picks the loader by suffix: a ``.keras`` archive renamed ``.h5`` (or the
    reverse) is loaded through a link with the suffix its bytes call for."""
    want = ".keras" if kind == "keras" else ".h5"
    if path.suffix.lower() in ((".keras",) if kind == "keras" else (".h5", ".hdf5")):
        return path
    link = scratch / (path.stem + want)
    link.symlink_to(path.resolve())
    return link


__all__ = ["KINDS", "MODEL_SUFFIXES", "NORMALIZE_HINT", "cache_dir", "kind_of_bytes", "mdf_for", "model_kind",
           "recorded_normalization", "resolve_model"]
