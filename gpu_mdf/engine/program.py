"""Compile an MDF graph once into a :class:`Program`, then run batches through it.

``compile`` = load the MDF file (plain JSON/YAML: no modelspec, no ``eval``) ->
:func:`~gpu_mdf.engine.plan.plan_graph` (backend-free: order, folding, host-side
shape arithmetic, in-place reuse) -> :func:`bind` to an array module: constants move
to the device once and every step becomes a closure over device arrays. A run is a
flat loop over those closures; the only device->host copy of a batch is its result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import Backend, select_backend
from ..data import NORMALIZATIONS, check_finite, normalize
from ..errors import CompileError, DataError, ModelFileError
from .expr import compile_expr
from .plan import CONST, DEVICE, HOST, InputSpec, OutputSpec, Plan, Ref, Step, items, plan_graph

# the names earlier versions exported
PortSpec = InputSpec
_POOL = None


def _cpu_threads() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _block_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(_cpu_threads(), thread_name_prefix="gpu-mdf-block")
    return _POOL


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def load_mdf_dict(source) -> dict:
    """Return the MDF model as a plain dict ``{model_id: {...}}``.

    ``source`` is a path (``.json``, ``.yaml``/``.yml``, ``.bson``), a dict, or a
    ``modeci_mdf.mdf.Model``.
    """
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict") and hasattr(source, "graphs"):   # modeci_mdf.mdf.Model
        return source.to_dict()                                   # already {model_id: {...}}
    path = Path(source)
    if not path.exists():
        raise ModelFileError(f"{path}: no such MDF file")
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder, not an MDF file")
    if path.suffix.lower() == ".bson":
        d = _load_bson(path)
    else:
        d = _load_text(path)
    if not isinstance(d, dict) or len(d) != 1 or not isinstance(next(iter(d.values())), dict) \
            or "graphs" not in next(iter(d.values())):
        raise ModelFileError(f"{path}: not an MDF model (expected {{model_id: {{graphs: ...}}}})")
    return d


def _load_bson(path: Path) -> dict:
    """modelspec's BSON form of MDF (what ``modeci_mdf``'s ``Model.to_bson_file`` writes):
    arrays of doubles come back as float64 arrays, decoded by NumPy (:mod:`gpu_mdf.bsonio`)."""
    from ..bsonio import BSONError, decode
    try:
        return decode(path.read_bytes())
    except OSError as e:
        raise ModelFileError(f"{path}: not readable ({e.strerror})") from None
    except BSONError as e:
        raise ModelFileError(f"{path}: not a readable BSON MDF file ({e})") from None


def _parse_json(text: str):
    """orjson (4x faster on weight lists) where it takes the text; Python's json for what
    only it reads (NaN and Infinity, which Python writes for non-finite numbers; integers
    beyond 64 bits; nesting deeper than orjson's limit)."""
    import orjson
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _load_text(path: Path):
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            d = yaml.load(text, Loader=loader)
        else:
            d = _parse_json(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable MDF file ({type(e).__name__}: {e})") from None
    except Exception as e:  # yaml errors
        raise ModelFileError(f"{path}: not a readable MDF file ({type(e).__name__})") from None
    return d


def load_constants(path) -> dict[str, np.ndarray]:
    """Weights for ``compile(constants=...)`` from a ``.npz`` file (keys: port ids)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such constants file")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ModelFileError(f"{p}: not a readable .npz of constants ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- #
# Program
# --------------------------------------------------------------------------- #
@dataclass
class Program:
    """A compiled MDF graph bound to a backend. See :func:`compile`."""

    model_id: str
    graph_id: str
    backend: Backend
    dtype: np.dtype
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    normalize: str
    metadata: dict
    plan: Plan = field(repr=False)
    _steps: list = field(repr=False, default_factory=list)        # (key, fn, release)
    _defaults: dict = field(repr=False, default_factory=dict)     # input name -> device array
    _out: list = field(repr=False, default_factory=list)          # (name, getter)
    bytes_per_item: int = 0

    @property
    def xp(self):
        return self.backend.xp

    def describe(self) -> str:
        ins = ", ".join(p.describe() for p in self.inputs) or "none (a closed graph: evaluates once)"
        outs = ", ".join(p.describe() for p in self.outputs)
        text = (f"{self.model_id}/{self.graph_id}: {len(self._steps)} steps; inputs {ins}; "
                f"outputs {outs}; {self.dtype}; on {self.backend.describe()}")
        if self.plan.syncs:
            text += f"; device->host copies per batch: {len(self.plan.syncs)} ({self.plan.syncs[0]}...)"
        if self.plan.uploads:
            text += f"; host->device copies per batch: {len(self.plan.uploads)}"
        return text

    def step_names(self, inplace_only: bool = False) -> set[tuple[str, str]]:
        """(node, value) of the steps a batch runs (those done in place, with ``inplace_only``)."""
        return {st.key[:2] for st in self.plan.steps if isinstance(st.key, tuple) and len(st.key) == 3
                and (st.inplace or not inplace_only)}

    # -- feeding --------------------------------------------------------------- #
    def prepare(self, x, spec: InputSpec | None = None, check: bool = True):
        """Move one input batch to the device, normalising integer pixels there.

        Integer input to a float port (uint8 pixels) is cast and normalised on the
        device with the graph's normalisation; float input is taken as already
        normalised and, when it comes from the host, checked for NaN/Inf there (so a
        GPU never waits for the check); integer ports take integers as they are.
        """
        spec = spec or self.inputs[0]
        xp = self.xp
        on_host = isinstance(x, np.ndarray) or not self.backend.is_gpu
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
            on_host = True
        target = self._target_shape(x, spec)
        if target is not None:
            x = x.reshape(target)          # the model's layout first: normalisation depends on it
        want = np.dtype(spec.dtype)
        if want.kind in "iub":
            if x.dtype.kind not in "iub":
                raise DataError(f"input {spec.name}: expects {want} values, got {x.dtype}")
            d = self.backend.to_device(x).astype(want, copy=False)
        elif np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            d = normalize(self.backend.to_device(x), self.normalize, xp, self.dtype)
        elif np.issubdtype(x.dtype, np.floating):
            if check and on_host:
                check_finite(x, np, f"input {spec.name}")
            d = self.backend.to_device(x).astype(self.dtype, copy=False)
        else:
            raise DataError(f"input {spec.name}: unsupported dtype {x.dtype}")
        return d

    @staticmethod
    def _target_shape(x, spec: InputSpec):
        """The batch in the port's declared layout; the leading axis is the batch. The same
        values arranged otherwise are accepted: up to size-1 axes (a channel axis), or the
        same number of values an item (``(N, 784)`` for a model taking 28x28 images)."""
        if spec.shape is None or x.ndim == 0:
            return None
        want = tuple(spec.shape[1:])
        if tuple(x.shape[1:]) == want or (-1 in want):
            return None
        same_dims = [d for d in x.shape[1:] if d != 1] == [d for d in want if d != 1]
        if not same_dims and int(np.prod(x.shape[1:])) != int(np.prod(want)):
            raise DataError(f"input {spec.name}: got shape {tuple(x.shape)}, the model expects "
                            "(N, " + ", ".join(str(d) for d in want) + f") ({int(np.prod(want))} values an item)")
        return (len(x),) + want

    def _feeds(self, batch, check: bool) -> dict[str, Any]:
        if batch is None:
            batch = {}
        if isinstance(batch, dict):
            unknown = [k for k in batch if k not in {p.name for p in self.inputs}]
            if unknown:
                raise DataError(f"unknown graph input(s) {unknown}; the graph takes "
                                f"{[p.name for p in self.inputs] or 'no input'}")
            missing = [p.name for p in self.inputs if p.name not in batch and p.name not in self._defaults]
            if missing:
                raise DataError(f"missing graph input(s) {missing}; the graph takes "
                                f"{[p.describe() for p in self.inputs]}")
            return {p.name: self.prepare(batch[p.name], p, check) for p in self.inputs if p.name in batch}
        if isinstance(batch, (list, tuple)) and len(self.inputs) > 1:
            if len(batch) != len(self.inputs):
                raise DataError(f"{len(batch)} arrays given for {len(self.inputs)} graph inputs")
            return {p.name: self.prepare(b, p, check) for p, b in zip(self.inputs, batch)}
        spec = self.primary_input
        if spec is None:
            raise DataError(f"the graph takes {len(self.inputs)} inputs "
                            f"{[p.name for p in self.inputs] or ''}: pass a dict keyed by input name"
                            + (" (or bind weights with constants=)" if len(self.inputs) > 1 else ""))
        return {spec.name: self.prepare(batch, spec, check)}

    @property
    def primary_input(self) -> InputSpec | None:
        """The input a single array feeds: the only input, or the only one without a default."""
        if len(self.inputs) == 1:
            return self.inputs[0]
        required = [p for p in self.inputs if p.default is None]
        return required[0] if len(required) == 1 else None

    # -- running --------------------------------------------------------------- #
    def execute(self, feeds: dict[str, Any], trace: list | None = None) -> dict[str, Any]:
        """Run on device arrays already prepared; returns device arrays by output name.

        ``trace``, when given, collects the size in bytes of every value computed.
        """
        env: dict[Any, Any] = {}
        for p in self.inputs:
            env[("input", p.name)] = feeds[p.name] if p.name in feeds else self._defaults[p.name]
        if not self.backend.is_gpu:
            # overflow and NaN inside a model are not warnings here: a non-finite output is
            # an error of its item, reported by whoever reads the results (gpu-mdf infer)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return self._loop(env, trace)
        return self._loop(env, trace)

    def _loop(self, env, trace):
        for key, fn, release in self._steps:
            env[key] = fn(env)
            if trace is not None:
                v = env[key]
                trace.append(sum(getattr(x, "nbytes", 0) for x in v) if isinstance(v, tuple)
                             else getattr(v, "nbytes", 0))
            for k in release:
                del env[k]
        return {name: get(env) for name, get in self._out}

    def run(self, batch=None, to_host: bool = True, check: bool = True, threads: int | None = None):
        """Run one batch (a dict by input name, one array, or nothing for a closed graph).
        Returns the output array, or a dict when there are several.

        On the CPU, for a graph with large intermediate values per item (convolutions),
        a large batch fed as one array runs in blocks of about :attr:`block_size` items,
        so that each block's values stay in cache, spread over ``threads`` threads
        (default: every core), each with single-threaded BLAS (NumPy's elementwise work
        uses one core). Block boundaries depend on the batch size only, not on the
        thread count, so the numbers do not either; ``threads=1`` runs the blocks in turn.
        Graphs with small values per item (an MLP: the time is in a few large matrix
        products) run whole, with BLAS on every core.
        """
        if not self.backend.is_gpu and self.primary_input is not None and getattr(batch, "ndim", 0) \
                and self.block_size and len(batch) > self.block_size:
            return self._run_blocks(batch, threads or _cpu_threads(), check)
        return self._run_whole(batch, to_host, check)

    def _run_whole(self, batch, to_host: bool = True, check: bool = True):
        with self.backend.use():
            out = self.execute(self._feeds(batch, check))
            if to_host:
                out = {k: self._host(v) for k, v in out.items()}
        return next(iter(out.values())) if len(out) == 1 else out

    @property
    def block_size(self) -> int:
        """Items per CPU block: a working set of about 32 MB (a last-level cache); 0
        where blocks do not pay (under 64 KB of intermediate values per item)."""
        if self.bytes_per_item < (64 << 10):
            return 0
        return int(min(1024, max(32, (32 << 20) // self.bytes_per_item)))

    def _run_blocks(self, batch, threads: int, check: bool):
        from threadpoolctl import threadpool_limits
        n = len(batch)
        nb = max(1, round(n / self.block_size))
        bs = -(-n // nb)                                       # equal blocks, from the batch size alone
        what = f"input {self.primary_input.name}"

        def block(lo):
            part = batch[lo:lo + bs]
            if check and part.dtype.kind == "f":
                check_finite(part, np, what, offset=lo)        # items numbered in the whole batch
            return self._run_whole(part, check=False)   # never blocked again (a block may be a little larger)
        starts = range(0, len(batch), bs)
        if threads > 1:
            with threadpool_limits(1, user_api="blas"):
                outs = list(_block_pool().map(block, starts))
        else:
            outs = [block(lo) for lo in starts]
        if isinstance(outs[0], dict):
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return np.concatenate(outs)

    def _host(self, v):
        if isinstance(v, np.ndarray):
            return v
        if self.backend.is_gpu and not np.isscalar(v):
            return self.backend.to_host(v)
        return np.asarray(v)

    def run_many(self, chunks: Iterable, check: bool = True) -> Iterator:
        """Run a stream of batches, yielding host results in order.

        On a GPU, copies of the next chunk (pinned host memory, its own stream)
        overlap the compute of the current one; see :mod:`gpu_mdf.engine.stream`.
        """
        if self.backend.is_gpu:
            from .stream import run_overlapped
            yield from run_overlapped(self, chunks, check)
            return
        for chunk in chunks:
            yield self.run(chunk, to_host=True, check=check)

    def suggest_batch_size(self, requested: int | None = None, memory_fraction: float = 0.5,
                           cpu_default: int = 2048) -> int:
        """A batch size that fits: on a GPU, a fraction of free memory over the
        measured bytes per item; on the CPU, a cache-friendly default."""
        free = self.backend.free_memory()
        if free is None or not self.bytes_per_item:
            return int(requested or cpu_default)
        fit = max(1, int(free * memory_fraction) // self.bytes_per_item)
        return int(min(requested, fit) if requested else min(fit, 1 << 20))


# --------------------------------------------------------------------------- #
# Compilation
# --------------------------------------------------------------------------- #
def compile(model, device: str | Backend = "auto", dtype: str | None = None,
            normalize: str | None = None, graph: str | None = None,
            inputs: list[str] | None = None, constants: dict | None = None) -> Program:
    """Compile an MDF model (path, dict or ``modeci_mdf.mdf.Model``) for batch execution.

    * ``constants``: values for unconnected input ports (``{port_id: array}`` or
      ``{"node.port": array}``), e.g. the weights an exporter writes as ports. They are
      constants: folded, moved to the device once, never batched. The remaining free
      ports are the inputs of :meth:`Program.run`.
    * ``dtype``: ``None`` follows the file (float32 for ONNX-op graphs and float32
      ports, float64 for MDF expressions and standard functions, as modeci_mdf's
      EvaluableGraph); ``"float32"``/``"float64"`` force one.
    * ``normalize`` overrides the pixel normalisation recorded in the graph metadata
      (``l2`` | ``scale`` | ``none``).
    * ``inputs`` names parameters to feed as graph inputs instead (modeci_mdf's
      ``keras_to_mdf`` bakes the batch into one).
    """
    backend = device if isinstance(device, Backend) else select_backend(device)
    d = load_mdf_dict(model)
    model_id, mdict = next(iter(d.items()))
    graphs = items(mdict.get("graphs"))
    if not graphs:
        raise CompileError(f"model {model_id} has no graph")
    if graph is None and len(graphs) > 1:
        raise CompileError(f"model {model_id} has graphs {[g for g, _ in graphs]}: choose one")
    gid, g = next(((k, v) for k, v in graphs if graph in (None, k)), (None, None))
    if g is None:
        raise CompileError(f"model {model_id} has no graph {graph!r}")
    meta = (g.get("metadata") or {}).get("gpu_mdf", {})
    norm = normalize or meta.get("normalize", "none")
    if norm not in NORMALIZATIONS:
        raise CompileError(f"unknown normalisation {norm!r}; expected {NORMALIZATIONS}")
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise CompileError(f"dtype must be a float type, got {dtype}")
    plan = plan_graph(model_id, gid, g, dtype=dtype, constants=constants, inputs=inputs, normalize=norm)
    prog = bind(plan, backend)
    _probe_shapes(prog)
    return prog


def bind(plan: Plan, backend: Backend) -> Program:
    """Bind a plan to a backend: constants move to the device once, each step
    becomes a closure over device arrays (host steps run on NumPy)."""
    b = _Binder(plan, backend)
    release = _release_points(plan)
    steps = [(st.key, b.step(st), release.get(i, [])) for i, st in enumerate(plan.steps)]
    outs = [(o.name, b.output(o.ref)) for o in plan.outputs]
    defaults = {p.name: b.dev(p.default) for p in plan.inputs if p.default is not None}
    return Program(plan.model_id, plan.graph_id, backend, plan.dtype, plan.inputs, plan.outputs,
                   plan.normalize, plan.metadata, plan, steps, defaults, outs)


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


class _Binder:
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
            if as_ == "whole" and r.val.multi and r.index is None:
                c = tuple(x if xp is np else self.dev(x) for x in r.val.const)
            elif as_ == "expr" and np.ndim(v) == 0:
                c = np.asarray(v).item()
            elif as_ == "host" or xp is np:
                c = v
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
        xp = np if st.place == HOST else self.xp
        if st.kind == "op":
            spec = st.spec
            kw = dict(st.attrs)
            if st.inplace:
                kw["inplace"] = True
            gets = [self.getter(r, "host" if s else "device", xp) for r, s in
                    zip(st.args, st.static or (False,) * len(st.args))]
            kernel = spec.kernel
            if len(gets) == 1:
                g0 = gets[0]
                return lambda env: kernel(xp, g0(env), **kw)
            return lambda env: kernel(xp, *[g(env) for g in gets], **kw)
        if st.kind == "expr":
            text, names, multi = st.expr
            getters = {n: self.getter(r, "whole" if n in multi else "expr", xp) for n, r in zip(names, st.args)}
            return compile_expr(text, frozenset(names), xp, getters=getters, multi=multi).fn
        if st.kind == "move":
            g = self.getter(st.args[0], "host", np)
            return lambda env: xp.asarray(g(env))
        if st.kind == "edge":
            gets = [self.getter(r, "device", xp) for r in st.args]
            ws = [None if w is None else (w if isinstance(w, float) else self.dev(w)) for w in st.weights]
            mult = st.reduce == "multiply"

            def edge(env):
                v = None
                for g, w in zip(gets, ws):
                    s = g(env) if w is None else g(env) * w
                    v = s if v is None else (v * s if mult else v + s)
                return v
            return edge
        raise AssertionError(st.kind)

    def output(self, r: Ref):
        if r.place == CONST:
            v = r.host_value()
            d = self.dev(np.asarray(v))
            return lambda env: d
        return self.getter(r, "device", np if r.place == HOST else self.xp)


def _probe_shapes(prog: Program):
    """Run the declared input shapes once on the CPU: output shapes, bytes per item."""
    if any(p.shape is None and p.default is None for p in prog.inputs):
        return
    probe = bind(prog.plan, select_backend("cpu"))
    feeds = {}
    batch = 1
    for p in prog.inputs:
        if p.default is not None and (p.shape is None or -1 not in p.shape):
            continue
        shape = tuple(1 if s == -1 else s for s in p.shape)
        feeds[p.name] = np.zeros(shape, p.dtype)
    batched = [p for p in prog.inputs if p.shape is not None and p.shape and p.shape[0] == -1]
    if not batched and prog.inputs and prog.inputs[0].shape:
        batch = max(1, prog.inputs[0].shape[0])
    sizes: list[int] = []
    from .ops import folding
    try:
        with np.errstate(all="ignore"), folding():      # creation ops stay bounded on the probe too
            values = probe.execute(feeds, trace=sizes)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(f"graph {prog.graph_id} fails on its declared input shapes: "
                           f"{type(e).__name__}: {e}") from None
    for o in prog.outputs:
        v = np.asarray(values[o.name])
        shape = tuple(v.shape)
        if batched and shape:
            shape = (-1,) + shape[1:]
        o.shape, o.dtype = shape, str(v.dtype)
    fed = sum(np.asarray(v).nbytes for v in feeds.values())
    prog.bytes_per_item = int((sum(sizes) + fed) / batch)
