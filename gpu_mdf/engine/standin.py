"""A strict CuPy stand-in, so the GPU code paths run and are checked on CPU-only CI
(the tests import it as ``fake_cupy``; ``gpu-mdf bench --standin`` counts with it).

It is strict where CuPy is strict, and it counts what costs a GPU its time:

* kernel launches (:data:`COUNT` ``.launches``): every operation that runs on the device
  (a ufunc, in place or not, a reduction, a copy, a generated kernel), not allocations;
* the memory pool, modelled as CuPy's: blocks rounded to 512 bytes, a freed block reused
  by the next allocation of its size; ``new_bytes`` counts what had to grow the pool (a
  steady-state batch should need none);
* ElementwiseKernels are compiled as C for the host with the system's C compiler
  and run: the generated CUDA bodies (plain C over CUDA's math library) give real
  numbers, and a type mismatch or a body that would not build fails as in CuPy;

* its array is **not** a ``numpy.ndarray`` subclass; ``__array__`` raises
  ``TypeError("Implicit conversion to a NumPy array is not allowed...")`` as CuPy's does,
  so ``np.asarray(device_array)`` and NumPy code that silently converts fail here too;
* a ``numpy.ndarray`` (0-d included) given to an operator, a function or an index
  together with device arrays raises ``TypeError: Unsupported type <class
  'numpy.ndarray'>`` (CuPy's ufuncs and routines refuse host arrays); NumPy scalars
  (``np.float32(2)``) and Python numbers are accepted, as in CuPy;
* device->host synchronisations are counted (:data:`COUNT`): ``.get()`` (blocking),
  ``asnumpy``, ``.item()``, ``.tolist()``, ``float()/int()/bool()/index()`` of an array,
  ``repr``, boolean-mask indexing and assignment (CuPy needs the number of selected
  elements), ``nonzero``/``argwhere``/``unique`` (data-dependent sizes),
  ``Stream.synchronize``, ``Event.synchronize``, and ``lib.stride_tricks.
  sliding_window_view`` (CuPy 14 copies ``window_shape`` to the device and tests it
  with ``cupy.any`` in an ``if``: one copy and one sync per call, see its source);
* host->device copies are counted too: ``asarray``/``array`` of host data, ``.set()``;
* only the functions listed in :data:`FUNCTIONS` exist (others raise AttributeError,
  as a function CuPy lacks would);
* a memory pool limit (``set_limit``) makes any single allocation above it raise
  ``cuda.memory.OutOfMemoryError``.

Where it had to guess (written down, as the task asks):

* ``cupy.take``/indexing with a ``numpy.ndarray`` index: CuPy may convert some host
  indices silently; here any host array is refused (stricter is safer).
* ``ndarray.get(out=pinned, blocking=False)`` is modelled as an asynchronous copy (no
  sync) whose completion is awaited by the next ``Event``/``Stream.synchronize``;
  the data are copied at once (it is all host memory here).
* Element values and type promotion follow NumPy 2, which CuPy 14 follows too.
* Kernel launches are free here; nothing measures speed.
* ``cupy._core._routines_linalg``'s per-dtype compute type (``get_compute_type``,
  ``set_compute_type``, ``COMPUTE_TYPE_*``) is modelled: a float32 product (``matmul``,
  ``dot``, ``einsum``, ``tensordot``, ``@``) made while it is TF32 is counted in
  ``COUNT.tf32_products``; the numbers stay float32's (TF32's rounding is not emulated).
* Stream capture (``Stream.begin_capture``/``end_capture``/``is_capturing``, ``Graph.launch``)
  is modelled: during a capture every operation that writes device memory is recorded
  (and still computed here, uncounted); a device->host sync or a host->device copy raises
  ``CUDARuntimeError`` as CUDA refuses them; the default stream cannot capture. At the end
  of the capture every array it allocated is poisoned (NaN, or -7 for integers), as
  nothing ran on a real device; ``Graph.launch`` replays the record in order, into the
  same buffers, counted as one launch.
"""

from __future__ import annotations

import contextlib
import numbers
import types
import weakref
from pathlib import Path

import numpy as np

__name__ = "cupy"  # noqa: A001 - the engine checks xp.__name__ for cupyx paths
__version__ = "14.0-strict-standin"


