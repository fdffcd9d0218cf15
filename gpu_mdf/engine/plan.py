"""MDF graph -> execution plan, knowing nothing of CuPy.

The planner reads the MDF dict once and produces a flat list of steps
(:mod:`~gpu_mdf.engine.steps`) over keyed values, each with its place: a constant
folded here on the host, a host value computed per batch from shapes, or a device
tensor.

Kernels declare which inputs are static (shapes, axes, pads...): those are handed
over as host values. A static input that a graph computes from device data is
fetched back per batch; the plan records each such place (``Plan.syncs``) and
``Program.describe()`` names them.

MDF semantics follow modeci_mdf's ``EvaluableGraph``: a value that names an id in
scope exactly is a reference (ids such as ``/conv/Conv`` or ``onnx::Add_0`` included);
unfed input ports take their ``default_value`` or zeros of their declared shape;
ONNX attributes may be given as node parameters of the same name; ``op[i]`` picks
output ``i`` of a multi-output op, and a plain reference means its first output.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any

import numpy as np

from ..errors import CompileError
from ..mdf import GraphMeta, items
from . import ops as ops_mod
from .expr import FUNCTION_NAMES, compile_expr, weak
from .ops import OpError, OpSpec, cast_attr, folding
from .ops.standard import STANDARD_FUNCTIONS
from .steps import CONST, DEVICE, HOST, EdgeStep, ExprStep, FusedStep, MoveStep, OpStep, Ref, Step, Val

EVALUABLE_GRAPH_HINT = "run it with modeci_mdf.execution_engine.EvaluableGraph instead"
SMALL = 4096            # host-side shape arithmetic never reads constants larger than this
_NODE_FIELDS = {"input_ports", "parameters", "functions", "output_ports", "metadata", "id", "notes"}


@dataclass
class InputSpec:
    """A graph input: a free (unconnected, unbound) input port id, feeding every port with that id."""

    name: str
    targets: list[tuple[str, str]]
    shape: tuple | None              # declared shape; -1 marks the batch axis
    dtype: str
    default: np.ndarray | None       # value when not fed (None: must be fed)
    batch_axis: int | None
    # a file from another tool whose port says no type (modeci_mdf writes "float" for any
    # port): what is fed keeps its type, as in EvaluableGraph (integers stay integers
    # unless a normalisation is asked for)
    follows_feed: bool = False

    @property
    def node(self):
        return self.targets[0][0]

    @property
    def port(self):
        return self.targets[0][1]

    def describe(self) -> str:
        shape = "?" if self.shape is None else "(" + ", ".join("N" if s == -1 else str(s)
                                                             for s in self.shape) + ")"
        opt = ", optional" if self.default is not None else ""
        return f"{self.name} {shape} {self.dtype}{opt}"


@dataclass
class OutputSpec:
    name: str
    node: str
    port: str
    ref: Ref
    shape: tuple | None = None
    dtype: str = ""

    def describe(self) -> str:
        shape = "?" if self.shape is None else "(" + ", ".join("N" if s == -1 else str(s)
                                                             for s in self.shape) + ")"
        return f"{self.name} {shape} {self.dtype}".rstrip()


@dataclass
class Plan:
    model_id: str
    graph_id: str
    dtype: np.dtype
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    steps: list[Step]
    meta: GraphMeta
    normalize: str
    syncs: list[str] = field(default_factory=list)      # places fetching a device value per batch
    uploads: list[str] = field(default_factory=list)    # places copying a host value to the device per batch
    notes: list[str] = field(default_factory=list)      # what the optimising passes did


@dataclass
class _NodeTexts:
    strings: list[str]                 # every string in the node
    plain_ports: Counter               # value text -> how many output ports name it


# --------------------------------------------------------------------------- #
# Planner
# --------------------------------------------------------------------------- #
_SELECT = re.compile(r"^(.*\S)\s*\[\s*(-?\d+)\s*\]$")
_LIST_OF_NAMES = re.compile(r"^\s*\[.*\]\s*$", re.S)


class Planner:
    def __init__(self, model_id: str, gid: str, g: dict, dtype, constants: dict | None,
                 forced_inputs: list[str] | None, normalize: str, opset: int | None = None):
        self.model_id, self.gid, self.g = model_id, gid, g
        self.nodes = dict(items(g.get("nodes")))
        self.edges = items(g.get("edges"))
        self.meta = GraphMeta.of(g)
        self.opset_declared = bool(opset or self.meta.opset)
        self.opset = int(opset or self.meta.opset or ops_mod.OPSET)
        self.forced = dtype is not None          # dtype= forces every float value to it
        self.dtype = np.dtype(dtype) if dtype is not None else self._auto_dtype()
        self.constants = dict(constants or {})
        self.forced_inputs = list(forced_inputs or [])
        self.normalize = normalize
        self.steps: list[Step] = []
        self.inputs: dict[str, InputSpec] = {}
        self.ports: dict[tuple[str, str], Ref] = {}       # (node, output port) -> value
        self.syncs: list[str] = []
        self.uploads: list[str] = []
        self._n = 0

    # -- helpers --------------------------------------------------------------------- #
    def _auto_dtype(self) -> np.dtype:
        """float32 for ONNX-op graphs and float32 ports; MDF expressions and standard
        functions compute in float64, as modeci_mdf's EvaluableGraph does."""
        if self.meta.recorded:
            return np.dtype(np.float32)
        for _, n in self.nodes.items():
            if not isinstance(n, dict):
                continue
            for coll in ("parameters", "functions"):
                for _, f in items(n.get(coll)):
                    fn = f.get("function") if isinstance(f, dict) else None
                    name = next(iter(fn)) if isinstance(fn, dict) and fn else fn
                    if isinstance(name, str) and name.startswith("onnx:"):
                        return np.dtype(np.float32)
            for _, p in items(n.get("input_ports")):
                # "float32"/"tensor(float)" name float32; a bare "float" is ambiguous (Python's float
                # is float64, modeci_mdf writes "float" for any float port) and does not decide
                if isinstance(p, dict) and str(p.get("type") or "") in ("float32", "tensor(float)"):
                    return np.dtype(np.float32)
        return np.dtype(np.float64)

    def _port_dtype(self, typ) -> np.dtype:
        """A graph input's type: as declared; a float type the program's float type when
        ``dtype=`` forces one, or when the declaration only says "float"."""
        d = _declared_dtype(typ)
        if d is None or (self.forced and d.kind == "f"):
            return self.dtype
        return d

    def _key(self, nid, name):
        self._n += 1
        return (nid, name, self._n)

    def _const(self, value, what: str, allow_str: bool = False, dtype=None, typed: bool = False):
        """A constant as a host array: ``dtype`` when one is declared; the array's own type
        when it is ``typed`` (a caller's array, a value computed from typed ones); else a
        literal of the file, whose floats take the program's float type. Returns (array,
        the elements it holds)."""
        if isinstance(value, str):
            if allow_str:
                return value, 0
            raise CompileError(f"{what}: {value!r} is not a number")
        held = _check_literal(value, what) if isinstance(value, (list, tuple)) else None
        try:
            # a copy: a constant is what it holds at compile, whatever its caller does with it later
            a = np.array(value) if dtype is None else np.array(value, dtype=dtype)
        except Exception:
            raise CompileError(f"{what}: not a numeric value" + (f" of type {dtype}" if dtype else "")) from None
        if a.dtype == object or a.dtype.kind in "USVO":
            raise CompileError(f"{what}: not a numeric value")
        if a.dtype.kind == "f" and (self.forced or (dtype is None and not typed)):
            a = a.astype(self.dtype)
        return a, (a.size if held is None else held)

    def _const_val(self, value, what, nid, name, allow_str=False, dtype=None, typed=False) -> Val:
        a, held = self._const(value, what, allow_str, dtype, typed)
        return Val(self._key(nid, name), CONST, a, what=what, basis=held)

    # -- graph ----------------------------------------------------------------------- #
    def build(self) -> Plan:
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
            incoming.setdefault((e["receiver"], e["receiver_port"]), []).append(
                ((e["sender"], e["sender_port"]), w, eid))
            sends.add((e["sender"], e["sender_port"]))
        self._check_constants(incoming)
        for nid in order:
            self._node(nid, incoming)
        outputs = self._outputs(order, sends)
        return Plan(self.model_id, self.gid, self.dtype, list(self.inputs.values()), outputs, self.steps,
                    self.meta, self.normalize, self.syncs, self.uploads)

    def _refuse_dynamics(self):
        cond = self.g.get("conditions") or {}
        if cond.get("node_specific") or cond.get("termination"):
            raise CompileError(f"graph {self.gid} has scheduling conditions (nodes that may fire "
                               f"more than once); the batch engine runs each node once: {EVALUABLE_GRAPH_HINT}")
        for nid, n in self.nodes.items():
            if not isinstance(n, dict):
                raise CompileError(f"node {nid} is not a mapping")
            unknown = set(n) - _NODE_FIELDS
            if unknown:
                raise CompileError(f"node {nid}: unknown field(s) {sorted(unknown)}")
            for pid, p in items(n.get("parameters")):
                if isinstance(p, dict) and (p.get("time_derivative") is not None
                                            or p.get("default_initial_value") is not None or p.get("conditions")):
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

    def _check_constants(self, incoming):
        free = {(nid, pid) for nid, n in self.nodes.items() for pid, _ in items(n.get("input_ports"))
                if (nid, pid) not in incoming}
        connected = {k for k in incoming}
        for key in self.constants:
            hits = self._ports_for(key, free)
            if not hits:
                if self._ports_for(key, connected):
                    raise CompileError(f"constants: port {key!r} receives an edge; only unconnected input "
                                       f"ports can be bound")
                names = sorted({p for _, p in free})
                raise CompileError(f"constants: no unconnected input port {key!r}; the free ports are "
                                   f"{names[:20]}{' ...' if len(names) > 20 else ''}")

    @staticmethod
    def _ports_for(key: str, ports) -> list:
        if key in {p for _, p in ports}:
            return [(n, p) for n, p in ports if p == key]
        return [(n, p) for n, p in ports if f"{n}.{p}" == key]

    def _bound(self, nid, pid):
        for k in (f"{nid}.{pid}", pid):
            if k in self.constants:
                return k
        return None

    def _outputs(self, order, sends) -> list[OutputSpec]:
        all_ports = [(nid, pid) for nid in order for pid, _ in items(self.nodes[nid].get("output_ports"))]
        named = self.meta.outputs
        if named:  # the converter records the model's outputs (they may also feed other nodes)
            by_port = {pid: (nid, pid) for nid, pid in all_ports}
            missing = [n for n in named if n not in by_port]
            if missing:
                raise CompileError(f"graph metadata names outputs {missing} that no node has")
            chosen = [by_port[n] for n in named]
        else:      # otherwise: every output port that feeds no edge
            chosen = [key for key in all_ports if key not in sends]
        if not chosen:
            raise CompileError(f"graph {self.gid} has no output port")
        counts: dict[str, int] = {}
        for _, pid in chosen:
            counts[pid] = counts.get(pid, 0) + 1
        return [OutputSpec(pid if counts[pid] == 1 else f"{nid}.{pid}", nid, pid, self.ports[(nid, pid)])
                for nid, pid in chosen]

    # -- node ------------------------------------------------------------------------ #
    def _node(self, nid, incoming):
        n = self.nodes[nid]
        scope: dict[str, Ref] = {}
        for pid, p in items(n.get("input_ports")):
            scope[pid] = self._input_port(nid, pid, p if isinstance(p, dict) else {}, incoming.get((nid, pid)))

        defs: dict[str, tuple[str, Any]] = {}      # name -> (kind, spec)
        for pid, p in items(n.get("parameters")):
            if pid in scope:
                raise CompileError(f"node {nid}: parameter {pid} has the id of an input port")
            if not isinstance(p, dict):              # MDF v0.1-0.3: {"slope": 2.1}
                p = {"value": p}
            if pid in self.forced_inputs:
                scope[pid] = self._forced_input(nid, pid, p)
            elif p.get("function") is not None:
                defs[pid] = ("call", (p["function"], p.get("args")))
            elif p.get("value") is not None:
                defs[pid] = ("value", (p["value"], p.get("metadata") or {}))
            else:
                raise CompileError(f"node {nid} parameter {pid} has neither value nor function")
        for fid, f in items(n.get("functions")):
            if fid in scope or fid in defs:
                raise CompileError(f"node {nid}: function {fid} has the id of another value")
            if f.get("function") is not None:
                defs[fid] = ("call", (f["function"], f.get("args")))
            elif f.get("value") is not None:
                defs[fid] = ("func_value", (f["value"], f.get("args")))
            else:
                raise CompileError(f"node {nid} function {fid} has neither function nor value")
        texts = self._texts(n)
        names = set(scope) | set(defs)
        pending = dict(defs)
        deps = {name: self._deps(nid, name, kind, spec, names) for name, (kind, spec) in defs.items()}
        while pending:
            progressed = False
            for name in list(pending):
                if name in deps[name]:
                    raise CompileError(f"node {nid}: {name} depends on itself (state that changes "
                                       f"over time); {EVALUABLE_GRAPH_HINT}")
                if not deps[name] <= set(scope):
                    continue
                kind, spec = pending.pop(name)
                scope[name] = self._define(nid, name, kind, spec, scope, texts)
                progressed = True
            if not progressed:
                missing = {k: sorted(deps[k] - set(scope)) for k in pending}
                raise CompileError(f"node {nid}: cannot order {sorted(pending)} (circular or missing "
                                   f"names: {missing})")
        taken: Counter = Counter()        # plain port references to each multi-output value so far
        for oid, o in items(n.get("output_ports")):
            value = o.get("value") if isinstance(o, dict) else o
            if value is None:
                raise CompileError(f"node {nid} output port {oid} has no value")
            t = value.strip() if isinstance(value, str) else None
            ref = scope.get(t) if t is not None else None
            if ref is not None and ref.val.multi and ref.index is None and texts.plain_ports[t] > 1:
                self.ports[(nid, oid)] = Ref(ref.val, taken[t])     # the i-th port naming it: output i
                taken[t] += 1
            else:
                self.ports[(nid, oid)] = self._resolve_text(nid, f"output port {oid}", value, scope)

    @staticmethod
    def _texts(n) -> _NodeTexts:
        """Every string in the node and how many output ports name each value plainly (to
        find which outputs of a multi-output op are read)."""
        out = []
        seen: set[int] = set()     # a list or mapping YAML aliases many times is read once

        def walk(v):
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, (dict, list)) and id(v) not in seen:
                seen.add(id(v))
                if isinstance(v, dict):
                    for x in v.values():
                        walk(x)
                elif not (v and isinstance(v[0], (int, float))):    # a row of numbers holds no names
                    for x in v:
                        walk(x)
        walk({k: v for k, v in n.items() if k != "metadata"})
        plain = Counter(o["value"].strip() for _, o in items(n.get("output_ports"))
                        if isinstance(o, dict) and isinstance(o.get("value"), str))
        return _NodeTexts(out, plain)

    # dependencies of a definition: the names in scope it reads --------------------------- #
    def _deps(self, nid, name, kind, spec, names) -> set[str]:
        if kind == "value":
            return self._text_deps(nid, name, spec[0], names) if isinstance(spec[0], str) else set()
        if kind == "func_value":
            text, args = spec
            args = args or {}
            d = set()
            for k, v in args.items():
                d |= self._text_deps(nid, name, v, names - {k}) if isinstance(v, str) else set()
            return d | (self._text_deps(nid, name, text, names | set(args)) - set(args))
        fname, args = self._function(nid, name, spec)
        d = set()
        for v in (args or {}).values():
            if isinstance(v, str):
                d |= self._text_deps(nid, name, v, names)
        op = ops_mod.lookup(fname)
        if op is not None:   # attributes and (standard functions) inputs found by name in the node
            implicit = set(op.attrs) | (set(op.tensor_names) if op.name in STANDARD_FUNCTIONS else set())
            d |= {a for a in implicit - set(args or {}) if a in names and a != name}
        return d

    def _text_deps(self, nid, name, text, names) -> set[str]:
        t = text.strip()
        if t in names:
            return {t}
        m = _SELECT.match(t)
        if m and m.group(1) in names:
            return {m.group(1)}
        lst = self._name_list(t, names)
        if lst is not None:
            return set(lst)
        try:
            return set(compile_expr(t, names, np).deps)
        except CompileError:
            return set()     # a bare word (string attribute) or an error reported when defined

    @staticmethod
    def _name_list(text, names) -> list[str] | None:
        """``"['_59', '_61']"``: variadic inputs written as a list of names (modeci_mdf's PyTorch exporter)."""
        if not _LIST_OF_NAMES.match(text):
            return None
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(tree, (ast.List, ast.Tuple)):
            return None
        out = []
        for e in tree.elts:
            if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in names:
                out.append(e.value)
            elif isinstance(e, ast.Name) and e.id in names:
                out.append(e.id)
            else:
                return None
        return out

    @staticmethod
    def _function(nid, name, spec):
        function, args = spec
        if isinstance(function, dict):      # older MDF: {"name": {args}}
            if len(function) != 1:
                raise CompileError(f"node {nid} {name}: function must name exactly one function")
            fname, fargs = next(iter(function.items()))
            return str(fname), {**(fargs or {}), **(args or {})}
        return str(function), dict(args or {})

    # definitions ---------------------------------------------------------------------- #
    def _define(self, nid, name, kind, spec, scope, texts) -> Ref:
        what = f"node {nid} {name}"
        if kind == "value":
            value, meta = spec
            if isinstance(value, bytes):      # onnx_to_mdf writes string attributes as bytes
                value = value.decode(errors="replace")
            if isinstance(value, str):
                return self._resolve_text(nid, name, value, scope, allow_word=True)
            val = self._const_val(value, what, nid, name, dtype=_declared_dtype(meta.get("dtype"), what))
            if meta.get("shape") is not None and val.const.size == 0:
                val.const = val.const.reshape([int(d) for d in meta["shape"]])
            return Ref(val)
        if kind == "func_value":
            text, args = spec
            return self._expression(nid, name, text, scope, args or {})
        fname, args = self._function(nid, name, spec)
        return self._call(nid, name, fname, args, scope, texts)

    def _resolve_text(self, nid, name, text, scope, allow_word=False) -> Ref:
        """A string value: an exact reference, ``ref[i]``, a bare word, or an expression."""
        if not isinstance(text, str):
            return Ref(self._const_val(text, f"node {nid} {name}", nid, name))
        t = text.strip()
        if t in scope:
            return scope[t]
        m = _SELECT.match(t)
        if m and m.group(1) in scope and scope[m.group(1)].val.multi and scope[m.group(1)].index is None:
            ref = scope[m.group(1)]
            i = int(m.group(2))
            if not -ref.val.multi <= i < ref.val.multi:
                raise CompileError(f"node {nid} {name}: {t} selects output {i} of {m.group(1)}, which has "
                                   f"{ref.val.multi}")
            return Ref(ref.val, i % ref.val.multi)
        if allow_word and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) and t not in FUNCTION_NAMES \
                and t not in ("pi", "e", "inf"):
            # a bare word such as "constant" (a string attribute written as a parameter)
            return Ref(Val(self._key(nid, name), CONST, t, what=f"node {nid} {name}"))
        return self._expression(nid, name, t, scope, {})

    def _expression(self, nid, name, text, scope, args: dict) -> Ref:
        what = f"node {nid} {name}"
        local = dict(scope)
        for k, v in args.items():          # an MDF function's own arguments
            inner = {n: r for n, r in scope.items() if n != k}
            local[k] = self._resolve_text(nid, f"{name} argument {k}", v, inner) if isinstance(v, str) \
                else Ref(self._const_val(v, f"{what} argument {k}", nid, f"{name}.{k}"))
        multi = {n for n, r in local.items() if r.val.multi and r.index is None}
        try:
            e = compile_expr(text, frozenset(local), np, multi=multi)
        except CompileError as err:
            raise CompileError(f"{what}: {err}") from None
        refs = {n: local[n] for n in e.deps}
        for n, r in refs.items():
            if r.place == CONST and isinstance(r.host_value(), str):
                raise CompileError(f"{what}: {n} is the string {r.host_value()!r}, not a number")
        places = {r.place for r in refs.values()}
        if places <= {CONST}:
            env = {n: (r.val.const if r.index is None else r.host_value()) for n, r in refs.items()}
            basis = sum(r.val.basis for r in refs.values())
            try:
                with folding(ops_mod.growth_budget(basis)), np.errstate(all="ignore"):
                    v = e.fn(env)
            except (CompileError, OpError) as err:
                raise CompileError(f"{what}: {err}") from None
            except Exception as err:
                raise CompileError(f"{what}: computing {text!r} failed: {type(err).__name__}: {err}") from None
            val = self._const_val(self._folded(v, what, basis), what, nid, name)
            val.basis = basis
            return Ref(val)
        place = HOST if places <= {CONST, HOST} and self._small(refs.values()) else DEVICE
        key = self._key(nid, name)
        names = tuple(refs)
        arg_refs = [self._move(nid, n, r) if place == DEVICE and r.place == HOST else r for n, r in refs.items()]
        self.steps.append(ExprStep(key, place, arg_refs, what, text=text, names=names,
                                   multi=frozenset(n for n in multi if n in refs)))
        return Ref(Val(key, place, what=what))

    @staticmethod
    def _folded(v, what, basis: int):
        """A value computed at compile time, refused when it grew past its budget."""
        if isinstance(v, (list, tuple)):
            try:
                v = np.asarray(v)
            except Exception:
                raise CompileError(f"{what}: a list of unequal parts") from None
        a = np.asarray(v)
        if a.size > ops_mod.growth_budget(basis):
            raise CompileError(f"{what}: a constant of {a.size:,} elements computed from {basis:,} exceeds the "
                               f"compile-time limit of {ops_mod.growth_budget(basis):,}")
        return a

    @staticmethod
    def _shaped_float_data(ordered, static) -> bool:
        """Float constant data given a per-batch shape through static inputs only
        (``Expand(table, Shape(x))``): model data for the device, not shape arithmetic, so
        computed there from the constant moved once instead of copied up on every batch."""
        static = static or (False,) * len(ordered)
        data = [r for r, s in zip(ordered, static) if r is not None and not s]
        return (bool(data) and all(r.place == CONST for r in data)
                and any(np.asarray(r.host_value()).dtype.kind == "f" for r in data)
                and any(r is not None and s and r.place != CONST for r, s in zip(ordered, static)))

    @staticmethod
    def _small(refs) -> bool:
        return all(r.place != CONST or np.size(r.host_value()) <= SMALL for r in refs)

    def _move(self, nid, name, ref: Ref) -> Ref:
        """A per-batch host value needed on the device: one small copy per batch."""
        key = self._key(nid, f"{name}@device")
        what = f"node {nid} {name}"
        self.steps.append(MoveStep(key, DEVICE, [ref], what))
        self.uploads.append(what)
        return Ref(Val(key, DEVICE, what=what))

    # op calls --------------------------------------------------------------------------- #
    def _call(self, nid, name, fname, args, scope, texts) -> Ref:
        what = f"node {nid} {name} ({fname})"
        try:
            spec = ops_mod.lookup(fname, self.opset, self.opset_declared)
        except OpError as err:
            raise CompileError(f"{what}: {err}") from None
        if spec is None:
            raise CompileError(f"node {nid} {name}: function {fname!r} is not in the batch engine's "
                               f"table ({len(ops_mod.OPS)} ops, see gpu_mdf.engine.ops); {EVALUABLE_GRAPH_HINT}")
        tensor_names = spec.tensor_names
        standard = spec.name in STANDARD_FUNCTIONS
        inputs: dict[str, Ref] = {}
        variadic: list[Ref] = []
        attrs: dict[str, Any] = {}
        for k, v in args.items():
            if k in tensor_names and not spec.variadic:
                # (a name that is both an input and an old-opset attribute arrives as an input)
                inputs[k] = self._arg_ref(nid, name, k, v, scope, what)
            elif k in spec.attrs:
                attrs[k] = self._attr_value(nid, name, spec, k, v, scope, what)
            elif spec.variadic:
                lst = self._name_list(v, set(scope)) if isinstance(v, str) else None
                if lst is not None:
                    variadic += [scope[x] for x in lst]
                else:
                    variadic.append(self._arg_ref(nid, name, k, v, scope, what))
            else:
                raise CompileError(f"{what}: no argument {k!r}; it takes inputs {list(tensor_names)}"
                                   + (f" and attributes {sorted(spec.attrs)}" if spec.attrs else ""))
        # ONNX attributes given as node parameters (as modeci_mdf's importers write them)
        for a in spec.attrs:
            if a not in attrs and a not in inputs and a in scope and a != name:
                if a in tensor_names:
                    inputs[a] = scope[a]
                else:
                    attrs[a] = self._attr_value(nid, name, spec, a, a, scope, what)
        if standard:                  # standard-function arguments found by name in the node
            for a in tensor_names:
                if a not in inputs and a in scope and a != name:
                    inputs[a] = scope[a]
        if spec.variadic:
            ordered = variadic
            if not ordered:
                raise CompileError(f"{what}: no inputs")
            static = (False,) * len(ordered)
        else:
            missing = [i for i in spec.inputs if i not in inputs]
            if missing:
                raise CompileError(f"{what}: needs input(s) {missing}")
            last = max([tensor_names.index(k) for k in inputs] + [-1])
            ordered = [inputs.get(t) for t in tensor_names[:last + 1]]
            static = tuple(t in spec.static for t in tensor_names[:last + 1])
        full_attrs = {a: spec.attrs[a].default for a in spec.attrs}
        full_attrs.update(attrs)
        if spec.check:
            try:
                spec.check(full_attrs)
            except OpError as err:
                raise CompileError(f"{what}: {err}") from None
        for r in ordered:
            if r is not None and r.place == CONST and isinstance(r.host_value(), str):
                raise CompileError(f"{what}: an input is the string {r.host_value()!r}, not a tensor")
        if standard:   # standard functions are float arithmetic: integer constants take the float type
            ordered = [r if r is None or r.place != CONST or np.asarray(r.host_value()).dtype.kind == "f"
                       else Ref(self._const_val(np.asarray(r.host_value()).astype(self.dtype), what, nid, name))
                       for r in ordered]
        n_out = self._outputs_read(spec, name, texts, what) if spec.multi else 0
        return self._place_call(nid, name, what, spec, ordered, static, full_attrs, n_out)

    @staticmethod
    def _outputs_read(spec: OpSpec, name: str, texts: _NodeTexts, what: str) -> int:
        """How many outputs of a multi-output op the node reads: ``name[i]`` anywhere in it,
        and N output ports naming ``name`` plainly (onnx_to_mdf's form: the i-th port is
        output i)."""
        pat = re.compile(r"(?<![\w/:.])" + re.escape(name) + r"\s*\[\s*(\d+)\s*\]")
        hi = 0
        for t in texts.strings:
            for m in pat.finditer(t):
                hi = max(hi, int(m.group(1)) + 1)
        plain = texts.plain_ports.get(name, 0)
        if plain > 1:
            if not spec.variadic_outputs and plain > len(spec.outputs):
                raise CompileError(f"{what}: {plain} output ports name it, but the op has {len(spec.outputs)} "
                                   f"outputs {list(spec.outputs)}; which port is which is ambiguous")
            hi = max(hi, plain)
        if not spec.variadic_outputs and hi > len(spec.outputs):
            raise CompileError(f"{what}: output {hi - 1} is read, but the op has outputs {list(spec.outputs)}")
        return max(hi, 1)

    def _arg_ref(self, nid, name, k, v, scope, what) -> Ref:
        if isinstance(v, str):
            return self._resolve_text(nid, f"{name} argument {k}", v, scope)
        if v is None:
            raise CompileError(f"{what}: argument {k} is empty")
        return Ref(self._const_val(v, f"{what} argument {k}", nid, f"{name}.{k}"))

    def _attr_value(self, nid, name, spec, k, v, scope, what):
        """An attribute: a literal, or a name/expression that folds to a constant."""
        if isinstance(v, str):
            t = v.strip()
            if t in scope:
                ref = scope[t]
            elif spec.attrs[k].type == "STRING":
                ref = None
                value = t
            else:
                ref = self._resolve_text(nid, f"{name} attribute {k}", t, scope)
            if ref is not None:
                if ref.place != CONST:
                    raise CompileError(f"{what}: attribute {k} ({v!r}) depends on the input; attributes "
                                       f"must be constants")
                value = ref.host_value()
        else:
            value = v
        try:
            return cast_attr(spec, k, value)
        except OpError as err:
            raise CompileError(f"{what}: {err}") from None

    def _place_call(self, nid, name, what, spec, ordered, static, attrs, n_out) -> Ref:
        refs = [r for r in ordered if r is not None]
        places = {r.place for r in refs}
        multi = n_out if spec.multi else 0
        kwargs = dict(attrs)
        if spec.multi:
            kwargs["n_outputs"] = n_out
        if places <= {CONST}:
            args = [None if r is None else r.host_value() for r in ordered]
            basis = sum(r.val.basis for r in refs)
            budget = ops_mod.growth_budget(basis)
            estimate = _output_size(spec, args, attrs)
            if estimate is not None and estimate > budget:
                raise CompileError(f"{what}: its result ({estimate:,} elements, computed from {basis:,}) exceeds the "
                                   f"compile-time limit of {budget:,} elements")
            try:
                with folding(budget), np.errstate(all="ignore"):
                    v = spec.kernel(np, *args, **kwargs)
            except (OpError, CompileError) as err:
                raise CompileError(f"{what}: {err}") from None
            except Exception as err:
                raise CompileError(f"{what}: computing it failed: {type(err).__name__}: {err}") from None
            v = tuple(self._folded(x, what, basis) for x in v) if multi else self._folded(v, what, basis)
            return Ref(Val(self._key(nid, name), CONST, v, multi=multi, what=what, basis=basis))
        if spec.shape_only or (places <= {CONST, HOST} and self._small(refs)
                               and not self._shaped_float_data(ordered, static)):
            place = HOST
        else:
            place = DEVICE
        args = []
        for r, is_static in zip(ordered, static or (False,) * len(ordered)):
            if r is not None and place == DEVICE and r.place == HOST and not is_static and not spec.shape_only:
                r = self._move(nid, name, r)
            if r is not None and is_static and r.place == DEVICE:
                self.syncs.append(f"{what}: a static input computed on the device")
            args.append(r)
        key = self._key(nid, name)
        self.steps.append(OpStep(key, place, args, what, spec=spec, attrs=kwargs, n_outputs=n_out,
                                 static=tuple(static)))
        return Ref(Val(key, place, multi=multi, what=what))

    # ports -------------------------------------------------------------------------------- #
    def _input_port(self, nid, pid, p, sources) -> Ref:
        what = f"node {nid} input port {pid}"
        if sources is None:
            bound = self._bound(nid, pid)
            if bound is not None:        # the caller's array: its own type, unless the port declares one
                return Ref(self._const_val(self.constants[bound], f"constant for {what}", nid, pid,
                                           dtype=_declared_dtype(p.get("type")), typed=True))
            return self._graph_input(nid, pid, p)
        reduce = p.get("reduce") or "overwrite"
        if len(sources) > 1 and reduce not in ("add", "multiply"):
            raise CompileError(f"{what} receives {len(sources)} edges with reduce={reduce!r}; the result "
                               f"would depend on edge order")
        refs, weights = [], []
        for (sender, sport), w, eid in sources:
            if (sender, sport) not in self.ports:
                raise CompileError(f"edge {eid}: node {sender} has no output port {sport}")
            refs.append(self.ports[(sender, sport)])
            if isinstance(w, str):
                raise CompileError(f"edge {eid}: weight {w!r} must be a number or an array")
            wa, _ = self._const(w, f"edge {eid} weight")
            weights.append(None if wa.ndim == 0 and float(wa) == 1.0 else
                           (float(wa) if wa.ndim == 0 else wa.astype(self.dtype)))
        if len(refs) == 1 and weights[0] is None:
            return refs[0]
        if all(r.place == CONST for r in refs):
            total = None
            for r, w in zip(refs, weights):
                v = r.host_value() if w is None else operator.mul(*weak(r.host_value(), w))
                total = v if total is None else (total * v if reduce == "multiply" else total + v)
            basis = sum(r.val.basis for r in refs)
            return Ref(self._const_val(self._folded(total, what, basis), what, nid, pid))
        key = self._key(nid, pid)
        refs = [self._move(nid, pid, r) if r.place == HOST else r for r in refs]
        self.steps.append(EdgeStep(key, DEVICE, refs, what, weights=weights,
                                   reduce="multiply" if reduce == "multiply" else "add"))
        return Ref(Val(key, DEVICE, what=what))

    def _graph_input(self, nid, pid, p) -> Ref:
        shape = _shape(p.get("shape"), f"node {nid} input port {pid}")
        batch_axis = (p.get("metadata") or {}).get("batch_axis")
        if shape is not None and batch_axis is None:
            sym = [i for i, s in enumerate(shape) if s is None]
            batch_axis = sym[0] if sym else None
        dtype = self._port_dtype(p.get("type"))
        default = None
        if p.get("default_value") is not None:
            dv = p["default_value"]
            if isinstance(dv, str):
                try:
                    dv = compile_expr(dv, frozenset(), np).fn({})
                except CompileError as e:
                    raise CompileError(f"node {nid} input port {pid} default_value: {e}") from None
            default = self._const(dv, f"node {nid} input port {pid} default_value")[0].astype(dtype)
        elif shape is not None and all(s is not None for s in shape):
            default = np.zeros(shape, dtype)          # as EvaluableGraph: zeros of the declared shape
        spec_shape = None if shape is None else tuple(-1 if (i == batch_axis or s is None) else s
                                                      for i, s in enumerate(shape))
        spec = self.inputs.get(pid)
        if spec is None:
            follows = _declared_dtype(p.get("type")) is None and not self.meta.recorded and not self.forced
            spec = self.inputs[pid] = InputSpec(pid, [], spec_shape, str(dtype), default, batch_axis, follows)
        spec.targets.append((nid, pid))
        return Ref(self._input_val(pid))

    def _input_val(self, name) -> Val:
        if not hasattr(self, "_input_vals"):
            self._input_vals = {}
        v = self._input_vals.get(name)
        if v is None:
            v = self._input_vals[name] = Val(("input", name), DEVICE, what=f"graph input {name}")
        return v

    def _forced_input(self, nid, pid, p) -> Ref:
        """A parameter fed by the caller (modeci_mdf keras_to_mdf bakes the batch in one)."""
        v = p.get("value")
        if v is None or isinstance(v, str):
            raise CompileError(f"node {nid} parameter {pid} has no array value to use as an input")
        shape = (-1,) + tuple(np.shape(v)[1:])
        self.inputs[pid] = InputSpec(pid, [(nid, pid)], shape, str(self.dtype), None, 0)
        return Ref(self._input_val(pid))


