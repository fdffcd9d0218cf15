"""Compile an MDF graph once: load -> plan -> bind -> :class:`~gpu_mdf.engine.program.Program`.

``compile`` = read the document (:mod:`gpu_mdf.mdf`: plain JSON/YAML/BSON, never
``eval``) -> :func:`~gpu_mdf.engine.plan.plan_graph` (backend-free: order, folding,
host-side shape arithmetic, in-place reuse) -> :func:`bind` to an array module:
constants move to the device once and every step becomes a closure over device arrays.
The declared input shapes then run once on the CPU, for the output shapes and the bytes
an item needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CompileError
from ..mdf import NORMALIZATIONS, GraphMeta, load_mdf, select_graph
from .backend import Backend, select_backend
from .ops import frozen
from .passes import optimize as run_passes
from .plan import Plan, plan_graph, plan_inplace
from .program import Program
from .steps import CONST, DEVICE, HOST, Ref, Step


def compile(model, device: str | Backend = "auto", dtype: str | None = None,
            normalize: str | None = None, graph: str | None = None,
            inputs: list[str] | None = None, constants: dict | None = None, opset: int | None = None,
            optimize: bool = True, precision: str | None = None, cuda_graphs: bool = False) -> Program:
    """Compile an MDF model (path, dict or ``modeci_mdf.mdf.Model``) for batch execution.

    * ``constants``: values for unconnected input ports (``{port_id: array}`` or
      ``{"node.port": array}``), e.g. the weights an exporter writes as ports. They are
      constants: copied at compile (changing the caller's arrays later changes nothing),
      folded, moved to the device once, never batched. The remaining free ports are the
      inputs of :meth:`Program.run`.
    * ``dtype``: ``None`` follows the file (float32 for ONNX-op graphs and float32
      ports, float64 for MDF expressions and standard functions, as modeci_mdf's
      EvaluableGraph); ``"float32"``/``"float64"`` force one.
    * ``normalize`` overrides the pixel normalisation recorded in the graph metadata
      (``l2`` | ``scale`` | ``none``).
    * ``inputs`` names parameters to feed as graph inputs instead (modeci_mdf's
      ``keras_to_mdf`` bakes the batch into one).
    * ``opset``: the ONNX opset the graph's ``onnx::`` functions were written in, for a
      file that does not record it (gpu-mdf's converters do; modeci_mdf's ``onnx_to_mdf``
      does not); default 17.
    * ``optimize``: run the optimising passes (:mod:`~gpu_mdf.engine.passes`); False runs
      the graph as written, for debugging and for comparing the two.
    * ``precision`` (opt-in, approximate: compare with ``fp32`` before trusting it):
      ``fp16`` runs the whole program in float16 (weights, inputs, every value; CuPy's and
      NumPy's own float16 kernels, not the generated ones); ``tf32`` lets cuBLAS round
      float32 products' inputs to TensorFloat-32 on a GPU (refused on the CPU, which has
      no such mode). ``None``/``fp32`` is the default, exact float32 as written.
    * ``cuda_graphs`` (opt-in, GPU only): capture each input signature's batch as a CUDA
      graph on its second batch and replay it after (:mod:`~gpu_mdf.engine.graphs`);
      ``Program.describe()`` says what was captured and why not where it was not.
    """
    backend = device if isinstance(device, Backend) else select_backend(device)
    dtype, tf32 = _precision(precision, dtype, backend)
    if cuda_graphs and not backend.is_gpu:
        raise CompileError(f"CUDA graphs need a GPU; this program runs on {backend.device} ({backend.name})")
    model_id, gid, g = select_graph(load_mdf(model), graph)
    norm = normalize or GraphMeta.of(g).normalize or "none"
    if norm not in NORMALIZATIONS:
        raise CompileError(f"unknown normalisation {norm!r}; expected {NORMALIZATIONS}")
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise CompileError(f"dtype must be a float type, got {dtype}")
    plan = plan_graph(model_id, gid, g, dtype=dtype, constants=constants, inputs=inputs, normalize=norm,
                      opset=opset)
    found = probe(plan)
    if precision == "fp16":
        _check_all_half(plan, found)
    if optimize:
        plan.notes = run_passes(plan, found.values if found else None, gpu=backend.is_gpu)
    plan_inplace(plan.steps, plan.outputs)
    prog = bind(plan, backend)
    prog.tf32 = tf32
    if cuda_graphs:
        from .graphs import CudaGraphs
        prog.cuda_graphs = CudaGraphs(prog)
    if found:
        for o in prog.outputs:
            o.shape, o.dtype = found.outputs[o.name]
        prog.bytes_per_item = found.bytes_per_item
    return prog


PRECISIONS = ("fp32", "fp16", "tf32")


def _precision(precision: str | None, dtype: str | None, backend: Backend) -> tuple[str | None, bool]:
    """(dtype, TF32 on) for ``compile(precision=...)``; a CompileError for what does not fit."""
    if precision is None:
        return dtype, False
    if precision not in PRECISIONS:
        raise CompileError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    want = "float16" if precision == "fp16" else "float32"          # fp32 and tf32 compute in float32
    if dtype is not None and np.dtype(dtype) != np.dtype(want):
        raise CompileError(f"precision {precision} computes in {want}; dtype {dtype} contradicts it")
    if precision == "tf32":
        if not backend.is_gpu:
            raise CompileError(f"precision tf32 is a cuBLAS math mode of NVIDIA GPUs; this program runs on "
                               f"{backend.device} ({backend.name})")
        cc = str(backend.xp.cuda.Device(backend.device_index or 0).compute_capability)
        if int(cc) < 80:
            raise CompileError(f"precision tf32 needs an Ampere or newer GPU (compute capability 8.0+); "
                               f"{backend.device} has {cc[:-1]}.{cc[-1]}")
    return want, precision == "tf32"


def _check_all_half(plan: Plan, found) -> None:
    """fp16 means float16 throughout: a value of another float type (after an explicit
    Cast to float32, say) is refused, naming where, rather than run half in float32."""
    if found is None:
        return
    for st in plan.steps:
        _, dtype = found.values.get(st.key, (None, None))
        if dtype and np.dtype(dtype).kind == "f" and np.dtype(dtype) != np.float16:
            raise CompileError(f"precision fp16: {st.what} gives {dtype}, so the program would not run "
                               f"in float16 throughout")


def bind(plan: Plan, backend: Backend) -> Program:
    """Bind a plan to a backend: constants move to the device once, each step
    becomes a closure over device arrays (host steps run on NumPy)."""
    b = Binder(plan, backend)
    release = _release_points(plan)
    steps = [(st.key, b.step(st), release.get(i, []), st.what) for i, st in enumerate(plan.steps)]
    outs = [(o.name, b.output(o.ref)) for o in plan.outputs]
    defaults = {p.name: b.dev(p.default) for p in plan.inputs if p.default is not None}
    return Program(plan.model_id, plan.graph_id, backend, plan.dtype, plan.inputs, plan.outputs,
                   plan.normalize, plan, steps, defaults, outs)


def _release_points(plan: Plan) -> dict[int, list]:
    """Free every intermediate value right after its last reader: step index -> keys."""
    last: dict = {}
    for i, st in enumerate(plan.steps):
        for r in st.args:
            if r is not None and r.place != CONST:
                last[r.val.key] = i
    keep = {o.ref.val.key for o in plan.outputs}
    produced = {st.key for st in plan.steps} | {("input", p.name) for p in plan.inputs}
    out: dict[int, list] = {}
    for key, i in last.items():
        if key not in keep and key in produced:
            out.setdefault(i, []).append(key)
    return out


class Binder:
    """Resolves the arguments of steps on one backend; moves each constant there once."""

    def __init__(self, plan: Plan, backend: Backend):
        self.plan, self.backend, self.xp = plan, backend, backend.xp
        self._dev_cache: dict = {}

    def dev(self, v):
        """A host constant on the device (moved once; cached by identity)."""
        k = id(v)
        hit = self._dev_cache.get(k)
        if hit is None:
            hit = self._dev_cache[k] = (v, self.xp.asarray(v))
        return hit[1]

    def getter(self, r: Ref | None, as_: str, xp) -> Callable[[dict], Any]:
        """How a step reads ``r``: as a device tensor, a host value (static inputs), or an
        expression operand (Python scalars for 0-d constants: weakly typed and CuPy-safe)."""
        if r is None:
            return lambda env: None
        if r.place == CONST:
            v = r.host_value()
            if isinstance(v, np.ndarray) and not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)     # once here, not a copy per batch in a reshape
            if as_ == "whole" and r.val.multi and r.index is None:
                c = tuple(x if xp is np else self.dev(x) for x in r.val.const)
            elif as_ == "expr" and np.ndim(v) == 0:
                c = np.asarray(v).item()
            elif as_ == "host" or xp is np:
                c = frozen(v) if isinstance(v, np.ndarray) else v    # kernels may keep forms of it
            else:
                c = self.dev(v)
            return lambda env: c
        key, i = r.val.key, r.index
        if r.val.multi and i is None:
            i = 0 if as_ != "whole" else None
        get = (lambda env: env[key]) if i is None else (lambda env: env[key][i])
        if as_ == "host" and r.place == DEVICE and xp is not np:
            to_host = self.backend.to_host
            return lambda env: to_host(get(env))        # a planned per-batch sync (Plan.syncs)
        return get

    def step(self, st: Step):
        """The closure of one step: host steps run on NumPy, the others on the backend."""
        return st.bind(self, np if st.place == HOST else self.xp)

    def output(self, r: Ref):
        if r.place == CONST:
            v = r.host_value()
            if isinstance(v, np.ndarray) and not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)     # once here, not a copy per batch in a reshape
            d = self.dev(np.asarray(v))
            return lambda env: d
        return self.getter(r, "device", np if r.place == HOST else self.xp)


@dataclass
class Probe:
    """What one run of the declared input shapes on the CPU (batch 1) showed."""
    values: dict           # step key -> (shape, dtype) of its value
    outputs: dict          # output name -> (shape with -1 for the batch axis, dtype)
    bytes_per_item: int


def probe(plan: Plan) -> Probe | None:
    """Run the declared input shapes once on the CPU: every value's shape and type, the
    outputs', the bytes an item needs. None where the inputs have no declared shape, or
    where shapes come from the input (zeros say nothing of those)."""
    inputs = plan.inputs
    if any(p.shape is None and p.default is None for p in inputs):
        return None
    cpu = bind(plan, select_backend("cpu"))
    feeds = {p.name: np.zeros(tuple(1 if s == -1 else s for s in p.shape), p.dtype) for p in inputs
             if p.default is None or (p.shape is not None and -1 in p.shape)}
    batched = [p for p in inputs if p.shape is not None and p.shape and p.shape[0] == -1]
    batch = 1 if batched or not (inputs and inputs[0].shape) else max(1, inputs[0].shape[0])
    trace: list = []
    from .ops import folding
    try:
        with np.errstate(all="ignore"), folding():      # creation ops stay bounded on the probe too
            values = cpu.execute(feeds, trace=trace)
    except CompileError:
        raise
    except Exception as e:
        if plan.syncs:
            return None
        raise CompileError(f"graph {plan.graph_id} fails on its declared input shapes: "
                           f"{type(e).__name__}: {e}") from None
    outputs = {}
    for o in plan.outputs:
        v = np.asarray(values[o.name])
        outputs[o.name] = ((-1,) + tuple(v.shape[1:]) if batched and v.shape else tuple(v.shape), str(v.dtype))
    fed = sum(v.nbytes for v in feeds.values())
    seen = {key: (tuple(np.shape(v)), str(getattr(v, "dtype", ""))) for key, v in trace if not isinstance(v, tuple)}
    for p in inputs:
        v = np.asarray(feeds[p.name] if p.name in feeds else p.default)
        seen[("input", p.name)] = (v.shape, str(v.dtype))
    return Probe(seen, outputs, int((sum(_nbytes(v) for _, v in trace) + fed) / batch))


def _nbytes(v) -> int:
    return sum(getattr(x, "nbytes", 0) for x in v) if isinstance(v, tuple) else getattr(v, "nbytes", 0)