class _Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.d2h_syncs = 0
        self.h2d_copies = 0
        self.launches = 0            # kernels: every call that writes device memory (views are free)
        self.alloc_bytes = 0         # device memory asked of the pool
        self.new_bytes = 0           # of that, what the pool had to get from the device (a cudaMalloc)
        self.tf32_products = 0       # float32 products made under the TF32 compute type
        self.log: list[tuple[str, str]] = []

    def launch(self, what: str, nbytes: int = 0):
        if _CAPTURE.stream is not None or _CAPTURE.replaying:     # recorded, or inside a graph launch
            self.log.append(("captured", what))
            return
        self.launches += 1
        self.log.append(("launch", what))

    def sync(self, what: str):
        _CAPTURE.refuse(f"a device->host synchronisation ({what})")
        self.d2h_syncs += 1
        self.log.append(("sync", what))

    def h2d(self, what: str):
        _CAPTURE.refuse(f"a host->device copy ({what})")
        self.h2d_copies += 1
        self.log.append(("h2d", what))


class CUDARuntimeError(RuntimeError):
    pass


class _Capture:
    """The stream capture in progress (see the module's notes)."""

    def __init__(self):
        self.stream = None
        self.thunks: list = []
        self.allocated: list = []
        self.replaying = False

    def refuse(self, what: str):
        if self.stream is not None:
            raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} is not permitted when "
                                   f"the stream is capturing")

    def record(self, thunk):
        if self.stream is not None:
            self.thunks.append(thunk)

    def new(self, arr):
        if self.stream is not None:
            self.allocated.append(arr)


_CAPTURE = _Capture()


def _copy_into(dst, src):
    if isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif isinstance(dst, np.ndarray):
        np.copyto(dst, np.asarray(src), casting="unsafe")


def _recorded(result, roots, redo, what: str):
    """Record how to recompute ``result`` (the device array(s) ``redo()`` computes, unwrapped)
    in a capture: into the same buffers when it is new device memory; ``redo`` itself when
    it wrote in place (``out=``, an assignment: ``result`` None); nothing for a view or a
    bare allocation."""
    if _CAPTURE.stream is None or what in ("empty", "empty_like"):
        return
    res = _unwrap_result(result)
    if res is None:
        _CAPTURE.record(redo)
        return
    flat = list(res) if isinstance(res, (tuple, list)) else [res]
    if any(isinstance(r, np.ndarray) and not any(_root(r) is q for q in roots) for r in flat):
        _CAPTURE.record(lambda: _copy_into(res, redo()))


COUNT = _Counters()


class OutOfMemoryError(MemoryError):
    pass


class _Pool:
    """CuPy's memory pool, modelled: blocks rounded to 512 bytes, freed blocks kept and
    reused for an allocation of the same rounded size; only a miss grows the pool."""

    def __init__(self):
        self.limit = 0
        self.free_blocks: dict[int, int] = {}
        self.held = 0

    def allocate(self, arr: np.ndarray) -> None:
        size = -(-max(arr.nbytes, 1) // 512) * 512
        COUNT.alloc_bytes += size
        if self.free_blocks.get(size):
            self.free_blocks[size] -= 1
        else:
            COUNT.new_bytes += size
            COUNT.log.append(("new", f"{size} bytes"))
            self.held += size
        weakref.finalize(arr, self._release, size)

    def _release(self, size: int) -> None:
        self.free_blocks[size] = self.free_blocks.get(size, 0) + 1

    def set_limit(self, size=0, fraction=None):
        self.limit = size

    def get_limit(self):
        return self.limit

    def used_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def malloc(self, size):
        raise NotImplementedError("the stand-in models allocations in its default pool; "
                                  "cuda.using_allocator is a no-op here")


_pool = _Pool()
_pinned_pool = _Pool()
TOTAL = 8 << 30


def _root(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def _check_alloc(res, inputs_roots, what: str = "kernel"):
    """A result in new device memory: a launch, and a block of the pool (OOM past its limit)."""
    if not isinstance(res, np.ndarray) or any(_root(res) is r for r in inputs_roots):
        return
    if _pool.limit and res.nbytes > _pool.limit:
        raise OutOfMemoryError(f"Out of memory allocating {res.nbytes:,} bytes (limit {_pool.limit:,})")
    if what not in ("empty", "empty_like"):          # allocation only: no kernel runs
        COUNT.launch(what)
    _pool.allocate(_root(res))
    _CAPTURE.new(_root(res))


def _unwrap(x, where: str):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (in {where}: a host array mixed with device arrays)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, where) for k, v in x.items()}
    return x


