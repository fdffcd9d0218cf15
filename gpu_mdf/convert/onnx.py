"""ONNX -> MDF: gpu-mdf's own importer (PyTorch, TensorFlow and scikit-learn models arrive as ONNX).

    doc = onnx_to_mdf_doc(load_onnx("model.onnx"), normalize="scale")
    save_mdf(doc, "model.mdf.json")

The MDF is self-contained and keeps what the ONNX file says:

* one MDF node per ONNX node, its id the node's name (sanitised; unnamed nodes get
  ``<op>_<k>``), holding one ``onnx::<Op>`` function whose arguments name the ONNX
  inputs by their schema names, and the attributes as literals (strings as strings);
* every graph input an input port named after it, in an input node of its own, with its
  element type and shape (a free leading dimension is ``metadata.batch_axis``);
* weights in the file: an initializer (or a ``Constant`` node's value) that one node
  reads is a parameter of that node, one that several read is a node of its own; its
  element type is in the parameter's ``metadata.dtype`` (float64 stays float64);
* an output port per ONNX output, named after it (with its type and shape where shape
  inference knows them); a multi-output op's ports read ``op[i]``;
* the graph metadata (:class:`gpu_mdf.mdf.GraphMeta`): the inputs and outputs in ONNX
  order, the opset the functions were written in, the normalisation of integer pixels.

Refused with one line naming the reason: ops of other domains (``ai.onnx.ml``...), graph
control flow (If, Loop, Scan), ops or op versions the engine does not implement (after an
attempt to convert the model to an opset it does implement, with ``onnx.version_converter``),
tensor types NumPy does not compute in, and external data outside the model's folder.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, UnsupportedLayerError
from ..mdf import MDF_FORMAT, GraphMeta, safe_id, unique_id

# ONNX TensorProto element types NumPy (and CuPy) compute in
ELEMENT_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
CONTROL_FLOW = {"If": "a conditional subgraph", "Loop": "a loop subgraph", "Scan": "a scan subgraph",
                "SequenceMap": "a subgraph over a sequence"}
DEFAULT_DOMAINS = ("", "ai.onnx")


class OnnxRefused(UnsupportedLayerError):
    """An ONNX model (or one of its ops) that the importer or the engine cannot take."""


def _onnx():
    from ..extras import require
    return require("onnx", "importing ONNX models")


# --------------------------------------------------------------------------- #
# Reading a file
# --------------------------------------------------------------------------- #
def load_onnx(path, allow_external_data: bool = True):
    """Read an ``.onnx`` file; weights saved as external data are read from files that
    must lie inside the model's folder (or are refused, with ``allow_external_data=False``)."""
    onnx = _onnx()
    from onnx import external_data_helper as ext
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such ONNX file")
    if p.is_dir():
        raise ModelFileError(f"{p}: a folder, not an ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ModelFileError(f"{p}: not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    external = [t for t in ext._get_all_tensors(model) if ext.uses_external_data(t)]
    if external:
        if not allow_external_data:
            raise ModelFileError(f"{p}: weights saved as external data are not accepted here")
        folder = p.resolve().parent
        for t in external:
            location = {e.key: e.value for e in t.external_data}.get("location", "")
            target = (folder / location).resolve()
            if not location or Path(location).is_absolute() or folder not in target.parents:
                raise ModelFileError(f"{p}: external data of {t.name!r} at {location!r} lies outside the model's "
                                     f"folder; refused")
            if not target.is_file():
                raise ModelFileError(f"{p}: external data file {location!r} of {t.name!r} is missing")
        try:
            ext.load_external_data_for_model(model, str(folder))
        except Exception as e:
            raise ModelFileError(f"{p}: its external data cannot be read ({type(e).__name__}: "
                                 f"{_first_line(e)})") from None
    return model


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# --------------------------------------------------------------------------- #
# Checks and versions
# --------------------------------------------------------------------------- #
def model_opset(model) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise OnnxRefused("the model imports no version of the default ONNX domain")
    return max(versions)


def _refusal(n) -> str | None:
    """Why the engine cannot run node ``n`` (None: it can)."""
    from ..engine import OPS
    where = f"node {n.name!r} " if n.name else ""
    if n.domain not in DEFAULT_DOMAINS:
        return f"{where}op {n.domain}.{n.op_type} (domain {n.domain}) is not supported: the engine runs the " \
               f"default ONNX domain only"
    if n.op_type in CONTROL_FLOW:
        return f"{where}op {n.op_type} holds {CONTROL_FLOW[n.op_type]}: graph control flow is not supported " \
               f"(the batch engine runs a fixed graph)"
    if f"onnx::{n.op_type}" not in OPS:
        return f"{where}op {n.op_type} is not in the engine's op table"
    return None


def _outputs_without(model, bad: set[int]) -> list[str]:
    """The graph outputs that no node of ``bad`` (indices) contributes to."""
    g = model.graph
    producer = {o: k for k, n in enumerate(g.node) for o in n.output}
    clean = []
    for out in g.output:
        stack, seen, ok = [out.name], set(), True
        while stack and ok:
            v = stack.pop()
            k = producer.get(v)
            if k is None or k in seen:
                continue
            seen.add(k)
            ok = k not in bad
            stack += list(g.node[k].input)
        if ok:
            clean.append(out.name)
    return clean


def _refuse_unsupported(model) -> None:
    why = {k: r for k, n in enumerate(model.graph.node) if (r := _refusal(n)) is not None}
    if why:
        spare = _outputs_without(model, set(why))
        hint = f" (the outputs {spare} do not need it: convert only them with --outputs)" if spare else ""
        raise OnnxRefused(next(iter(why.values())) + hint)
    for t in list(model.graph.initializer):
        if t.data_type not in ELEMENT_TYPES:
            raise OnnxRefused(f"initializer {t.name!r}: {_type_name(t.data_type)} tensors are not supported")
    for vi in list(model.graph.input) + list(model.graph.output):
        _value_type(vi)


def _version_problems(model, opset: int) -> list[str]:
    from ..engine.ops import OpError, lookup
    problems = []
    for op in sorted({n.op_type for n in model.graph.node}):
        try:
            lookup(f"onnx::{op}", opset)
        except OpError as e:
            problems.append(str(e))
    return problems


def _supported_versions(model):
    """The model, converted with ``onnx.version_converter`` when the engine does not
    implement one of its op versions at the model's opset (the closest newer opset at
    which it implements them all); refused otherwise."""
    opset = model_opset(model)
    problems = _version_problems(model, opset)
    if not problems:
        return model, opset
    from onnx import version_converter

    from ..engine.ops import MAX_OPSET
    for target in range(opset + 1, MAX_OPSET + 1):
        if _version_problems(model, target):
            continue
        try:
            converted = version_converter.convert_version(model, target)
        except Exception:
            continue
        if not _version_problems(converted, model_opset(converted)):
            return converted, model_opset(converted)
    raise OnnxRefused(f"{problems[0]} (and onnx.version_converter found no opset the engine implements)")


# --------------------------------------------------------------------------- #
# Types and values
# --------------------------------------------------------------------------- #
def _type_name(code: int) -> str:
    import onnx
    try:
        return onnx.TensorProto.DataType.Name(code).lower()
    except ValueError:
        return f"type {code}"


def _value_type(vi) -> tuple[str | None, list | None]:
    """(dtype, dims with None for free ones) of a ValueInfo; (None, None) when unknown."""
    t = vi.type
    kind = t.WhichOneof("value")
    if kind is None:
        return None, None
    if kind != "tensor_type":
        raise OnnxRefused(f"{vi.name!r} is a {kind.replace('_type', '')}, not a tensor: not supported")
    code = t.tensor_type.elem_type
    if code == 0:
        return None, None
    if code not in ELEMENT_TYPES:
        raise OnnxRefused(f"{vi.name!r}: {_type_name(code)} tensors are not supported")
    if not t.tensor_type.HasField("shape"):
        return ELEMENT_TYPES[code], None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
    return ELEMENT_TYPES[code], dims


def _parameter(value: np.ndarray) -> dict:
    """A parameter holding an array exactly: its values, and its dtype (and shape, where
    the values cannot say it: empty arrays)."""
    a = np.asarray(value)
    meta = {"dtype": str(a.dtype)}
    if a.size == 0:
        meta["shape"] = list(a.shape)
    return {"value": a if a.ndim else a.reshape(()).item(), "metadata": meta}


def _attribute(node, a, params: dict) -> object:
    """An ONNX attribute as a function argument: literals as they are, strings as str,
    tensors as a typed parameter of the node (its id is the argument)."""
    from onnx import AttributeProto, helper, numpy_helper
    if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
        raise OnnxRefused(f"node {node.name!r} ({node.op_type}) attribute {a.name}: subgraphs are not supported")
    if a.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS, AttributeProto.TYPE_PROTO,
                  AttributeProto.TYPE_PROTOS, AttributeProto.TENSORS):
        raise OnnxRefused(f"node {node.name!r} ({node.op_type}) attribute {a.name}: "
                          f"{AttributeProto.AttributeType.Name(a.type).lower()} attributes are not supported")
    if a.type == AttributeProto.TENSOR:
        if a.t.data_type not in ELEMENT_TYPES:
            raise OnnxRefused(f"node {node.name!r} ({node.op_type}) attribute {a.name}: "
                              f"{_type_name(a.t.data_type)} tensors are not supported")
        pid = f"a_{a.name}"
        params[pid] = _parameter(numpy_helper.to_array(a.t))
        return pid
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


