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


def tensorflow():
    """``import tensorflow``, quietly (and its device query, where cuInit complains)."""
    if "tf" not in _loaded:
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


def keras():
    """``import keras`` (on TensorFlow), quietly."""
    tensorflow()
    import keras as k
    return k