def _roots(args) -> list:
    """The root arrays of the device arrays in ``args`` (iteratively: a recursive closure
    would be a reference cycle, keeping every array it saw alive until the next GC)."""
    out, todo = [], [args]
    while todo:
        v = todo.pop()
        if isinstance(v, ndarray):
            out.append(_root(v._a))
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
    return out


def _wrap(res, roots=(), what: str = "kernel"):
    if isinstance(res, ndarray):
        return res
    if isinstance(res, np.ndarray):
        _check_alloc(res, roots, what)
        return ndarray(res)
    if isinstance(res, np.generic):          # CuPy reductions return 0-d device arrays
        return ndarray(np.asarray(res))
    if isinstance(res, tuple):
        return tuple(_wrap(r, roots, what) for r in res)
    if isinstance(res, list):
        return [_wrap(r, roots, what) for r in res]
    return res


_PRODUCTS = {"matmul", "dot", "einsum", "tensordot", "__matmul__", "__rmatmul__", "__imatmul__"}


def _call(fn, args, kwargs, where):
    roots = _roots((args, kwargs))
    out = kwargs.get("out")
    a = _unwrap(args, where)
    k = _unwrap(kwargs, where)
    res = fn(*a, **k)
    if where in _PRODUCTS and _core._routines_linalg.get_compute_type(np.float32) == _TF32 \
            and getattr(res, "dtype", None) == np.float32:
        COUNT.tf32_products += 1
    if isinstance(out, ndarray) or where.startswith("__i"):       # out=, or an in-place operator
        if isinstance(out, ndarray):
            COUNT.launch(where)
        _recorded(None, roots, lambda: fn(*a, **k), where)
        if isinstance(out, ndarray):
            return out
    wrapped = _wrap(res, roots, where)
    _recorded(wrapped, roots, lambda: fn(*a, **k), where)
    return wrapped


def _unwrap_result(w):
    if isinstance(w, ndarray):
        return w._a
    if isinstance(w, (tuple, list)):
        return type(w)(_unwrap_result(v) for v in w)
    return None


def _check_index(idx, where):
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if isinstance(i, ndarray) and i.dtype == np.bool_:
            COUNT.sync(f"boolean mask {where}")
        if isinstance(i, np.ndarray):
            raise TypeError(f"Unsupported type {type(i)} (a host array as an index, in {where})")
    return _unwrap(idx, where)