def _constant_value(node) -> np.ndarray:
    """The value of a Constant node (value, value_float(s), value_int(s))."""
    from onnx import helper, numpy_helper
    (a,) = node.attribute
    if a.name == "value":
        if a.t.data_type not in ELEMENT_TYPES:
            raise OnnxRefused(f"Constant {node.name!r}: {_type_name(a.t.data_type)} tensors are not supported")
        return numpy_helper.to_array(a.t)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if a.name not in kinds:
        raise OnnxRefused(f"Constant {node.name!r}: {a.name} is not supported")
    return np.asarray(helper.get_attribute_value(a), kinds[a.name])


# --------------------------------------------------------------------------- #
# The graph
# --------------------------------------------------------------------------- #
class _GraphWriter:
    """Builds one MDF graph from an ONNX graph (nodes in ONNX's topological order)."""

    def __init__(self, graph, opset: int, value_types: dict):
        from ..engine.ops import lookup
        self.graph, self.opset, self.value_types, self.lookup = graph, opset, value_types, lookup
        self.nodes: dict[str, dict] = {}
        self.edges: dict[str, dict] = {}
        self.node_ids: set[str] = set()
        self.port_ids: set[str] = set()          # output ports: unique in the graph
        self.producer: dict[str, tuple[str, str]] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.batch_axis: int | None = None

    def write(self) -> tuple[dict, list[str], list[str]]:
        from onnx import numpy_helper
        g = self.graph
        for t in g.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
        ops = []
        for k, n in enumerate(g.node):
            if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS:
                self.consts[n.output[0]] = _constant_value(n)
            else:
                ops.append((k, n))
        for vi in g.input:
            if vi.name not in self.consts:
                self._input_node(vi)
        readers = Counter(v for _, n in ops for v in set(n.input) if v in self.consts)
        outputs = [o.name for o in g.output]
        for name in self.consts:
            if readers[name] > 1 or name in outputs:
                self._constant_node(name)
        for k, n in ops:
            self._op_node(k, n, readers)
        return self.nodes, self.edges, self._outputs(outputs)

    def _input_node(self, vi) -> None:
        dtype, dims = _value_type(vi)
        if dtype is None:
            raise OnnxRefused(f"graph input {vi.name!r} has no element type")
        port = unique_id(safe_id(vi.name), self.port_ids)
        nid = unique_id(f"{port}_input", self.node_ids)
        meta = {}
        free = [i for i, d in enumerate(dims or []) if d is None]
        if free and free[0] == 0:
            meta["batch_axis"] = 0
            self.batch_axis = 0
        if [i for i in free if i != 0]:
            meta["dynamic_axes"] = [i for i in free if i != 0]
        spec = {"type": dtype}
        if dims is not None:
            spec["shape"] = [1 if d is None else d for d in dims]
        if meta:
            spec["metadata"] = meta
        out = unique_id(f"{port}_out", self.port_ids)
        self.nodes[nid] = {"metadata": {"onnx_input": vi.name}, "input_ports": {port: spec},
                           "output_ports": {out: {"value": port}}}
        self.producer[vi.name] = (nid, out)
        self.inputs.append(port)

    def _constant_node(self, name: str) -> None:
        nid = unique_id(safe_id(name), self.node_ids)
        out = unique_id(safe_id(name), self.port_ids)
        self.nodes[nid] = {"metadata": {"onnx_initializer": name},
                           "parameters": {"value": _parameter(self.consts[name])},
                           "output_ports": {out: {"value": "value"}}}
        self.producer[name] = (nid, out)

    def _op_node(self, k: int, n, readers: Counter) -> None:
        from ..engine.ops import OpError
        try:
            spec = self.lookup(f"onnx::{n.op_type}", self.opset)
        except OpError as e:
            raise OnnxRefused(f"node {n.name or n.op_type!r}: {e}") from None
        nid = unique_id(safe_id(n.name or f"{n.op_type}_{k}"), self.node_ids)
        ports, params, args, variadic = {}, {}, {}, []
        for j, v in enumerate(n.input):
            if not v:
                continue                                   # an optional input left out
            if v in self.consts and readers[v] == 1 and v not in self.producer:
                ref = f"w_{safe_id(v)}"
                params.setdefault(ref, _parameter(self.consts[v]))
            else:
                ref = f"i_{safe_id(v)}"
                if ref not in ports:
                    ports[ref] = self._declared(v)
                    self._edge(v, nid, ref)
            if spec.variadic:
                variadic.append(ref)
            elif j < len(spec.tensor_names):
                args[spec.tensor_names[j]] = ref
            else:
                raise OnnxRefused(f"node {n.name or nid!r} ({n.op_type}): input {j} is not one the engine's "
                                  f"{n.op_type} takes ({', '.join(spec.tensor_names)})")
        if variadic:
            args[spec.inputs[0]] = "[" + ", ".join(variadic) + "]"
        for a in n.attribute:
            args[a.name] = _attribute(n, a, params)
        fid = safe_id(n.op_type)
        node = {"metadata": {"onnx_op": n.op_type, **({"onnx_name": n.name} if n.name and n.name != nid else {})}}
        if ports:
            node["input_ports"] = ports
        if params:
            node["parameters"] = params
        node["functions"] = {fid: {"function": f"onnx::{n.op_type}", "args": args}}
        outs = {}
        for i, o in enumerate(n.output):
            if not o:
                continue
            pid = unique_id(safe_id(o), self.port_ids)
            outs[pid] = {"value": f"{fid}[{i}]" if spec.multi else fid, **self._declared(o)}
            self.producer[o] = (nid, pid)
        node["output_ports"] = outs
        self.nodes[nid] = node

    def _declared(self, value: str) -> dict:
        """The type and shape shape inference gives a value (free dimensions as -1)."""
        dtype, dims = self.value_types.get(value, (None, None))
        out = {}
        if dtype is not None:
            out["type"] = dtype
        if dims is not None:
            out["shape"] = [-1 if d is None else d for d in dims]
        return out

    def _edge(self, value: str, nid: str, port: str) -> None:
        if value not in self.producer:
            raise OnnxRefused(f"value {value!r} is read before any node computes it (the graph is not in "
                              f"topological order, or reads a value of an outer graph)")
        snode, sport = self.producer[value]
        eid = unique_id(f"{snode}_{sport}__{nid}_{port}", set(self.edges))
        self.edges[eid] = {"sender": snode, "sender_port": sport, "receiver": nid, "receiver_port": port}

    def _outputs(self, names: list[str]) -> list[str]:
        ports = []
        for name in names:
            if name not in self.producer:
                raise OnnxRefused(f"graph output {name!r} is computed by no node")
            nid, port = self.producer[name]
            if port in ports:                              # the same value listed twice: an Identity
                fid = "Identity"
                pid = unique_id(safe_id(name), self.port_ids)
                iid = unique_id(f"{safe_id(name)}_identity", self.node_ids)
                self.nodes[iid] = {"input_ports": {"i_x": {}},
                                   "functions": {fid: {"function": "onnx::Identity", "args": {"input": "i_x"}}},
                                   "output_ports": {pid: {"value": fid}}}
                self._edge(name, iid, "i_x")
                port = pid
            ports.append(port)
        return ports