def _shape(s, what) -> tuple | None:
    """A declared port shape: ints, with None for symbolic dims ("N", "batch", -1)."""
    if s is None:
        return None
    if isinstance(s, str):                      # MDF v0.1: "(1,)"
        try:
            s = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            raise CompileError(f"{what}: unreadable shape {s!r}") from None
    if isinstance(s, int):
        s = (s,)
    try:
        return tuple(None if (isinstance(d, str) or d is None or int(d) < 0) else int(d) for d in s)
    except (TypeError, ValueError):
        raise CompileError(f"{what}: unreadable shape {s!r}") from None


# declared types: numpy names (and torch's, and a few aliases); ONNX's "tensor(float)"
# spelling means float32. A bare "float" is ambiguous (Python's float is float64, and
# modeci_mdf writes "float" for any float port): it takes the program's float type.
_TYPE_NAMES = {"float32": np.float32, "float64": np.float64, "double": np.float64, "float16": np.float16,
               "half": np.float16, "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
               "int": np.int64, "long": np.int64, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
               "uint64": np.uint64, "bool": np.bool_}
_ONNX_TYPE_NAMES = {**_TYPE_NAMES, "float": np.float32}


def _declared_dtype(typ, what: str | None = None) -> np.dtype | None:
    """The dtype a port type or a parameter's ``metadata.dtype`` names; None when it names
    none or only "float". With ``what`` (a parameter's dtype), an unknown name is refused."""
    if typ is None:
        return None
    t = str(typ).strip().lower()
    if t.startswith("tensor(") and t.endswith(")"):
        d = _ONNX_TYPE_NAMES.get(t[7:-1])
    else:
        d = _TYPE_NAMES.get(t.removeprefix("torch.").removeprefix("numpy."))
    if d is None and what is not None:
        raise CompileError(f"{what}: type {typ!r} is not one the engine computes in ({', '.join(_TYPE_NAMES)})")
    return None if d is None else np.dtype(d)


