"""The gpu-mdf batch engine: compile an MDF graph once, run batches on CuPy or NumPy.

``compile`` = load (:mod:`gpu_mdf.mdf`) -> :mod:`~gpu_mdf.engine.plan` (backend-free)
-> :mod:`~gpu_mdf.engine.binder` (bound to an array module) -> :class:`Program`;
:func:`run_batch` is the one safe way to run a batch (checks, blocks, out-of-memory
split, non-finite items). Imports no TensorFlow and reads no data files.
"""

from ..mdf import load_constants
from ..mdf import load_mdf as load_mdf_dict
from .alloc import tune_host_allocator
from .backend import Backend, GpuProbe, cpu_threads, probe_gpu, select_backend
from .binder import bind, compile
from .ops import OPS, OPSET, lookup
from .plan import InputSpec, OutputSpec
from .preprocess import NORMALIZATIONS, check_finite, normalize
from .program import Program
from .run import BatchResult, run_batch

__all__ = ["OPS", "OPSET", "NORMALIZATIONS", "Backend", "BatchResult", "GpuProbe", "InputSpec", "OutputSpec",
           "Program", "bind", "check_finite", "compile", "cpu_threads", "load_constants", "load_mdf_dict", "lookup",
           "normalize", "probe_gpu", "run_batch", "select_backend", "tune_host_allocator"]