class ndarray:  # noqa: N801 - CuPy's name
    """A device array: host memory standing in for GPU memory, guarded like CuPy's."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 1000

    def __init__(self, a):
        assert isinstance(a, np.ndarray) and not isinstance(a, ndarray)
        self._a = a

    # metadata lives on the host in CuPy: free
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    T = property(lambda self: ndarray(self._a.T))

    @property
    def flags(self):
        return self._a.flags

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for row in self._a:
            yield _wrap(row)

    # conversions to host values: synchronisations
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        if blocking:
            COUNT.sync("ndarray.get")
        else:
            COUNT.log.append(("d2h-async", "ndarray.get"))
        if out is not None:
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("ndarray.set takes a numpy.ndarray")
        COUNT.h2d("ndarray.set")
        np.copyto(self._a, arr)

    def item(self):
        COUNT.sync("ndarray.item")
        return self._a.item()

    def tolist(self):
        COUNT.sync("ndarray.tolist")
        return self._a.tolist()

    def __float__(self):
        COUNT.sync("float(array)")
        return float(self._a)

    def __int__(self):
        COUNT.sync("int(array)")
        return int(self._a)

    def __index__(self):
        COUNT.sync("operator.index(array)")
        return int(self._a)

    def __bool__(self):
        COUNT.sync("bool(array)")
        return bool(self._a)

    def __repr__(self):
        COUNT.sync("repr(array)")
        return "fake_cupy." + repr(self._a)

    __str__ = __repr__

    # indexing
    def __getitem__(self, idx):
        roots = [_root(self._a)]
        a, i = self._a, _check_index(idx, "indexing")
        res = _wrap(a[i], roots, "indexing")
        _recorded(res, roots, lambda: a[i], "indexing")
        return res

    def __setitem__(self, idx, value):
        a, i, v = self._a, _check_index(idx, "assignment"), _unwrap(value, "assignment")
        a[i] = v
        COUNT.launch("assignment")
        _recorded(None, (), lambda: a.__setitem__(i, v), "assignment")

    # NumPy interoperability (NEP 13/18): CuPy runs NumPy functions on device arrays itself
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.pop("out", None)
        roots = _roots(inputs)
        args = _unwrap(inputs, ufunc.__name__)
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o, ufunc.__name__) for o in out)
        def redo():
            return getattr(ufunc, method)(*args, **kwargs)
        res = redo()
        if out is not None:
            COUNT.launch(ufunc.__name__)
            _recorded(None, roots, redo, ufunc.__name__)
            return out[0] if len(out) == 1 else out
        wrapped = _wrap(res, roots, ufunc.__name__)
        _recorded(wrapped, roots, redo, ufunc.__name__)
        return wrapped

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func, args, kwargs, func.__name__)

    # methods: the CuPy ndarray methods the engine may use
    def __getattr__(self, name):
        if name in _METHODS:
            m = getattr(self._a, name)
            roots = [_root(self._a)]

            def method(*args, **kwargs):
                out = kwargs.get("out")
                a, k = _unwrap(args, name), _unwrap(kwargs, name)
                res = m(*a, **k)
                if isinstance(out, ndarray) or res is None:          # out=, or in place (fill)
                    if res is not None:
                        COUNT.launch(name)
                    _recorded(None, roots, lambda: m(*a, **k), name)
                    return out if isinstance(out, ndarray) else None
                wrapped = _wrap(res, roots, name)
                _recorded(wrapped, roots, lambda: m(*a, **k), name)
                return wrapped
            return method
        raise AttributeError(f"fake cupy.ndarray has no attribute {name!r}")


_METHODS = {"reshape", "transpose", "astype", "copy", "sum", "mean", "max", "min", "prod", "argmax", "argmin",
            "ravel", "flatten", "squeeze", "swapaxes", "fill", "clip", "dot", "any", "all", "cumsum", "take",
            "repeat", "view", "std", "var", "conj"}


def _binop(name):
    def f(self, other):
        if isinstance(other, np.ndarray):
            raise TypeError(f"Unsupported type {type(other)} (operator {name} of a device array)")
        if not isinstance(other, (ndarray, numbers.Number, np.generic)):
            return NotImplemented
        res = _call(getattr(np.ndarray, name), (self, other), {}, name)
        if name.startswith("__i"):          # in place: a kernel writing into this array
            COUNT.launch(name)
            return self
        return res
    f.__name__ = name
    return f


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
            "lt", "le", "gt", "ge", "eq", "ne"):
    for _pre in ("__", "__r", "__i"):
        if _pre != "__" and _op in ("lt", "le", "gt", "ge", "eq", "ne"):
            continue
        _n = f"{_pre}{_op}__"
        if hasattr(np.ndarray, _n):
            setattr(ndarray, _n, _binop(_n))
ndarray.__hash__ = object.__hash__   # __eq__ is elementwise, identity stays hashable
for _n in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _n, (lambda n: lambda self: _call(getattr(np.ndarray, n), (self,), {}, n))(_n))


# --------------------------------------------------------------------------- #
# Module functions
# --------------------------------------------------------------------------- #
def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    COUNT.h2d("asarray")
    res = np.array(a, dtype=dtype, order=order or "K", copy=True)
    if _pool.limit and res.nbytes > _pool.limit:
        raise OutOfMemoryError(f"Out of memory allocating {res.nbytes:,} bytes (limit {_pool.limit:,})")
    _pool.allocate(res)
    return ndarray(res)


array = asarray


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    return _call(np.ascontiguousarray, (a,), {} if dtype is None else {"dtype": dtype}, "ascontiguousarray")


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def _sync_fn(name):
    npf = getattr(np, name)

    def f(*args, **kwargs):
        COUNT.sync(name)
        return _call(npf, args, kwargs, name)
    return f


def where(*args, **kwargs):
    if len(args) == 1:
        COUNT.sync("where(condition)")
    return _call(np.where, args, kwargs, "where")


FUNCTIONS = {
    # creation
    "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like", "ones_like", "full_like", "linspace",
    # elementwise
    "abs", "negative", "exp", "expm1", "log", "log1p", "log2", "log10", "sqrt", "square", "reciprocal", "floor",
    "ceil", "round", "around", "sign", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "arctan2", "sinh",
    "cosh", "tanh", "arcsinh", "arccosh", "arctanh", "logaddexp", "maximum", "minimum", "fmax", "fmin", "add",
    "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "fmod", "mod", "remainder",
    "equal", "not_equal", "greater", "greater_equal", "less", "less_equal", "logical_and", "logical_or",
    "logical_xor", "logical_not", "isnan", "isinf", "isfinite", "clip",
    # shape and indexing
    "reshape", "transpose", "moveaxis", "swapaxes", "expand_dims", "squeeze", "broadcast_to", "concatenate",
    "stack", "split", "take", "take_along_axis", "flip", "tile", "repeat", "pad", "ravel",
    # reductions and sorting
    "sum", "mean", "max", "min", "amax", "amin", "prod", "cumsum", "argmax", "argmin", "argsort", "sort",
    "any", "all", "var", "std",
    # linear algebra
    "matmul", "dot", "einsum", "tensordot",
}
HOST_HELPERS = {"dtype", "issubdtype", "result_type", "can_cast", "float16", "float32", "float64", "int8",
                "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool_", "floating", "integer",
                "inf", "nan", "pi", "e", "newaxis", "ndim", "shape", "isscalar"}


def __getattr__(name):
    if name in ("nonzero", "argwhere", "unique", "flatnonzero", "count_nonzero"):
        return _sync_fn(name)
    if name in FUNCTIONS:
        npf = getattr(np, name)
        return lambda *args, **kwargs: _call(npf, args, kwargs, name)
    if name in HOST_HELPERS:
        return getattr(np, name)
    raise AttributeError(f"module 'cupy' has no attribute {name!r} (not modelled by the stand-in)")


def _sliding_window_view(x, window_shape, axis=None, **kwargs):
    COUNT.h2d("sliding_window_view: cupy.array(window_shape)")
    COUNT.sync("sliding_window_view: if cupy.any(window_shape_array < 0)")
    return _call(np.lib.stride_tricks.sliding_window_view, (x, window_shape), {"axis": axis, **kwargs},
                 "sliding_window_view")


def _as_strided(x, shape=None, strides=None):
    if not isinstance(x, ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    return ndarray(np.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


# cupy._core._routines_linalg's compute types (the values of CuPy's enum)
_TF32 = 7
_compute_types: dict = {}


def _get_compute_type(dtype):
    return _compute_types.get(np.dtype(dtype), 1)         # COMPUTE_TYPE_DEFAULT


def _set_compute_type(dtype, compute_type):
    if compute_type not in range(1, 8):
        raise ValueError(f"Unknown compute type: {compute_type}")
    _compute_types[np.dtype(dtype)] = compute_type


_core = types.ModuleType("cupy._core")
_core._routines_linalg = types.ModuleType("cupy._core._routines_linalg")
vars(_core._routines_linalg).update(
    COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_PEDANTIC=2, COMPUTE_TYPE_FP16=3, COMPUTE_TYPE_FP32=4,
    COMPUTE_TYPE_FP64=5, COMPUTE_TYPE_BF16=6, COMPUTE_TYPE_TF32=_TF32,
    get_compute_type=_get_compute_type, set_compute_type=_set_compute_type)

lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
    as_strided=_as_strided, sliding_window_view=_sliding_window_view))


# --------------------------------------------------------------------------- #
# ElementwiseKernel: the generated CUDA C, compiled for the host and run
# --------------------------------------------------------------------------- #
_C_TYPES = {"float32": ("float", "c_void_p"), "float64": ("double", "c_void_p"), "int32": ("int32_t", "c_int32"),
            "int64": ("int64_t", "c_int64"), "bool": ("_Bool", "c_bool")}
_C_SCALAR = {"int32": "c_int32", "int64": "c_int64", "float32": "c_float", "float64": "c_double", "bool": "c_bool"}


def c_compiler() -> str | None:
    """The host C compiler the stand-in runs generated kernels with (None: there is none)."""
    import shutil
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


_SO_CACHE: dict = {}
_SO_DIR: list = []


def _compile_c(source: str):
    """Compile a C translation unit to a shared library once per source; its ``run``."""
    import ctypes
    import hashlib
    import subprocess
    import tempfile
    fn = _SO_CACHE.get(source)
    if fn is not None:
        return fn
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("the CuPy stand-in runs generated kernels as host C, and no C compiler was found")
    if not _SO_DIR:
        _SO_DIR.append(tempfile.mkdtemp(prefix="fake_cupy_kernels_"))
    base = Path(_SO_DIR[0]) / hashlib.sha1(source.encode()).hexdigest()[:16]
    base.with_suffix(".c").write_text(source)
    r = subprocess.run([cc, "-std=c11", "-O1", "-ffp-contract=off", "-Werror=implicit-function-declaration",
                        "-Werror=float-conversion",
                        "-shared", "-fPIC", "-o", str(base.with_suffix(".so")), str(base.with_suffix(".c")), "-lm"],
                       capture_output=True, text=True)
    if r.returncode:
        raise ValueError(f"kernel does not compile:\n{r.stderr}\n{source}")
    fn = _SO_CACHE[source] = ctypes.CDLL(str(base.with_suffix(".so"))).run
    return fn


class ElementwiseKernel:
    """CuPy's ElementwiseKernel, run on the host: the body is compiled as C (the generated
    kernels use only C and CUDA's math library) inside a loop over the index ``i``. As in
    CuPy: a type placeholder (``T``) must name one dtype across its arguments (TypeError
    otherwise), non-raw arguments broadcast, raw ones are indexed by a flat C-order index
    and need ``size=`` when no non-raw argument gives the shape, outputs may be passed or
    are allocated (from the pool). One launch per call. A body that does not compile as
    C, or calls a function C's math library lacks, fails, as it would fail to build."""

    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        self.ins, self.outs = self._params(in_params), self._params(out_params)
        self.name, self.operation = name, operation

    @staticmethod
    def _params(text):
        out = []
        for p in text.split(","):
            words = p.split()
            raw = words[:1] == ["raw"]
            words = words[1:] if raw else words
            if len(words) != 2 or not words[1].isidentifier():
                raise ValueError(f"ElementwiseKernel: cannot parse parameter {p!r}")
            out.append((words[0], words[1], raw))
        return out

    def _source(self, types_, scalars):
        params, pre, post = ["ptrdiff_t n_"], [], []
        for t, name, raw in self.ins + self.outs:
            ct = _C_TYPES[str(types_.get(t, t))][0]
            if name in scalars:
                params.append(f"{ct} {name}")
            elif raw:
                params.append(f"{ct}* {name}")
            else:
                params.append(f"{ct}* {name}_p")
        for t, name, raw in self.ins:
            if not raw and name not in scalars:
                pre.append(f"const {_C_TYPES[str(types_[t] if t in types_ else t)][0]} {name} = {name}_p[i];")
        for t, name, raw in self.outs:
            if not raw:
                pre.append(f"{_C_TYPES[str(types_[t] if t in types_ else t)][0]} {name};")
                post.append(f"{name}_p[i] = {name};")
        typedefs = "".join(f"typedef {_C_TYPES[str(d)][0]} {t};\n" for t, d in types_.items())
        return ("#include <math.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <stdbool.h>\n" + typedefs
                + f"void run({', '.join(params)}) {{\n  for (ptrdiff_t i = 0; i < n_; ++i) {{\n    "
                + " ".join(pre) + "\n    {\n" + self.operation + "\n    }\n    " + " ".join(post) + "\n  }\n}\n")

    def __call__(self, *args, size=None):
        import ctypes
        n_in = len(self.ins)
        if len(args) not in (n_in, n_in + len(self.outs)):
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        types_: dict = {}
        values: dict = {}
        scalars: set = set()
        for (t, name, raw), a in zip(self.ins + self.outs, args):
            if isinstance(a, np.ndarray):
                raise TypeError(f"Unsupported type {type(a)} (argument {name} of {self.name!r} is a host array)")
            if not isinstance(a, ndarray):
                if raw or t not in _C_SCALAR:
                    raise TypeError(f"{self.name}: argument {name} ({t}) must be a device array, got {type(a)}")
                scalars.add(name)
                values[name] = a
                continue
            if t not in _C_TYPES:
                if t in types_ and types_[t] != a.dtype:
                    raise TypeError(f"Type is mismatched. {name} {a.dtype} {t} {types_[t]}")
                types_.setdefault(t, a.dtype)
            elif np.dtype(t) != a.dtype:
                raise TypeError(f"{self.name}: argument {name} is {a.dtype}, the kernel takes {t}")
            values[name] = a._a
        shaped = [values[nm] for _, nm, raw in self.ins + self.outs if not raw and nm in values and nm not in scalars]
        shape = np.broadcast_shapes(*(v.shape for v in shaped)) if shaped else None
        if shape is None and size is None:
            raise ValueError(f"{self.name}: loop size is undecided (all arguments raw: pass size=)")
        n = int(np.prod(shape)) if size is None else int(size)
        outs = []
        for t, name, raw in self.outs:
            if name in values:
                outs.append(values[name])
                continue
            if raw or shape is None:
                raise ValueError(f"{self.name}: output {name} must be given")
            res = np.empty(shape, types_.get(t, t) if t in types_ else np.dtype(t))
            if _pool.limit and res.nbytes > _pool.limit:
                raise OutOfMemoryError(f"Out of memory allocating {res.nbytes:,} bytes (limit {_pool.limit:,})")
            _pool.allocate(res)
            _CAPTURE.new(res)
            values[name] = res
            outs.append(res)
        run = _compile_c(self._source(types_, scalars))
        call, keep, back = [ctypes.c_ssize_t(n)], [], []
        for t, name, raw in self.ins + self.outs:
            v = values[name]
            if name in scalars:
                call.append(getattr(ctypes, _C_SCALAR[t])(v))
                continue
            is_out = any(name == o[1] for o in self.outs)
            buf = np.ascontiguousarray(v if raw else np.broadcast_to(v, shape))
            if is_out and (buf is not v):
                back.append((v, buf))
            keep.append(buf)
            call.append(ctypes.c_void_p(buf.ctypes.data))
        run(*call)
        for v, buf in back:
            v[...] = buf
        COUNT.launch(f"ElementwiseKernel {self.name}")
        res = [ndarray(o) if not isinstance(a, ndarray) else a
               for o, a in zip(outs, list(args[n_in:]) + [None] * len(self.outs))]
        if _CAPTURE.stream is not None:          # replayed into the same outputs
            again = tuple(args[:n_in]) + tuple(res)
            _CAPTURE.record(lambda: self(*again, size=size))
        return res[0] if len(res) == 1 else tuple(res)