# ops whose result broadcasts its inputs' shapes: its size is known before it is computed
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Greater", "Less", "GreaterOrEqual",
                 "LessOrEqual", "And", "Or", "Xor", "Where", "Max", "Min", "Sum", "Mean", "PRelu"}


def _output_size(spec: OpSpec, args: list, attrs: dict) -> int | None:
    """The elements an op's result will have, where that is cheap to know beforehand (ops
    that may grow a value: broadcasting, products); None otherwise (shape-creating
    kernels check their sizes themselves)."""
    op_type = spec.name.split("::")[-1]
    shapes = [np.shape(a) for a in args if a is not None]
    try:
        if op_type in _BROADCASTING:
            return int(np.prod(np.broadcast_shapes(*shapes), dtype=np.int64))
        if op_type in ("MatMul", "Gemm") and len(shapes) >= 2 and all(len(s) >= 2 for s in shapes[:2]):
            a, b = shapes[0], shapes[1]
            m = a[-1] if attrs.get("transA") else a[-2]
            n = b[-2] if attrs.get("transB") else b[-1]
            return int(np.prod(np.broadcast_shapes(a[:-2], b[:-2]), dtype=np.int64)) * int(m) * int(n)
    except ValueError:
        return None
    return None


def plan_inplace(steps: list[Step], outputs: list[OutputSpec]) -> None:
    """Mark the op steps that may overwrite their first input.

    A value is *owned* when it is new memory of the program (a ``fresh`` op's result,
    a weighted or reduced edge, a host value moved to the device) or a view of an owned
    value that nothing else reads (``alias`` ops: reshape, transpose...). An in-place
    capable op may reuse an owned value that it alone reads. Graph inputs (the caller's
    arrays), constants, graph outputs and multi-output tuples are never owned.
    """
    uses: dict = {}
    for st in steps:
        for r in st.args:
            if r is not None:
                uses[r.val.key] = uses.get(r.val.key, 0) + 1
    for o in outputs:
        uses[o.ref.val.key] = uses.get(o.ref.val.key, 0) + 1
    owned: set = set()
    for st in steps:
        if st.place != DEVICE:
            continue
        if st.owns_result:
            owned.add(st.key)
            continue
        first = st.args[0] if st.args else None
        first_owned = (first is not None and first.index is None and first.val.key in owned
                       and uses.get(first.val.key) == 1)
        if isinstance(st, FusedStep):
            # its buffer may be the first operand's when the program reads that operand first only
            st.inplace = first_owned and all(0 not in (i.a, i.b) for i in st.program[1:])
            owned.add(st.key)
            continue
        if not isinstance(st, OpStep) or st.spec.multi:
            continue
        if st.spec.inplace and first_owned:
            st.inplace = True
            owned.add(st.key)
        elif st.spec.fresh or (st.spec.alias and first_owned):
            owned.add(st.key)


