"""Model conversion to ModECI MDF (imports Keras lazily, on first use).

    mdf = gpu_mdf.convert.keras_to_mdf(keras_model)    # the MDF document, a plain dict
    gpu_mdf.convert.save_mdf(mdf, "out/model.json")      # atomic write

Writing MDF needs Keras only (on TensorFlow, or on JAX where TensorFlow is not
installed: ``pip install 'gpu-mdf[convert]'``); modeci_mdf reads what it writes.

:mod:`gpu_mdf.convert.keras` walks a Keras model and holds the translators, by layer
family; :mod:`gpu_mdf.convert.files` converts many model files (``gpu-mdf convert``).
Writing the document is :mod:`gpu_mdf.mdf`'s (``save_mdf``, ``mdf_text``,
``write_bson``), re-exported here.
"""

from __future__ import annotations

from ..mdf import MDF_FORMAT, mdf_graph, mdf_text, save_mdf, write_bson
from .files import ConvertResult, convert_files
from .keras import keras_to_mdf, load_keras_model, supported_layers

__all__ = ["keras_to_mdf", "save_mdf", "load_keras_model", "convert_files", "supported_layers",
           "ConvertResult", "mdf_text", "write_bson", "mdf_graph", "MDF_FORMAT"]