# --------------------------------------------------------------------------- #
# cuda: streams, events, devices, runtime, memory
# --------------------------------------------------------------------------- #
class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False
        self.t = None

    def record(self, stream=None):
        import time
        self.recorded = True
        self.t = time.perf_counter()
        COUNT.log.append(("record", "event"))

    def synchronize(self):
        COUNT.sync("Event.synchronize")

    @property
    def done(self):
        return True


class Stream:
    _current: list = []

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = id(self)

    def __enter__(self):
        Stream._current.append(self)
        return self

    def __exit__(self, *exc):
        Stream._current.pop()
        return False

    def use(self):
        return self

    def record(self, event=None):
        ev = event or Event()
        ev.record(self)
        return ev

    def wait_event(self, event):
        COUNT.log.append(("wait", "stream.wait_event"))

    def synchronize(self):
        COUNT.sync("Stream.synchronize")

    def begin_capture(self, mode=None):
        if self is _null_stream:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _CAPTURE.stream is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: a capture is already in progress")
        _CAPTURE.stream, _CAPTURE.thunks, _CAPTURE.allocated = self, [], []
        COUNT.log.append(("capture", "begin"))

    def is_capturing(self):
        return _CAPTURE.stream is self

    def end_capture(self):
        if _CAPTURE.stream is not self:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        thunks, allocated = _CAPTURE.thunks, _CAPTURE.allocated
        _CAPTURE.stream, _CAPTURE.thunks, _CAPTURE.allocated = None, [], []
        for a in allocated:           # nothing ran on a device: what the capture computed is not there
            if a.dtype.kind == "f":
                a.fill(np.nan)
            elif a.dtype.kind in "iu":
                a.fill(-7 if a.dtype.kind == "i" else 7)
        COUNT.log.append(("capture", f"end: {len(thunks)} operations"))
        return _Graph(thunks)


