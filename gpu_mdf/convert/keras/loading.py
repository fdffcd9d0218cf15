"""Keras itself, imported on first use, and Keras model files, loaded in safe mode."""

from __future__ import annotations

from pathlib import Path

from ...errors import ModelFileError

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def keras_module():
    """The ``keras`` module (quietly imported; a missing Keras names the extra to install)."""
    from ...tfquiet import keras
    return keras("converting Keras models")


def load_keras_model(path: str | Path):
    """Load a ``.keras`` or ``.h5`` model in Keras's safe mode (a Lambda layer's code is
    never run), with one whole, plain error when Keras refuses it. The file's bytes decide
    which it is: a ``.keras`` archive renamed ``.h5`` loads as what it is."""
    import tempfile

    from ..sources import keras_file_for_loading, model_kind
    path = Path(path)
    kind = model_kind(path)
    if kind not in ("keras", "h5"):
        raise ModelFileError(f"{path}: not a Keras model file (expected .keras or .h5; this is {kind.upper()})")
    keras = keras_module()
    from ... import layers as _shipped_layers  # noqa: F401  (registers gpu_mdf>PositionEmbedding)
    with tempfile.TemporaryDirectory(prefix="gpu-mdf-keras-") as scratch:
        try:
            return keras.models.load_model(keras_file_for_loading(path, kind, Path(scratch)), compile=False,
                                           safe_mode=True)
        except Exception as e:
            raise ModelFileError(f"{path}: {keras_load_error(path, e)}") from None


def keras_load_error(path: Path, e: Exception) -> str:
    """Keras's refusal in plain words, whole and on one line."""
    import zipfile
    text = " ".join(str(e).split())
    if "Lambda" in text and ("safe_mode" in text or "arbitrary code" in text):
        return ("Lambda layers run code: refused in safe mode (the model holds a Python function; "
                "gpu-mdf loads models with safe_mode=True and converts only layers it can describe)")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        return "not a valid .keras archive (a .keras file is a zip archive; this one is not, or is truncated)"
    if isinstance(e, OSError) and "file signature not found" in text:
        return "not a valid HDF5 (.h5) file"
    if isinstance(e, OSError) and "truncated file" in text:
        return f"a truncated HDF5 (.h5) file ({text})"
    import re
    custom = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if custom:
        return (f"the model uses {custom.group(1)!r}, a custom class or function defined in its author's code "
                "and not registered here; gpu-mdf converts the layers it can describe")
    text = text.split(" Full object config:")[0]          # Keras appends the whole layer config
    return f"Keras cannot load this model: {type(e).__name__}: {text[:400]}"
