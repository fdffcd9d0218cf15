"""Optional dependencies, grouped as pip extras that follow the stations.

``pip install gpu-mdf`` is the inference core (NumPy, click, PyYAML, orjson, tqdm, Pillow,
threadpoolctl): ``infer``, ``info``, ``plot --levels`` aside, the engine and ``bench``
with its own rows. Everything else is an extra, and a command that needs a missing one
says which, in one line::

    gpu-mdf: training needs TensorFlow, which is not installed here: pip install 'gpu-mdf[train]'
"""

from __future__ import annotations

import importlib
import importlib.util

from .errors import GpuMdfError

# module -> (what it is called, the extra that installs it)
PROVIDERS = {
    "tensorflow": ("TensorFlow", "train"),
    "keras": ("Keras", "convert"),
    "jax": ("JAX", "convert"),
    "matplotlib": ("matplotlib", "plots"),
    "pydot": ("pydot", "train"),
    "modeci_mdf": ("modeci-mdf", "mdf"),
    "onnx": ("onnx", "mdf"),
    "onnxruntime": ("ONNX Runtime", "mdf"),
    "cupy": ("CuPy", "gpu"),
    "numba": ("numba", "cpu"),
    "dask": ("Dask", "dask"),
    "distributed": ("Dask distributed", "dask"),
    "dask_cuda": ("dask-cuda", "cuda-cluster"),
}


class MissingExtra(GpuMdfError, ImportError):
    """An optional dependency that is not installed; the message names the extra."""


def hint(module: str, purpose: str) -> str:
    name, extra = PROVIDERS[module.split(".")[0]]
    return f"{purpose} needs {name}, which is not installed here: pip install 'gpu-mdf[{extra}]'"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str):
    """Import ``module`` or raise :class:`MissingExtra` naming the extra to install.

    Only a missing ``module`` itself becomes the one-line hint; an installed package
    that fails to import (a broken dependency of its own) keeps its real error.
    """
    top = module.split(".")[0]
    if not installed(top):
        raise MissingExtra(hint(top, purpose))
    return importlib.import_module(module)
