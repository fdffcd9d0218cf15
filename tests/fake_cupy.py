"""A NumPy-backed stand-in for the parts of CuPy the engine uses, so the GPU code
paths (overlapped streaming, out-of-memory splitting, memory-based batch sizing)
run on CPU-only CI. Not a simulator: it checks logic, not speed.

Arrays are an ``ndarray`` subclass with ``get``/``set`` like CuPy's. The memory pool
has a limit; ``asarray``/``empty`` of more bytes than the limit raise
``cuda.memory.OutOfMemoryError`` as CuPy's pool does.
"""

import contextlib
import types

import numpy as np

__name__ = "cupy"  # noqa: A001 - kernels check xp.__name__ to pick cupyx paths
__version__ = "0.0-fake"


class ndarray(np.ndarray):  # noqa: N801
    def get(self, stream=None):
        return np.array(self, copy=True).view(np.ndarray)

    def set(self, arr, stream=None):
        np.copyto(self.view(np.ndarray), arr)

    def astype(self, dtype, **kwargs):
        out = super().astype(dtype, **kwargs)
        if out is not self:
            _check(out.nbytes)
        return out

    def __array_wrap__(self, out, context=None, return_scalar=False):
        if out.ndim and out is not self:
            _check(out.nbytes)   # every ufunc result is an allocation on the "device"
        return super().__array_wrap__(out, context, return_scalar)


class OutOfMemoryError(MemoryError):
    pass


class _Pool:
    def __init__(self):
        self.limit = 0
        self.allocated = 0

    def set_limit(self, size=0):
        self.limit = size

    def get_limit(self):
        return self.limit

    def used_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_pool = _Pool()
TOTAL = 8 << 30


def _check(nbytes):
    if _pool.limit and nbytes > _pool.limit:
        raise OutOfMemoryError(f"Out of memory allocating {nbytes:,} bytes (limit {_pool.limit:,})")


def get_default_memory_pool():
    return _pool


def _wrap(x):
    return x.view(ndarray) if isinstance(x, np.ndarray) and not isinstance(x, ndarray) else x


def asarray(a, dtype=None):
    a = np.asarray(a, dtype=dtype)
    _check(a.nbytes)
    return _wrap(a)


def empty(shape, dtype=np.float32):
    a = np.empty(shape, dtype)
    _check(a.nbytes)
    return _wrap(a)


def __getattr__(name):
    attr = getattr(np, name)
    if callable(attr) and not isinstance(attr, type):
        def wrapped(*args, **kwargs):
            out = attr(*args, **kwargs)
            return tuple(_wrap(o) for o in out) if isinstance(out, tuple) else _wrap(out)
        return wrapped
    return attr


class _Event:
    pass


class Stream:
    log: list = []

    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self):
        Stream.log.append("record")
        return _Event()

    def wait_event(self, ev):
        Stream.log.append("wait")

    def synchronize(self):
        pass


class _Runtime:
    @staticmethod
    def memGetInfo():  # noqa: N802
        return TOTAL - _pool.allocated, TOTAL


cuda = types.SimpleNamespace(
    Stream=Stream, Device=lambda i=0: contextlib.nullcontext(), runtime=_Runtime,
    get_current_stream=lambda: Stream(), memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
lib = np.lib


def empty_pinned(shape, dtype):
    return np.empty(shape, dtype)


cupyx = types.SimpleNamespace(empty_pinned=empty_pinned)
