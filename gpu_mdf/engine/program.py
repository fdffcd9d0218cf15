"""Compile an MDF graph once into a :class:`Program`, then run batches through it.

Compilation (``compile``) does all the per-graph work once:

* reads the MDF file as plain JSON/YAML (no modelspec, no ``eval``);
* refuses what a batch engine cannot run (cycles, state, conditions) with the
  reason and a pointer to modeci_mdf's ``EvaluableGraph``;
* orders nodes topologically and, inside each node, orders parameters,
  functions and output ports by their dependencies;
* parses every expression with the safe whitelist compiler;
* folds everything that does not depend on the input (constant parameters,
  transposed kernels...) on the host, then moves the constants to the device once.

A run then is a flat list of closures over device arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import Backend, select_backend
from ..data import NORMALIZATIONS, check_finite, normalize
from ..errors import CompileError, DataError, ModelFileError
from . import ops as ops_mod
from .expr import compile_expr

EVALUABLE_GRAPH_HINT = "run it with modeci_mdf.execution_engine.EvaluableGraph instead"


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def load_mdf_dict(source) -> dict:
    """Return the MDF model as a plain dict ``{model_id: {...}}``.

    ``source`` is a path (``.json``, ``.yaml``/``.yml``), a dict, or a
    ``modeci_mdf.mdf.Model``.
    """
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict") and hasattr(source, "graphs"):   # modeci_mdf.mdf.Model
        return source.to_dict()                                   # already {model_id: {...}}
    path = Path(source)
    if not path.exists():
        raise ModelFileError(f"{path}: no such MDF file")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            d = yaml.load(text, Loader=loader)
        else:
            d = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable MDF file ({type(e).__name__}: {e})") from None
    except Exception as e:  # yaml errors
        raise ModelFileError(f"{path}: not a readable MDF file ({type(e).__name__})") from None
    if not isinstance(d, dict) or len(d) != 1 or not isinstance(next(iter(d.values())), dict) \
            or "graphs" not in next(iter(d.values())):
        raise ModelFileError(f"{path}: not an MDF model (expected {{model_id: {{graphs: ...}}}})")
    return d


def _items(d) -> list[tuple[str, dict]]:
    """MDF collections are dicts keyed by id (files) or lists with 'id' (to_dict)."""
    if d is None:
        return []
    if isinstance(d, dict):
        return [(k, v or {}) for k, v in d.items()]
    return [(v["id"], v) for v in d]


# --------------------------------------------------------------------------- #
# Program
# --------------------------------------------------------------------------- #
@dataclass
class PortSpec:
    """A graph input or output: ``name`` is what callers use; shape has -1 for the batch."""

    name: str
    node: str
    port: str
    shape: tuple[int, ...] | None
    dtype: str

    def describe(self) -> str:
        shape = "?" if self.shape is None else "(" + ", ".join("N" if s == -1 else str(s)
                                                             for s in self.shape) + ")"
        return f"{self.name} {shape} {self.dtype}"


@dataclass
class _Node:
    id: str
    consts: dict[str, Any]                                 # device constants
    inputs: list[tuple[str, list[tuple[Any, Any]], str]]  # port, [(source key, weight or None)], reduce
    steps: list[tuple[str, Callable[[dict], Any]]]
    outputs: list[tuple[str, Callable[[dict], Any]]]
    release: list = field(default_factory=list)           # values dead after this node
    inplace: set = field(default_factory=set)             # steps that reuse their input's memory


@dataclass
class Program:
    """A compiled MDF graph bound to a backend. See :func:`compile`."""

    model_id: str
    graph_id: str
    backend: Backend
    dtype: np.dtype
    inputs: list[PortSpec]
    outputs: list[PortSpec]
    normalize: str
    metadata: dict
    _nodes: list[_Node] = field(repr=False, default_factory=list)
    bytes_per_item: int = 0

    @property
    def xp(self):
        return self.backend.xp

    def describe(self) -> str:
        ins = ", ".join(p.describe() for p in self.inputs)
        outs = ", ".join(p.describe() for p in self.outputs)
        return (f"{self.model_id}/{self.graph_id}: {len(self._nodes)} nodes; inputs {ins}; "
                f"outputs {outs}; on {self.backend.describe()}")

    # -- feeding --------------------------------------------------------------- #
    def prepare(self, x, spec: PortSpec | None = None, check: bool = True):
        """Move one input batch to the device, normalising integer pixels there.

        Integer input (uint8 pixels) is cast and normalised on the device with the
        graph's normalisation; float input is taken as already normalised.
        """
        spec = spec or self.inputs[0]
        xp = self.xp
        target = None
        if spec.shape is not None and tuple(x.shape[1:]) != tuple(spec.shape[1:]):
            want = tuple(spec.shape[1:])
            if [d for d in x.shape[1:] if d != 1] != [d for d in want if d != 1]:
                raise DataError(f"input {spec.name}: got shape {tuple(x.shape)}, the model expects "
                                "(N, " + ", ".join(str(d) for d in want) + ")")
            target = (len(x),) + want   # the same pixels, up to size-1 axes (e.g. a channel axis)
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            d = normalize(self.backend.to_device(x), self.normalize, xp, self.dtype)
        elif np.issubdtype(x.dtype, np.floating):
            d = self.backend.to_device(x).astype(self.dtype, copy=False)
            if check:
                check_finite(d, xp, f"input {spec.name}")
        else:
            raise DataError(f"input {spec.name}: unsupported dtype {x.dtype}")
        return d if target is None else d.reshape(target)

    def _feeds(self, batch, check: bool) -> dict[str, Any]:
        if isinstance(batch, dict):
            missing = [p.name for p in self.inputs if p.name not in batch]
            if missing:
                raise DataError(f"missing graph input(s) {missing}; the graph takes "
                                f"{[p.name for p in self.inputs]}")
            return {p.name: self.prepare(batch[p.name], p, check) for p in self.inputs}
        if isinstance(batch, (list, tuple)) and len(self.inputs) > 1:
            if len(batch) != len(self.inputs):
                raise DataError(f"{len(batch)} arrays given for {len(self.inputs)} graph inputs")
            return {p.name: self.prepare(b, p, check) for p, b in zip(self.inputs, batch)}
        if len(self.inputs) != 1:
            raise DataError(f"the graph takes {len(self.inputs)} inputs "
                            f"{[p.name for p in self.inputs]}: pass a dict")
        return {self.inputs[0].name: self.prepare(batch, self.inputs[0], check)}

    # -- running --------------------------------------------------------------- #
    def execute(self, feeds: dict[str, Any], trace: list | None = None) -> dict[str, Any]:
        """Run on device arrays already prepared; returns device arrays by output name.

        ``trace``, when given, collects the size in bytes of every value computed.
        """
        values: dict[Any, Any] = {("", name): v for name, v in feeds.items()}
        for node in self._nodes:
            local = dict(node.consts)
            for port, sources, reduce in node.inputs:
                v = None
                for key, weight in sources:
                    s = values[key] if weight is None else values[key] * weight
                    v = s if v is None else (v * s if reduce == "multiply" else v + s)
                local[port] = v
            for name, fn in node.steps:
                local[name] = fn(local)
                if trace is not None:
                    trace.append(getattr(local[name], "nbytes", 0))
            for port, fn in node.outputs:
                values[(node.id, port)] = fn(local)
            for key in node.release:
                values.pop(key, None)
        return {o.name: values[(o.node, o.port)] for o in self.outputs}

    def run(self, batch, to_host: bool = True, check: bool = True):
        """Run one batch. Returns the output array, or a dict when there are several."""
        with self.backend.use():
            out = self.execute(self._feeds(batch, check))
            if to_host:
                out = {k: self.backend.to_host(v) for k, v in out.items()}
        return next(iter(out.values())) if len(out) == 1 else out

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
def compile(model, device: str | Backend = "auto", dtype: str = "float32",
            normalize: str | None = None, graph: str | None = None,
            inputs: list[str] | None = None) -> Program:
    """Compile an MDF model (path, dict or ``modeci_mdf.mdf.Model``) for batch execution.

    ``normalize`` overrides the pixel normalisation recorded in the graph metadata
    (``l2`` | ``scale`` | ``none``). ``inputs`` names baked parameters (as written by
    modeci_mdf's ``keras_to_mdf``) to expose as graph inputs; such a parameter is
    detected automatically when the graph has no free input port.
    """
    backend = device if isinstance(device, Backend) else select_backend(device)
    d = load_mdf_dict(model)
    model_id, mdict = next(iter(d.items()))
    graphs = _items(mdict.get("graphs"))
    if not graphs:
        raise CompileError(f"model {model_id} has no graph")
    if graph is None and len(graphs) > 1:
        raise CompileError(f"model {model_id} has graphs {[g for g, _ in graphs]}: choose one")
    gid, g = next(((k, v) for k, v in graphs if graph in (None, k)), (None, None))
    if g is None:
        raise CompileError(f"model {model_id} has no graph {graph!r}")
    return _GraphCompiler(model_id, gid, g, backend, np.dtype(dtype), normalize, inputs).build()


class _GraphCompiler:
    def __init__(self, model_id, gid, g, backend, dtype, normalize, inputs):
        self.model_id, self.gid, self.g, self.backend = model_id, gid, g, backend
        self.dtype, self.xp = dtype, backend.xp
        self.meta = (g.get("metadata") or {}).get("gpu_mdf", {})
        self.normalize = normalize or self.meta.get("normalize", "none")
        if self.normalize not in NORMALIZATIONS:
            raise CompileError(f"unknown normalisation {self.normalize!r}; expected {NORMALIZATIONS}")
        self.forced_inputs = list(inputs or [])
        self.nodes = dict(_items(g.get("nodes")))
        self.edges = _items(g.get("edges"))
        self._host_nodes: list[_Node] = []   # NumPy twins of the nodes, for the shape probe
        self._calls: dict[str, tuple] = {}     # this node's op calls: name -> (OpSpec, first input name)
        self._consumers: dict[tuple, int] = {}  # (node, output port) -> number of edges it feeds
        self._owned_out: set[tuple] = set()     # (node, output port) whose value is a private temporary

    # -- graph level ------------------------------------------------------------ #
    def build(self) -> Program:
        self._refuse_dynamics()
        order = self._topo_order()
        incoming: dict[tuple[str, str], list] = {}
        sends: set[tuple[str, str]] = set()
        for eid, e in self.edges:
            for k in ("sender", "receiver", "sender_port", "receiver_port"):
                if not e.get(k):
                    raise CompileError(f"edge {eid} has no {k}")
            if e["sender"] not in self.nodes or e["receiver"] not in self.nodes:
                raise CompileError(f"edge {eid} connects unknown node(s) {e['sender']} -> {e['receiver']}")
            w = (e.get("parameters") or {}).get("weight", 1)
            # None: no multiplication (weight 1); arrays broadcast against the value
            w = np.asarray(w, dtype=self.dtype) if isinstance(w, list) else (None if float(w) == 1.0 else float(w))
            incoming.setdefault((e["receiver"], e["receiver_port"]), []).append(((e["sender"], e["sender_port"]), w))
            sends.add((e["sender"], e["sender_port"]))
            key = (e["sender"], e["sender_port"])
            self._consumers[key] = self._consumers.get(key, 0) + 1

        graph_inputs: list[PortSpec] = []
        baked = self._baked_inputs(incoming)
        compiled = []
        for nid in order:
            compiled.append(self._node(nid, incoming, graph_inputs, baked))
        if not graph_inputs:
            raise CompileError(f"graph {self.gid} has no input: no input port without an incoming "
                               "edge, and no baked input parameter")
        all_ports = [(nid, pid) for nid in order
                     for pid, _ in _items(self.nodes[nid].get("output_ports"))]
        named = self.meta.get("outputs")
        if named:  # the converter records the model's outputs (they may also feed other nodes)
            by_port = {pid: (nid, pid) for nid, pid in all_ports}
            missing = [n for n in named if n not in by_port]
            if missing:
                raise CompileError(f"graph metadata names outputs {missing} that no node has")
            chosen = [by_port[n] for n in named]
        else:      # otherwise: every output port that feeds no edge
            chosen = [key for key in all_ports if key not in sends]
        outputs = [PortSpec(pid, nid, pid, None, str(self.dtype)) for nid, pid in chosen]
        _dedupe_names(outputs)
        _dedupe_names(graph_inputs)
        self._plan_release(compiled, outputs)
        prog = Program(self.model_id, self.gid, self.backend, self.dtype, graph_inputs, outputs,
                       self.normalize, self.meta, compiled)
        self._probe_shapes(prog)
        return prog

    def _refuse_dynamics(self):
        cond = self.g.get("conditions") or {}
        if cond.get("node_specific") or cond.get("termination"):
            raise CompileError(f"graph {self.gid} has scheduling conditions (nodes that may fire "
                               f"more than once); the batch engine runs each node once: "
                               f"{EVALUABLE_GRAPH_HINT}")
        for nid, n in self.nodes.items():
            for pid, p in _items(n.get("parameters")):
                if p.get("time_derivative") is not None or p.get("default_initial_value") is not None \
                        or p.get("conditions"):
                    raise CompileError(f"node {nid} parameter {pid} has state that changes over time; "
                                       f"the batch engine is stateless: {EVALUABLE_GRAPH_HINT}")

    def _topo_order(self) -> list[str]:
        sorter = TopologicalSorter({n: () for n in self.nodes})
        for _, e in self.edges:
            if e.get("receiver") in self.nodes and e.get("sender") in self.nodes:
                sorter.add(e["receiver"], e["sender"])
        try:
            return list(sorter.static_order())
        except CycleError as e:
            raise CompileError(f"graph {self.gid} has a cycle through nodes {e.args[1]}; the batch engine "
                               f"runs acyclic graphs: {EVALUABLE_GRAPH_HINT}") from None

    def _baked_inputs(self, incoming) -> set[tuple[str, str]]:
        """Parameters to expose as graph inputs (modeci_mdf keras_to_mdf's baked batch)."""
        found = set()
        for nid, n in self.nodes.items():
            for pid, _p in _items(n.get("parameters")):
                if pid in self.forced_inputs:
                    found.add((nid, pid))
        unknown = set(self.forced_inputs) - {p for _, p in found}
        if unknown:
            raise CompileError(f"no parameter named {sorted(unknown)} to use as graph input")
        if found:
            return found
        free_ports = any((nid, pid) not in incoming for nid, n in self.nodes.items()
                         for pid, _ in _items(n.get("input_ports")))
        if free_ports:
            return found
        receivers = {r for (r, _) in incoming}
        for nid, n in self.nodes.items():
            if nid in receivers or n.get("input_ports"):
                continue
            outs = {p.get("value") for _, p in _items(n.get("output_ports"))}
            for pid, p in _items(n.get("parameters")):
                v = p.get("value")
                if pid in outs and isinstance(v, list) and np.ndim(v) >= 2:
                    found.add((nid, pid))
        return found

    def _plan_release(self, compiled: list[_Node], outputs: list[PortSpec]):
        last_use: dict = {}
        for i, node in enumerate(compiled):
            for _, sources, _ in node.inputs:
                for key, _ in sources:
                    last_use[key] = i
        keep = {(o.node, o.port) for o in outputs}
        for key, i in last_use.items():
            if key not in keep:
                compiled[i].release.append(key)

    def _probe_shapes(self, prog: Program):
        """Run one item on the CPU to learn output shapes and bytes per item."""
        if any(p.shape is None for p in prog.inputs):
            return
        probe = Program(prog.model_id, prog.graph_id, select_backend("cpu"), prog.dtype,
                        prog.inputs, prog.outputs, prog.normalize, prog.metadata,
                        self._host_nodes, 0)
        feeds = {p.name: np.zeros((1,) + tuple(p.shape[1:]), prog.dtype) for p in prog.inputs}
        sizes: list[int] = []
        try:
            values = probe.execute(feeds, trace=sizes)
        except CompileError:
            raise
        except Exception as e:
            raise CompileError(f"graph {self.gid} fails on its declared input shape: "
                               f"{type(e).__name__}: {e}") from None
        for o in prog.outputs:
            o.shape = (-1,) + tuple(values[o.name].shape[1:])
        # every value a batch creates, as if none were freed early: a safe upper bound
        prog.bytes_per_item = int(sum(sizes) + sum(v.nbytes for v in feeds.values()))

    # -- node level --------------------------------------------------------------- #
    def _node(self, nid, incoming, graph_inputs, baked) -> _Node:
        n = self.nodes[nid]
        for k in n:
            if k not in ("input_ports", "parameters", "functions", "output_ports", "metadata", "id",
                         "notes"):
                raise CompileError(f"node {nid}: unknown field {k!r}")
        ports = []
        defs: dict[str, tuple[set, Callable]] = {}   # name -> (deps, builder)
        consts: dict[str, Any] = {}
        for pid, p in _items(n.get("input_ports")):
            sources = incoming.get((nid, pid))
            if sources is None:
                shape = tuple(p.get("shape") or ()) or None
                if shape is not None:
                    batch_axis = (p.get("metadata") or {}).get("batch_axis", 0)
                    shape = tuple(-1 if i == batch_axis else s for i, s in enumerate(shape))
                graph_inputs.append(PortSpec(pid, nid, pid, shape, p.get("type") or str(self.dtype)))
                sources = [(("", pid), None)]
            reduce = p.get("reduce") or "overwrite"
            if len(sources) > 1 and reduce not in ("add", "multiply"):
                raise CompileError(f"node {nid} input port {pid} receives {len(sources)} edges with "
                                   f"reduce={reduce!r}; the result would depend on edge order")
            ports.append((pid, sources, reduce))
        local_names = {pid for pid, _, _ in ports}
        for pid, p in _items(n.get("parameters")):
            local_names.add(pid)
            if (nid, pid) in baked:   # a baked batch becomes a graph input
                shape = (-1,) + tuple(np.shape(p.get("value"))[1:])
                graph_inputs.append(PortSpec(pid, nid, pid, shape, str(self.dtype)))
                ports.append((pid, [(("", pid), None)], "overwrite"))
        for fid, _ in _items(n.get("functions")):
            local_names.add(fid)
        scope = frozenset(local_names)

        for pid, p in _items(n.get("parameters")):
            if (nid, pid) in baked:
                continue
            if p.get("function"):
                defs[pid] = self._call(nid, pid, p["function"], p.get("args"), scope)
            elif "value" in p and p["value"] is not None:
                v = p["value"]
                if isinstance(v, str):
                    defs[pid] = self._expr(nid, pid, v, scope)
                else:
                    consts[pid] = self._const(nid, pid, v)
            else:
                raise CompileError(f"node {nid} parameter {pid} has neither value nor function")
        for fid, f in _items(n.get("functions")):
            if f.get("function"):
                defs[fid] = self._call(nid, fid, f["function"], f.get("args"), scope)
            elif f.get("value") is not None:
                defs[fid] = self._expr(nid, fid, f["value"], scope, f.get("args"))
            else:
                raise CompileError(f"node {nid} function {fid} has neither function nor value")
        outs = []
        for oid, o in _items(n.get("output_ports")):
            if o.get("value") is None:
                raise CompileError(f"node {nid} output port {oid} has no value")
            deps, make = self._expr(nid, f"output port {oid}", str(o["value"]), scope)
            outs.append((oid, deps, make, str(o["value"]).strip()))

        steps, host_consts = self._order(nid, defs, consts, set(local_names) - set(defs) - set(consts))
        donate = self._donations(nid, steps, defs, outs, self._owned_ports(nid, ports))
        dev_consts = {k: self._to_device(v) for k, v in host_consts.items()}

        def build(xp):
            return [(name, make(xp, inplace=True) if name in donate else make(xp)) for name, make in steps]
        # array edge weights live on the device with everything else
        dev_ports = [(pid, [(key, self._to_device(w)) for key, w in sources], reduce)
                     for pid, sources, reduce in ports]
        node = _Node(nid, dev_consts, dev_ports, build(self.xp),
                     [(oid, make(self.xp)) for oid, _, make, _ in outs], inplace=donate)
        # a host twin for the shape probe
        self._host_nodes.append(_Node(nid, host_consts, ports, build(np),
                                      [(oid, make(np)) for oid, _, make, _ in outs]))
        self._calls = {}
        return node

    def _owned_ports(self, nid, ports) -> set[str]:
        """Input ports whose value is a temporary of the program that only this port
        reads: a single edge from an owned output port that feeds nothing else and is
        not a graph output (or a weighted edge, whose product is new memory)."""
        outputs = set(self.meta.get("outputs") or [])
        owned = set()
        for pid, sources, _ in ports:
            if len(sources) != 1:
                continue
            key, weight = sources[0]
            if key[0] == "":          # a graph input: the caller's array, never ours to overwrite
                continue
            if weight is not None or (key in self._owned_out and self._consumers.get(key) == 1
                               and key[1] not in outputs):
                owned.add(pid)
        return owned

    def _donations(self, nid, steps, defs, outs, owned_inputs) -> set[str]:
        """Steps allowed to overwrite their first input, and (as a side effect) the
        output ports of this node that deliver a private temporary.

        A value is *owned* when it is new memory (a ``fresh`` op's result, an owned
        input port) or a view of an owned value that nothing else reads (``alias``
        ops: reshape, transpose...). An in-place-capable op may reuse an owned value
        that it alone reads.
        """
        runtime = [name for name, _ in steps]
        uses: dict[str, int] = {}
        for name in runtime:
            for d in defs[name][0]:
                uses[d] = uses.get(d, 0) + 1
        for _, deps, _, _ in outs:
            for d in deps:
                uses[d] = uses.get(d, 0) + 1
        owned = {p for p in owned_inputs if uses.get(p) == 1}
        donate = set()
        for name in runtime:   # dependency order
            spec, first = self._calls.get(name, (None, None))
            if spec is None:
                continue
            first_owned = first in owned and uses.get(first) == 1
            if spec.inplace and first_owned:
                donate.add(name)
                owned.add(name)
            elif spec.fresh or (spec.alias and first_owned):
                owned.add(name)
        for oid, _, _, text in outs:
            if text in owned and uses.get(text) == 1:
                self._owned_out.add((nid, oid))
        return donate

    def _order(self, nid, defs, consts, runtime_names):
        """Order definitions by dependency; fold those that only need constants."""
        host_consts = dict(consts)
        known_runtime = set(runtime_names)
        steps = []
        pending = dict(defs)
        while pending:
            progressed = False
            for name, (deps, make) in list(pending.items()):
                if name in deps:
                    raise CompileError(f"node {nid}: {name} depends on itself (state that changes "
                                       f"over time); {EVALUABLE_GRAPH_HINT}")
                if not deps <= (set(host_consts) | known_runtime):
                    continue
                if deps <= set(host_consts):   # constant: fold now, on the host
                    try:
                        host_consts[name] = make(np)(host_consts)
                    except CompileError:
                        raise
                    except Exception as e:
                        raise CompileError(f"node {nid}: computing {name} failed: "
                                           f"{type(e).__name__}: {e}") from None
                else:
                    steps.append((name, make))
                    known_runtime.add(name)
                del pending[name]
                progressed = True
            if not progressed:
                missing = {k: sorted(d - set(host_consts) - known_runtime - set(defs))
                           for k, (d, _) in pending.items()}
                raise CompileError(f"node {nid}: cannot order {sorted(pending)} (circular or "
                                   f"missing names: {missing})")
        return steps, host_consts

    def _to_device(self, v):
        if isinstance(v, np.ndarray):
            return self.xp.asarray(v)
        return v

    def _const(self, nid, pid, v):
        try:
            a = np.asarray(v)
        except Exception:
            raise CompileError(f"node {nid} parameter {pid}: not a numeric value") from None
        if a.dtype == object or a.dtype.kind in "USO":
            raise CompileError(f"node {nid} parameter {pid}: not a numeric value")
        if a.dtype.kind == "f":
            a = a.astype(self.dtype)
        return a

    def _expr(self, nid, what, text, scope, args=None):
        """An expression definition -> (deps, make(xp) -> fn(local))."""
        if args:  # MDF function with value expression and args: args are local names
            scope = frozenset(scope | set(args))
        try:
            probe = compile_expr(text, scope, np)
        except CompileError as e:
            raise CompileError(f"node {nid} {what}: {e}") from None
        deps = set(probe.deps)
        arg_exprs = {}
        if args:
            for k, v in args.items():
                if isinstance(v, str):
                    ae = compile_expr(v, scope - {k}, np)
                    deps |= ae.deps
                    arg_exprs[k] = v
                else:
                    arg_exprs[k] = v
            deps -= set(args)

        def make(xp):
            e = compile_expr(text, scope, xp).fn
            if not arg_exprs:
                return e
            compiled_args = {k: (compile_expr(v, scope - {k}, xp).fn if isinstance(v, str)
                                 else (lambda c: lambda env: c)(np.asarray(v, dtype=self.dtype)))
                             for k, v in arg_exprs.items()}

            def with_args(env):
                local = dict(env)
                for k, f in compiled_args.items():
                    local[k] = f(env)
                return e(local)
            return with_args
        return deps, make

    def _call(self, nid, fid, function, args, scope):
        """An op call definition -> (deps, make(xp) -> fn(local))."""
        if isinstance(function, dict):      # older MDF: {"name": {args}}
            if len(function) != 1:
                raise CompileError(f"node {nid} {fid}: function must name exactly one function")
            fname, fargs = next(iter(function.items()))
            args = {**(fargs or {}), **(args or {})}
        else:
            fname = str(function)
        spec = ops_mod.lookup(fname)
        if spec is None:
            raise CompileError(f"node {nid} {fid}: function {fname!r} is not in the batch engine's "
                               f"table ({len(ops_mod.OPS)} ops, see gpu_mdf.engine.ops); "
                               f"{EVALUABLE_GRAPH_HINT}")
        args = dict(args or {})
        tensor_names = list(spec.inputs) + list(spec.optional)
        inputs: list[tuple[str, Any]] = []
        attrs: dict[str, Any] = {}
        deps: set[str] = set()
        for k, v in args.items():
            is_input = spec.variadic and k not in spec.attrs or k in tensor_names
            if not is_input and k not in spec.attrs:
                raise CompileError(f"node {nid} {fid}: {fname} has no argument {k!r}; it takes "
                                   f"{tensor_names + sorted(spec.attrs)}")
            if isinstance(v, str) and not is_input and isinstance(spec.attrs.get(k), str):
                entry = ("const", v)       # a string attribute (mode, auto_pad...): a literal
            elif isinstance(v, str):
                try:
                    e = compile_expr(v, scope, np)
                except CompileError as err:
                    raise CompileError(f"node {nid} {fid} argument {k}: {err}") from None
                deps |= e.deps
                entry = ("expr", v)
            else:
                entry = ("const", v)
            if is_input:
                inputs.append((k, entry))
            else:
                attrs[k] = entry
        if not spec.variadic:
            missing = [i for i in spec.inputs if i not in dict(inputs)]
            if missing:
                raise CompileError(f"node {nid} {fid}: {fname} needs input(s) {missing}")
            rank = {n: i for i, n in enumerate(tensor_names)}
            inputs.sort(key=lambda kv: rank[kv[0]])
        attr_exprs = {k: v for k, (kind, v) in attrs.items() if kind == "expr"}   # e.g. perm from a parameter
        first = inputs[0][1] if inputs else None
        first_name = first[1].strip() if first and first[0] == "expr" and first[1].strip().isidentifier() else None
        self._calls[fid] = (spec, first_name)
        dtype = self.dtype
        given = dict(inputs)
        # positional order: the op's inputs up to the last one given (missing optionals -> None)
        order = list(given) if spec.variadic else \
            tensor_names[:max([tensor_names.index(n) for n in given] + [-1]) + 1]

        def make(xp, inplace: bool = False):
            def value_of(entry):
                if entry is None:
                    return lambda env: None
                kind, v = entry
                if kind == "expr":
                    return compile_expr(v, scope, xp).fn
                if isinstance(v, (list, tuple, np.ndarray)):
                    a = np.asarray(v)
                    c = xp.asarray(a.astype(dtype) if a.dtype.kind == "f" else a)
                else:
                    c = v
                return lambda env: c
            arg_fns = [value_of(given.get(n)) for n in order]
            kw = {**spec.attrs, **{k: v for k, (kind, v) in attrs.items() if kind == "const"}}
            if inplace:
                kw["inplace"] = True
            kw_fns = {k: compile_expr(v, scope, np).fn for k, v in attr_exprs.items()}
            for k in kw_fns:
                kw.pop(k, None)
            kernel = spec.kernel
            if not kw_fns:
                return lambda env: kernel(xp, *[f(env) for f in arg_fns], **kw)

            def call(env):
                return kernel(xp, *[f(env) for f in arg_fns], **kw, **{k: _host(f(env)) for k, f in kw_fns.items()})
            return call
        return deps, make


def _host(v):
    """Attributes are host values (lists/ints), even when folded on a device."""
    if hasattr(v, "get") and not isinstance(v, dict):
        v = v.get()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _dedupe_names(specs: list[PortSpec]):
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.name] = counts.get(s.name, 0) + 1
    for s in specs:
        if counts[s.name] > 1:
            s.name = f"{s.node}.{s.port}"
