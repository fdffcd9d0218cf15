"""TensorFlow and Keras, imported without their start-up noise.

TensorFlow writes from C++ before Python can configure anything (the oneDNN notice,
"Could not find cuda drivers", cuInit failures on machines without a GPU, CPU-feature
advice), and absl logs the HDF5 "legacy format" warning on every ``.h5`` save. gpu-mdf's
command line keeps those known lines out of its output; every other line, real errors
included, still shows. ``gpu-mdf --verbose`` (or ``GPU_MDF_VERBOSE=1``) shows them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

from . import extras

NOISE = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers on your machine",
    r"cpu_feature_guard", r"This TensorFlow binary is optimized", r"To enable the following instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"failed call to cuInit", r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered", r"TF-TRT Warning",
    r"cuda_(platform|executor|diagnostics)\.cc",
]))
_loaded: dict = {}


def verbose() -> bool:
    return os.environ.get("GPU_MDF_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def native_stderr_filtered():
    """Route file descriptor 2 through a filter for the duration: known TensorFlow noise
    is dropped, every other line is written out afterwards."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not NOISE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def tensorflow(purpose: str = "this command"):
    """``import tensorflow``, quietly (and its device query, where cuInit complains)."""
    if "tf" not in _loaded:
        if not extras.installed("tensorflow"):
            raise extras.MissingExtra(extras.hint("tensorflow", purpose))
        if not verbose():
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with native_stderr_filtered():
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")
        if not verbose():
            logging.getLogger("absl").setLevel(logging.ERROR)   # the HDF5 "legacy format" warning
            tf.get_logger().setLevel(logging.ERROR)
        _loaded["tf"] = tf
    return _loaded["tf"]


def keras_backend(purpose: str = "this command") -> str:
    """The Keras backend to use, set in ``KERAS_BACKEND`` before Keras is imported: the
    user's choice, else TensorFlow where installed, else JAX (``~/.keras/keras.json``
    naming a backend that is not installed would make ``import keras`` fail)."""
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        if extras.installed("tensorflow"):
            backend = "tensorflow"
        elif extras.installed("jax"):
            backend = "jax"
        else:
            raise extras.MissingExtra(f"{purpose} needs Keras on TensorFlow or JAX, and neither is installed "
                                      "here: pip install 'gpu-mdf[convert]'")
        os.environ["KERAS_BACKEND"] = backend
    return backend


def keras(purpose: str = "this command"):
    """``import keras``, quietly: on TensorFlow where it is installed, else on JAX.

    Loading and converting ``.keras``/``.h5`` models needs no TensorFlow: Keras 3 reads
    both formats on its JAX backend (``pip install 'gpu-mdf[convert]'``), and the weights
    it hands the converter are the same numbers. Training needs TensorFlow. A
    ``KERAS_BACKEND`` set by the user is respected.
    """
    if "keras" not in _loaded:
        if not extras.installed("keras"):
            raise extras.MissingExtra(extras.hint("keras", purpose))
        if keras_backend(purpose) == "tensorflow":
            tensorflow(purpose)
        with native_stderr_filtered():
            import keras as k
        _loaded["keras"] = k
    return _loaded["keras"]