def plan_graph(model_id, gid, g, dtype=None, constants=None, inputs=None, normalize="none", opset=None) -> Plan:
    return Planner(model_id, gid, g, dtype, constants, inputs, normalize, opset).build()


__all__ = ["Plan", "InputSpec", "OutputSpec", "plan_graph", "plan_inplace", "EVALUABLE_GRAPH_HINT"]


def _check_literal(value, what: str) -> int:
    """The elements a nested list literal holds; refused, before anything is allocated,
    when it expands to far more (YAML anchors and aliases share one list many times)."""
    memo: dict[int, int] = {}
    held = 0

    def expanded(v) -> int:
        nonlocal held
        if not isinstance(v, (list, tuple)):
            return 1
        if id(v) in memo:
            return memo[id(v)]
        if v and not isinstance(v[0], (list, tuple)):
            held += len(v)
            n = len(v)
        else:
            n = sum(expanded(x) for x in v)
        memo[id(v)] = n
        return n
    try:
        total = expanded(value)
    except RecursionError:
        raise CompileError(f"{what}: a list nested too deeply") from None
    if total > ops_mod.growth_budget(held):
        raise CompileError(f"{what}: a literal of {held:,} values written once expands to {total:,} (repeated "
                           f"lists, such as YAML aliases); refused")
    return held
