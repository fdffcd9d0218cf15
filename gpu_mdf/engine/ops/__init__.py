"""The op table: ONNX operators and MDF standard functions, one kernel each.

Every kernel is written once against an array module ``xp`` (numpy or cupy) and is
called as ``kernel(xp, *inputs, **attributes)``:

* ``inputs`` are the op's tensor inputs in ONNX order (a missing optional one is
  ``None``). Inputs named in ``static`` (shapes, axes, pads, sizes...) always arrive
  as *host* values (NumPy arrays), never as device arrays, so a kernel never has to
  fetch anything back from the GPU.
* ``attributes`` are exactly the attributes the op declares, cast to their ONNX
  types (``int``, ``tuple`` of ints, ``float``, ``str``...), with defaults filled in.
  No kernel takes ``**kwargs``: an attribute is implemented or refused
  (:class:`OpError`), never swallowed. ``check`` validates attribute values once,
  at compile time.
* A multi-output op (``len(outputs) > 1``) also gets ``n_outputs`` (how many of its
  outputs the graph reads) and returns a tuple of that many values.

Opsets: an op written at opset N follows its ONNX schema version at N (the versions are
in :mod:`~gpu_mdf.engine.ops.versions`). Each kernel declares the versions whose
semantics it implements (``since``/``until``); an op whose meaning changed (Softmax
before 13, Resize 10, Dropout's mask before 10, Mod for floats at 28) has a kernel per
meaning, and a version no kernel implements is refused (:func:`lookup`). Where an
older opset had an attribute that later became an input (``axes`` of Squeeze and the
reductions, ``split``, ``pads``, Clip's ``min``/``max``, Slice's ``starts``/``ends``...),
both forms are accepted. Files that do not say their opset are read at :data:`OPSET`.
Layouts follow ONNX (NCHW for Conv and pooling).

Adding an op is one decorated function.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .versions import MAX_OPSET, SINCE

OPSET = 17   # the opset of files that do not say theirs (modeci_mdf's EvaluableGraph uses 15)

# attribute types (ONNX AttributeProto types)
INT, INTS, FLOAT, FLOATS, STRING, TENSOR = "INT", "INTS", "FLOAT", "FLOATS", "STRING", "TENSOR"
REQUIRED = object()


class OpError(ValueError):
    """An input or attribute value that the kernel does not implement, or that is invalid."""


@dataclass(frozen=True)
class Attr:
    type: str
    default: Any = None


@dataclass(frozen=True)
class OpSpec:
    name: str
    kernel: Callable
    inputs: tuple[str, ...]                 # required tensor inputs, ONNX names and order
    optional: tuple[str, ...] = ()          # optional inputs after them
    attrs: dict = field(default_factory=dict)   # name -> Attr
    outputs: tuple[str, ...] = ("Y",)       # ONNX output names; several: the kernel returns a tuple
    static: frozenset = frozenset()         # inputs the kernel needs as host values
    variadic: bool = False                  # every input is one of a list (Sum, Concat...)
    variadic_outputs: bool = False          # as many outputs as the graph reads (Split)
    fresh: bool = False                     # always returns newly allocated memory
    inplace: bool = False                   # accepts inplace=True (may overwrite input 0)
    alias: bool = False                     # returns a view of input 0 (reshape, transpose...)
    shape_only: bool = False                # reads only its input's shape (Shape, Size): a host result
    check: Callable[[dict], None] | None = None   # validates attribute values at compile time
    since: int = 1                          # the oldest ONNX schema version whose meaning the kernel has
    until: int | None = None                # the newest (None: every later one)

    @property
    def multi(self) -> bool:
        return len(self.outputs) > 1 or self.variadic_outputs

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.inputs + self.optional


OPS: dict[str, OpSpec] = {}                 # name -> the kernel of the newest versions
VERSIONS: dict[str, list[OpSpec]] = {}      # name -> every kernel, oldest first


def op(name: str, inputs: tuple[str, ...] = ("X",), optional: tuple[str, ...] = (), outputs=("Y",),
       static: tuple[str, ...] = (), attrs: dict | None = None, variadic: bool = False,
       variadic_outputs: bool = False, fresh: bool = False, inplace: bool = False, alias: bool = False,
       shape_only: bool = False, check: Callable | None = None, since: int = 1, until: int | None = None):
    """Register ``kernel`` under ``onnx::NAME`` (or a bare MDF standard function name).

    ``fresh``: the result never aliases an input. ``alias``: the result is a view of the
    first input. ``inplace``: the kernel takes ``inplace=True`` and may then reuse its
    first input's memory (the compiler only asks when that memory is a temporary of the
    program that nothing else reads). ``since``/``until``: the ONNX schema versions whose
    meaning the kernel implements.
    """
    def deco(fn):
        spec = OpSpec(name, fn, tuple(inputs), tuple(optional), dict(attrs or {}), tuple(outputs),
                      frozenset(static), variadic, variadic_outputs, fresh, inplace, alias, shape_only,
                      check, since, until)
        VERSIONS.setdefault(name, []).append(spec)
        VERSIONS[name].sort(key=lambda s: s.since)
        if until is None:
            OPS[name] = spec
        return fn
    return deco


def lookup(function_name: str, opset: int | None = None, declared: bool = True) -> OpSpec | None:
    """Find an op by MDF function name: ``onnx::Relu``, ``linear``... (None: no such op).

    With ``opset``, the kernel of the op's schema version at that opset; a version no
    kernel implements, or an opset newer than the table, is an :class:`OpError`. When the
    file did not declare its opset (``declared=False``: ``opset`` is the default), an op
    ONNX added later than it is read at its first version, its only meaning until then.
    Also accepts the spellings that modeci_mdf's own keras importer writes
    (``onnx:Transpose``, ``onnx::Batchnormalization``).
    """
    name = function_name
    if name.startswith("onnx:"):
        name = "onnx::" + name.split(":")[-1]
    spec = OPS.get(name) or _FOLDED.get(name.lower())
    if spec is None or opset is None or not spec.name.startswith("onnx::"):
        return spec
    if not declared:
        opset = max(opset, SINCE[spec.name.split("::")[1]][0])
    return versioned(spec.name, opset)


def versioned(name: str, opset: int) -> OpSpec:
    """The kernel of ``onnx::Op`` as ONNX defines it at ``opset``."""
    op_type = name.split("::")[1]
    if not 1 <= opset <= MAX_OPSET:
        raise OpError(f"opset {opset} is outside the opsets the engine knows (1 to {MAX_OPSET})")
    versions = SINCE[op_type]
    version = max((v for v in versions if v <= opset), default=None)
    if version is None:
        raise OpError(f"{op_type} does not exist at opset {opset} (ONNX added it at opset {versions[0]})")
    for spec in VERSIONS[name]:
        if spec.since <= version and (spec.until is None or version <= spec.until):
            return spec
    have = ", ".join(str(v) for v in versions if any(s.since <= v and (s.until is None or v <= s.until)
                                                      for s in VERSIONS[name]))
    raise OpError(f"{op_type} at opset {opset} (its version {version}) is not implemented; the engine implements "
                  f"its versions {have}")


_FOLDED: dict[str, OpSpec] = {}


# --------------------------------------------------------------------------- #
# Attribute casting (to the ONNX schema types)
# --------------------------------------------------------------------------- #
def _scalar_of(v, what):
    a = np.asarray(v)
    if a.dtype == object or a.dtype.kind in "USV":
        raise OpError(f"{what}: expected a number, got {v!r}")
    if a.size != 1:
        raise OpError(f"{what}: expected one number, got shape {a.shape}")
    return a.reshape(()).item()


def cast_attr(spec: OpSpec, name: str, value):
    """``value`` (from an MDF file: number, list, string, array) as the attribute's type."""
    a = spec.attrs[name]
    what = f"{spec.name} attribute {name}"
    if value is None:
        return None
    t = a.type
    if t == INT:
        v = _scalar_of(value, what)
        if isinstance(v, float) and not v.is_integer():
            raise OpError(f"{what}: expected an integer, got {v}")
        return int(v)
    if t == FLOAT:
        return float(_scalar_of(value, what))
    if t in (INTS, FLOATS):
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise OpError(f"{what}: expected numbers, got {value!r}")
        flat = arr.reshape(-1).tolist()
        if t == INTS:
            if any(isinstance(x, float) and not x.is_integer() for x in flat):
                raise OpError(f"{what}: expected integers, got {flat}")
            return tuple(int(x) for x in flat)
        return tuple(float(x) for x in flat)
    if t == STRING:
        if isinstance(value, bytes):
            return value.decode()
        if not isinstance(value, str):
            raise OpError(f"{what}: expected a string, got {value!r}")
        return value
    if t == TENSOR:
        return np.asarray(value)
    raise AssertionError(t)