@contextlib.contextmanager
def _using_allocator(allocator=None):
    """cupy.cuda.using_allocator: logged (allocations stay modelled in the default pool)."""
    COUNT.log.append(("allocator", "enter"))
    try:
        yield
    finally:
        COUNT.log.append(("allocator", "exit"))


class _Graph:
    """A captured CUDA graph: its operations, replayed in order into the same buffers."""

    def __init__(self, thunks):
        self.thunks = thunks

    def launch(self, stream=None):
        COUNT.launch(f"graph launch ({len(self.thunks)} operations)")
        _CAPTURE.replaying = True
        try:
            for t in self.thunks:
                t()
        finally:
            _CAPTURE.replaying = False


_null_stream = Stream(null=True)


def _get_current_stream():
    return Stream._current[-1] if Stream._current else _null_stream


class _Device:
    compute_capability = "90"          # an H100/H200 (TF32 needs 8.0+)

    def __init__(self, i=0):
        self.id = int(i)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self

    def synchronize(self):
        COUNT.sync("Device.synchronize")


class _Runtime:
    CUDARuntimeError = CUDARuntimeError
    @staticmethod
    def memGetInfo():  # noqa: N802 - CUDA's name
        return TOTAL, TOTAL

    @staticmethod
    def getDevice():  # noqa: N802
        return 0

    @staticmethod
    def getDeviceCount():  # noqa: N802
        return 1

    @staticmethod
    def driverGetVersion():  # noqa: N802
        return 13000

    @staticmethod
    def runtimeGetVersion():  # noqa: N802
        return 13000

    @staticmethod
    def getDeviceProperties(i):  # noqa: N802
        return {"name": b"Strict CuPy stand-in", "major": 9, "minor": 0, "totalGlobalMem": TOTAL}


