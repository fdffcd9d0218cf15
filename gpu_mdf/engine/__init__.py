"""The gpu-mdf batch engine: compile an MDF graph once, run batches on CuPy or NumPy.

Imports no TensorFlow.
"""

from .alloc import tune_host_allocator
from .ops import OPS, lookup
from .program import PortSpec, Program, compile, load_mdf_dict

__all__ = ["OPS", "PortSpec", "Program", "compile", "load_mdf_dict", "lookup", "tune_host_allocator"]