# --------------------------------------------------------------------------- #
# Helpers shared by kernels
# --------------------------------------------------------------------------- #
def ints(v) -> tuple[int, ...]:
    """A static input (host array, list or scalar) as a tuple of Python ints."""
    return tuple(int(x) for x in np.asarray(v).reshape(-1).tolist())


def scalar(v):
    """A static 0-d/1-element input as a Python number."""
    return None if v is None else np.asarray(v).reshape(-1)[0].item()


def norm_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise OpError(f"{what} {axis} is out of range for rank {ndim}")
    return axis % max(ndim, 1)


# Growth guard. A hostile file must not make the compiler allocate without bound, but
# the data a file or a caller already holds is not the danger: what is dangerous is a
# value much larger than what produced it (Expand or Tile of a few numbers to a huge
# shape, a broadcast outer product, a literal that YAML aliases repeat). A value computed
# at compile time may hold at most GROWTH times the elements it was computed from, or
# FLOOR elements, whichever is more; the shape-creating kernels check before allocating.
GROWTH = 16
FLOOR = 1 << 22                       # 4M elements: every resize matrix or one-hot table a converter makes
MAX_FOLDED_ELEMENTS = 1 << 26         # the per-item bound of the compile-time probe run of the graph
_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("gpu_mdf_budget", default=None)


