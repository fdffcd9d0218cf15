"""The gpu-mdf batch engine: compile an MDF graph once, run batches on CuPy or NumPy.

``compile`` = load -> :mod:`~gpu_mdf.engine.plan` (backend-free) -> bind to an array
module -> :class:`Program`. Imports no TensorFlow.
"""

from .alloc import tune_host_allocator
from .ops import OPS, OPSET, lookup
from .plan import InputSpec, OutputSpec
from .program import PortSpec, Program, bind, compile, load_constants, load_mdf_dict

__all__ = ["OPS", "OPSET", "InputSpec", "OutputSpec", "PortSpec", "Program", "bind", "compile", "load_constants",
           "load_mdf_dict", "lookup", "tune_host_allocator"]