def _get_elapsed_time(start, end):
    """Milliseconds between two recorded events (host time here)."""
    return (end.t - start.t) * 1e3


cuda = types.SimpleNamespace(
    Stream=Stream, Event=Event, Device=_Device, runtime=_Runtime, get_current_stream=_get_current_stream,
    get_elapsed_time=_get_elapsed_time,
    memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError), Graph=_Graph,
    using_allocator=lambda allocator=None: _using_allocator(allocator),
    MemoryPool=_Pool)


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pinned_pool


# --------------------------------------------------------------------------- #
# cupyx
# --------------------------------------------------------------------------- #
def _empty_pinned(shape, dtype=np.float32, order="C"):
    return np.empty(shape, dtype, order=order)


def _zeros_pinned(shape, dtype=np.float32, order="C"):
    return np.zeros(shape, dtype, order=order)


def _erf(x):
    if not isinstance(x, ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy ships with the test environment
        import math
        erf = np.vectorize(math.erf)
    a, roots = x._a, [_root(x._a)]

    def redo():
        return np.asarray(erf(a)).astype(a.dtype, copy=False)
    res = _wrap(redo(), roots, "erf")                 # a kernel: counted, in the pool
    _recorded(res, roots, redo, "erf")
    return res


def _scatter(ufunc):
    """cupyx.scatter_add/max/min: ``a[slices] op= value`` in place, duplicates accumulating."""
    def scatter(a, slices, value):
        if not isinstance(a, ndarray):
            raise TypeError(f"Unsupported type {type(a)} (cupyx scatter into a host array)")
        t, i, v = a._a, _check_index(slices, "cupyx scatter"), _unwrap(value, "cupyx scatter")
        ufunc.at(t, i, v)
        _recorded(None, (), lambda: ufunc.at(t, i, v), "cupyx scatter")
    return scatter


_scatter_add, _scatter_max, _scatter_min = _scatter(np.add), _scatter(np.maximum), _scatter(np.minimum)
cupyx = types.SimpleNamespace(empty_pinned=_empty_pinned, zeros_pinned=_zeros_pinned,
                              scipy=types.SimpleNamespace(special=types.SimpleNamespace(erf=_erf)))



@contextlib.contextmanager
def installed():
    """Inside the block, ``import cupy`` gives this stand-in; yields a Backend on it."""
    import sys

    from .backend import Backend

    class _Patch:
        saved: dict = {}

        def setitem(self, d, k, v):
            self.saved.setdefault(k, d.get(k))
            d[k] = v
    patch = _Patch()
    install(patch)
    try:
        yield Backend("cupy", sys.modules[__spec__.name], "gpu:0", "strict CuPy stand-in", 0)
    finally:
        for k, v in patch.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def install(monkeypatch):
    """Make ``import cupy`` / ``import cupyx...`` give this stand-in (a pytest monkeypatch)."""
    import sys
    mx = types.ModuleType("cupyx")
    mx.empty_pinned, mx.zeros_pinned = _empty_pinned, _zeros_pinned
    mx.scatter_add, mx.scatter_max, mx.scatter_min = _scatter_add, _scatter_max, _scatter_min
    msc = types.ModuleType("cupyx.scipy")
    msp = types.ModuleType("cupyx.scipy.special")
    msp.erf = _erf
    mx.scipy, msc.special = msc, msp
    this = sys.modules[__spec__.name] if __spec__ else sys.modules["fake_cupy"]
    for name, mod in (("cupy", this), ("cupy._core", _core), ("cupy._core._routines_linalg", _core._routines_linalg),
                      ("cupyx", mx), ("cupyx.scipy", msc), ("cupyx.scipy.special", msp)):
        monkeypatch.setitem(sys.modules, name, mod)
    _pool.set_limit(0)
    _compute_types.clear()
    _CAPTURE.__init__()
    COUNT.reset()