def growth_budget(basis: int) -> int:
    """Elements a value computed from ``basis`` held elements may have."""
    return max(FLOOR, GROWTH * int(basis))


@contextlib.contextmanager
def folding(budget: int = MAX_FOLDED_ELEMENTS):
    """Kernels called inside this block build compile-time values: shape-creating ops
    refuse outputs larger than ``budget`` elements before allocating."""
    token = _budget.set(int(budget))
    try:
        yield
    finally:
        _budget.reset(token)


def check_alloc(shape) -> None:
    """Called by ops that create arrays from static sizes (ConstantOfShape, Expand...)."""
    budget = _budget.get()
    if budget is not None:
        n = 1
        for s in shape:
            n *= max(int(s), 0)
        if n > budget:
            from ...errors import CompileError
            raise CompileError(f"a value of shape {tuple(int(s) for s in shape)} ({n:,} elements), computed from "
                               f"far fewer, exceeds the compile-time limit of {budget:,} elements")


_WEIGHT_FORMS: dict = {}
_FROZEN: dict = {}          # id -> weakref of the read-only views the binder made of constants


def frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view of the constant ``a`` (an array the program owns: the plan copies a
    caller's constants at compile), registered as one whose kernel forms may be kept
    (:func:`weight_form`)."""
    v = a.view()
    v.flags.writeable = False
    k = id(v)
    _FROZEN[k] = weakref.ref(v, lambda _ref, k=k: _FROZEN.pop(k, None))
    return v


_MISSING = object()


def remembered(table: dict, key, make: Callable[[], Any], limit: int = 4096):
    """``table[key]``, made by ``make()`` where it is not there yet (None is an answer too):
    what a per-batch step works out from shapes alone (a conv's geometry, a chain's row
    layout, a broadcast shape), worked out once. The table empties past ``limit`` entries;
    one lookup a read, so a clear by another thread costs a recompute, never an error."""
    value = table.get(key, _MISSING)
    if value is _MISSING:
        if len(table) > limit:
            table.clear()
        value = table[key] = make()
    return value


def weight_form(w, form: str, make: Callable[[], Any]):
    """``make()``: a form of the weights ``w`` that a kernel wants (a transposed copy, say),
    made once for a constant (:func:`frozen`) and on every call for anything else (an
    input, a computed value, a caller's read-only array: any may hold other values at the
    next call). A kept form is read-only and goes when ``w`` does. ``form`` names
    everything the result depends on besides ``w``."""
    ref = _FROZEN.get(id(w)) if isinstance(w, np.ndarray) else None
    if ref is None or ref() is not w:
        return make()
    key = (id(w), form)
    hit = _WEIGHT_FORMS.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    v = make()
    if isinstance(v, np.ndarray):
        v.flags.writeable = False
    _WEIGHT_FORMS[key] = (weakref.ref(w, lambda _ref, k=key: _WEIGHT_FORMS.pop(k, None)), v)
    return v


def device_const(xp, key, make: Callable[[], np.ndarray]):
    """A small host-computed index array (e.g. Resize's gather indices) on the device,
    cached per device and key, so it is copied once, not on every batch.

    Inside a CUDA graph capture (:mod:`~gpu_mdf.engine.graphs`) a cached array is also
    handed to the capture, which keeps it alive with the graph (the cache may drop it);
    a miss there is an error (the copy from the host would be recorded from a staging
    buffer that is reused later), so the capture fails and the batch runs eagerly,
    filling the cache for the next capture."""
    if xp is np:
        return make()
    dev = xp.cuda.runtime.getDevice()
    cache = _DEVICE_CACHE.setdefault((id(xp), dev), {})
    v = cache.get(key)
    if v is None:
        if _CAPTURED is not None:
            raise OpError(f"a device constant {key[0] if isinstance(key, tuple) else key} is not cached yet "
                          f"(made on the next eager batch, not inside a CUDA graph capture)")
        if len(cache) > 256:
            cache.clear()
        v = cache[key] = xp.asarray(make())
    if _CAPTURED is not None:
        _CAPTURED.append(v)
    return v


_DEVICE_CACHE: dict = {}
_CAPTURED: list | None = None      # the device constants a capture in progress reads


@contextlib.contextmanager
def recording_device_consts():
    """Collect the device constants read inside the block (a CUDA graph capture)."""
    global _CAPTURED
    _CAPTURED, before = [], _CAPTURED
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = before


# register the kernels
from . import elementwise, nn, resize, standard, tensor  # noqa: E402,F401

_FOLDED.update({k.lower(): v for k, v in OPS.items()})

__all__ = ["OPS", "OPSET", "MAX_OPSET", "VERSIONS", "OpSpec", "OpError", "Attr", "op", "lookup", "versioned",
           "cast_attr", "folding", "growth_budget", "check_alloc",
           "INT", "INTS", "FLOAT", "FLOATS", "STRING", "TENSOR", "REQUIRED"]