def _value_types(model) -> dict:
    """Element type and dims of every value shape inference can tell."""
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        try:
            dtype, dims = _value_type(vi)
        except OnnxRefused:
            continue
        if dtype is not None:
            out[vi.name] = (dtype, dims)
    return out


def select_outputs(model, outputs: list[str]):
    """The part of the model that computes ``outputs`` (onnx.utils.Extractor)."""
    import onnx.utils
    names = [o.name for o in model.graph.output]
    unknown = [o for o in outputs if o not in names]
    if unknown:
        raise OnnxRefused(f"no output(s) {unknown}; the model's outputs are {names}")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return onnx.utils.Extractor(model).extract_model(inputs, list(outputs))


def onnx_to_mdf_doc(model, model_id: str | None = None, normalize: str | None = None,
                    outputs: list[str] | None = None) -> dict:
    """Translate an ONNX model (a ``ModelProto`` or a path) into an MDF document; with
    ``outputs``, only what those outputs need."""
    from .. import __version__
    onnx = _onnx()
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelFileError(f"not a valid ONNX model: {_first_line(e)}") from None
    if outputs:
        model = select_outputs(model, outputs)
    _refuse_unsupported(model)
    model, opset = _supported_versions(model)
    writer = _GraphWriter(model.graph, opset, _value_types(model))
    nodes, edges, outputs = writer.write()
    mid = safe_id(model_id or model.graph.name or "model")
    meta = GraphMeta(inputs=writer.inputs, outputs=outputs, normalize=normalize, batch_axis=writer.batch_axis,
                     opset=opset)
    graph = {"metadata": {GraphMeta.KEY: meta.to_dict()}, "nodes": nodes, "edges": edges}
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x)
    return {mid: {"format": MDF_FORMAT, "generating_application": f"gpu-mdf {__version__}",
                  "metadata": {"generator": "gpu-mdf", "source_format": "onnx", "onnx_ir_version": model.ir_version,
                               **({"producer": producer} if producer else {})},
                  "graphs": {f"{mid}_graph": graph}}}


__all__ = ["ELEMENT_TYPES", "OnnxRefused", "load_onnx", "model_opset", "onnx_to_mdf_doc"]
