"""Keras -> ModECI MDF conversion (imports Keras lazily, on first use).

    mdf = gpu_mdf.convert.keras_to_mdf(keras_model)    # the MDF document, a plain dict
    gpu_mdf.convert.save_mdf(mdf, "out/model.json")      # atomic write

Writing MDF needs Keras only (on TensorFlow, or on JAX where TensorFlow is not
installed: ``pip install 'gpu-mdf[convert]'``); modeci_mdf reads what it writes.

See :mod:`gpu_mdf.convert.keras` for the per-layer translators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GpuMdfError, ModelFileError, UnsupportedLayerError
from ..mdf import MDF_FORMAT, GraphMeta, mdf_graph, mdf_text, save_mdf, write_bson
from .keras import OP_TRANSLATORS, REFUSED_LAYERS, TRANSLATORS, NodeBuilder, Stack, safe_id, supported_layers

__all__ = ["keras_to_mdf", "save_mdf", "load_keras_model", "convert_files", "supported_layers",
           "ConvertResult", "mdf_text", "write_bson", "mdf_graph", "MDF_FORMAT"]


def _keras():
    from ..tfquiet import keras
    return keras("converting Keras models")


def load_keras_model(path: str | Path):
    """Load a ``.keras`` or ``.h5`` model in Keras's safe mode (a Lambda layer's code is
    never run), with one whole, plain error when Keras refuses it."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder, not a Keras model file")
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelFileError(f"{path}: not a Keras model file (expected .keras or .h5)")
    keras = _keras()
    from .. import layers as _shipped_layers  # noqa: F401  (registers gpu_mdf>PositionEmbedding)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise ModelFileError(f"{path}: {keras_load_error(path, e)}") from None


def keras_load_error(path: Path, e: Exception) -> str:
    """Keras's refusal in plain words, whole and on one line."""
    import zipfile
    text = " ".join(str(e).split())
    if "Lambda" in text and ("safe_mode" in text or "arbitrary code" in text):
        return ("Lambda layers run code: refused in safe mode (the model holds a Python function; "
                "gpu-mdf loads models with safe_mode=True and converts only layers it can describe)")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        return "not a valid .keras archive (a .keras file is a zip archive; this one is not, or is truncated)"
    if isinstance(e, OSError) and "file signature not found" in text:
        return "not a valid HDF5 (.h5) file"
    if isinstance(e, OSError) and "truncated file" in text:
        return f"a truncated HDF5 (.h5) file ({text})"
    return f"Keras cannot load this model: {type(e).__name__}: {text}"


def _graph_model(model):
    keras = _keras()
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise UnsupportedLayerError(f"model {model.name!r} is not built: call it on data or "
                                        f"model.build(input_shape) first")
        return fn
    if not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedLayerError(f"model {model.name!r} ({type(model).__name__}) is a subclassed "
                                    f"model; only Sequential and functional models convert")
    return model


def _is_model(keras, layer) -> bool:
    return isinstance(layer, keras.Model)


def _port_shape(t) -> tuple[int, ...]:
    """A Keras tensor's shape as an MDF port shape: the free batch axis written as 1."""
    return tuple(1 if d is None else int(d) for d in t.shape)


def keras_to_mdf(model, normalize: str | None = None, model_id: str | None = None) -> dict:
    """Translate a built Keras Sequential/functional model into an MDF model, as the
    plain document ``{model_id: {...}}`` that ``modeci_mdf.utils.load_mdf`` reads and
    :func:`gpu_mdf.engine.compile` takes (no modeci_mdf needed to write it).

    The graph takes each model input through an input port named after the
    Keras input; ``normalize`` records the pixel normalisation the model expects
    (``l2``, ``scale`` or ``none``) in the graph metadata for the engine to apply.
    """
    from .. import __version__
    keras = _keras()
    gm = _graph_model(model)
    mid = safe_id(model_id or model.name)
    nodes: dict[str, dict] = {}
    edges: dict[str, dict] = {}
    tensor_src: dict[int, tuple[str, str]] = {}   # id(KerasTensor) -> (node id, port id)
    used_ids: set[str] = set()
    input_names = []

    def unique(base: str, taken: set) -> str:
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    def fresh(name, keep=""):
        return unique("/".join(safe_id(part) for part in name.split("/")) if keep else safe_id(name), used_ids)

    paths: set[str] = set()

    def fresh_path(path):   # a model called twice gets two paths: base, base_2
        return unique(path, paths)

    # model inputs: one identity node each, whose input port is the graph input
    for t in gm.inputs:
        layer = t._keras_history.operation
        nid = fresh(layer.name)
        port = nid                         # the initializer key in EvaluableGraph
        nodes[f"{nid}_input"] = {
            "metadata": {"keras_class": "InputLayer"},
            "input_ports": {port: {"metadata": {"batch_axis": 0}, "shape": list(_port_shape(t)),
                                   "type": str(t.dtype)}},
            "output_ports": {f"{nid}_out": {"value": port}}}
        tensor_src[id(t)] = (f"{nid}_input", f"{nid}_out")
        input_names.append(port)

    def walk(g, src: dict, prefix: str) -> None:
        """Translate graph ``g``'s layer calls, in order; ``src`` maps id(KerasTensor) to
        the (node, port) giving it. A model used as a layer is walked in place, its layers'
        node ids prefixed with its path (``base/block_1_conv``), once per call."""
        for kns in g._nodes_by_depth.values():
            for kn in kns:
                name = type(kn.operation).__name__
                if name in REFUSED_LAYERS:
                    raise UnsupportedLayerError(f"layer {kn.operation.name!r} ({name}): "
                                                f"{REFUSED_LAYERS[name]} is not supported")
        for depth in sorted(g._nodes_by_depth, reverse=True):
            for kn in g._nodes_by_depth[depth]:
                layer = kn.operation
                if kn.is_input or layer is None:
                    continue
                ins, outs = list(kn.input_tensors), list(kn.output_tensors)
                if _is_model(keras, layer):
                    inner = _graph_model(layer)
                    if len(inner.inputs) != len(ins):
                        raise UnsupportedLayerError(f"model {layer.name!r} used as a layer with {len(ins)} inputs; "
                                                    f"it takes {len(inner.inputs)}")
                    scope = {id(it): src[id(t)] for it, t in zip(inner.inputs, ins)}
                    walk(inner, scope, fresh_path(prefix + layer.name) + "/")
                    for t, it in zip(outs, inner.outputs):
                        src[id(t)] = scope[id(it)]
                    continue
                for t, source in zip(outs, translate(kn, layer, ins, outs, src, prefix)):
                    src[id(t)] = source

    def translate(kn, layer, ins, outs, src, prefix) -> list[tuple[str, str]]:
        """One layer call as a node (and, for a Stack result, a joining node); returns the
        (node, port) of each of its outputs."""
        cls = type(layer).__name__
        if not isinstance(layer, keras.layers.Layer):       # a keras.ops operation, not a layer
            return [translate_op(kn, layer, ins, outs, src, prefix)]
        fn = TRANSLATORS.get(cls)
        if fn is None:
            raise UnsupportedLayerError(
                f"layer {layer.name!r} of kind {cls} is not supported; supported kinds: "
                f"{', '.join(supported_layers())}")
        if getattr(layer, "stateful", False):
            raise UnsupportedLayerError(f"layer {layer.name!r} ({cls}) is stateful")
        nid = fresh(prefix + layer.name, keep="/")
        pid = safe_id(nid)
        ports = [f"{pid}_in{i}" if len(ins) > 1 else f"{pid}_in" for i in range(len(ins))]
        b = NodeBuilder(nid, layer, [tuple(t.shape) for t in ins], tuple(outs[0].shape), reserved=set(ports),
                        call_kwargs=dict(getattr(getattr(kn, "arguments", None), "kwargs", None) or {}))
        results = fn(layer, b, ports)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        if len(results) != len(outs):
            raise UnsupportedLayerError(f"layer {layer.name!r} ({cls}) has {len(outs)} outputs; "
                                        f"the translator gives {len(results)}")
        meta = {"keras_class": cls}
        if nid != layer.name:
            meta["keras_name"] = layer.name
        node = node_doc(b, meta, ports, ins)
        node["output_ports"] = {}
        nodes[nid] = node
        for p, t in zip(ports, ins):
            add_edge(src[id(t)], (nid, p))
        sources = []
        for k, r in enumerate(results):
            suffix = "" if len(results) == 1 else str(k)
            if not isinstance(r, Stack):
                node["output_ports"][f"{pid}_out{suffix}"] = {"value": r}
                sources.append((nid, f"{pid}_out{suffix}"))
                continue
            # the per-step values leave through ports of their own and meet in a Concat node
            jid = fresh(f"{nid}_join{suffix}", keep="/")
            jp = safe_id(jid)
            jports = [f"{jp}_in{i}" for i in range(len(r.values))]
            nodes[jid] = {"metadata": {"keras_class": cls, "keras_name": layer.name, "joins": nid},
                          "input_ports": {p: {} for p in jports},
                          "functions": {"joined": {"function": "onnx::Concat",
                                                   "args": {"axis": r.axis, **{p: p for p in jports}}}},
                          "output_ports": {f"{jp}_out": {"value": "joined"}}}
            for i, (v, jport) in enumerate(zip(r.values, jports)):
                node["output_ports"][f"{pid}_step{suffix}_{i}"] = {"value": v}
                add_edge((nid, f"{pid}_step{suffix}_{i}"), (jid, jport))
            sources.append((jid, f"{jp}_out"))
        return sources

    def translate_op(kn, op, ins, outs, src, prefix):
        """A keras.ops operation node: its arguments in order, tensors through input ports,
        numbers and arrays as parameters."""
        cls = type(op).__name__
        fn = OP_TRANSLATORS.get(cls)
        if fn is None:
            raise UnsupportedLayerError(f"operation {op.name!r} ({cls}, a keras.ops call in the model) is not "
                                        f"supported; supported operations: {', '.join(sorted(OP_TRANSLATORS))}")
        args = list(getattr(kn.arguments, "args", ()) or ())
        if getattr(kn.arguments, "kwargs", None) or len(outs) != 1:
            raise UnsupportedLayerError(f"operation {op.name!r} ({cls}) with keyword arguments or several outputs")
        nid = fresh(prefix + op.name, keep="/")
        pid = safe_id(nid)
        tensors = [a for a in args if hasattr(a, "_keras_history")]
        ports = [f"{pid}_in{i}" if len(tensors) > 1 else f"{pid}_in" for i in range(len(tensors))]
        b = NodeBuilder(nid, op, [tuple(t.shape) for t in tensors], tuple(outs[0].shape), reserved=set(ports))
        operands, it = [], iter(ports)
        dtype = np.dtype(str(outs[0].dtype)) if str(outs[0].dtype) in ("float32", "float64") else np.float32
        for a in args:
            if hasattr(a, "_keras_history"):
                operands.append(next(it))
            elif isinstance(a, (int, float, np.ndarray, np.generic)) and not isinstance(a, bool):
                operands.append(b.param("const", np.asarray(a, dtype)))
            else:
                raise UnsupportedLayerError(f"operation {op.name!r} ({cls}): argument {a!r} is not a tensor or number")
        result = fn(op, b, operands)
        node = node_doc(b, {"keras_class": f"ops.{cls}"}, ports, tensors)
        node["output_ports"] = {f"{pid}_out": {"value": result}}
        nodes[nid] = node
        for p, t in zip(ports, tensors):
            add_edge(src[id(t)], (nid, p))
        return nid, f"{pid}_out"

    def node_doc(b, meta, ports, tensors) -> dict:
        """A node's metadata, input ports, functions and parameters (output ports: the caller's)."""
        node: dict = {"metadata": meta,
                      "input_ports": {p: {"shape": list(_port_shape(t)), "type": str(t.dtype)}
                                      for p, t in zip(ports, tensors)}}
        functions = {fid: ({"function": f, "args": a} if f is not None else {"value": v})
                     for fid, f, a, v in b.functions}
        if functions:
            node["functions"] = functions
        if b.parameters:
            node["parameters"] = {p: {"value": value} for p, value in b.parameters}
        return node

    def add_edge(sender, receiver):
        edges[f"e{len(edges) + 1}_{safe_id(sender[0])}_{safe_id(receiver[0])}"] = {
            "sender": sender[0], "receiver": receiver[0], "sender_port": sender[1], "receiver_port": receiver[1]}

    walk(gm, tensor_src, "")

    outputs = [tensor_src[id(t)][1] for t in gm.outputs]
    meta = GraphMeta(inputs=input_names, outputs=outputs, normalize=normalize, batch_axis=0)
    graph = {"metadata": {GraphMeta.KEY: meta.to_dict()},
             "nodes": nodes, "edges": edges}
    return {mid: {"format": MDF_FORMAT, "generating_application": f"gpu-mdf {__version__}",
                  "metadata": {"generator": "gpu-mdf", "keras_version": keras.__version__},
                  "graphs": {f"{mid}_graph": graph}}}


@dataclass
class ConvertResult:
    source: Path
    ok: bool
    outputs: list[Path]
    nodes: int = 0
    params: int = 0
    seconds: float = 0.0
    error: str = ""

    def line(self) -> str:
        if not self.ok:
            return f"FAIL {self.source}: {self.error}"
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in self.outputs)
        return (f"ok   {self.source}: {self.nodes} nodes, {self.params:,} parameters, {sizes} "
                f"({self.seconds:.2f} s)")


def _expand(sources) -> list[Path]:
    files = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".keras", ".h5", ".hdf5"))
        else:
            files.append(p)
    return files


def output_names(files: list[Path], suffixes: list[str]) -> tuple[list[str], list[str]]:
    """``<stem>.mdf.json`` for each model (the name ``gpu-mdf run`` writes); two models
    with one stem (``dense.keras`` and ``dense.h5``) get distinct names (the native
    ``.keras`` keeps the plain one), and each such renaming is reported."""
    taken: set[str] = set()
    names: list[str | None] = [None] * len(files)
    notes = []
    order = sorted(range(len(files)), key=lambda i: (files[i].suffix != ".keras", i))
    for i in order:
        f = files[i]
        stem = f.stem
        if stem in taken:
            alt, n = f"{stem}-{f.suffix.lstrip('.')}", 2
            while alt in taken:
                alt, n = f"{stem}-{f.suffix.lstrip('.')}{n}", n + 1
            notes.append(f"note: {f} is written as {alt}.mdf{suffixes[0]} ({stem}.mdf{suffixes[0]} is another model's)")
            stem = alt
        taken.add(stem)
        names[i] = stem
    return names, notes


def convert_files(sources, out_dir: str | Path, fmt: str = "json", normalize: str | None = None,
                  on_result=None, log=None) -> list[ConvertResult]:
    """Convert many model files; one failure never stops the others."""
    _keras()   # a missing Keras is one error for the whole call, not one per file
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GpuMdfError(f"{out_dir}: a file, not a folder; give --out a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffixes = {"json": [".json"], "yaml": [".yaml"], "both": [".json", ".yaml"], "bson": [".bson"]}[fmt]
    files = _expand(sources)
    stems, notes = output_names(files, suffixes)
    for note in notes:
        (log or print)(note)
    results = []
    for src, stem in zip(files, stems):
        t0 = time.perf_counter()
        try:
            model = load_keras_model(src)
            mdf = keras_to_mdf(model, normalize=normalize, model_id=stem)
            outs = [save_mdf(mdf, out_dir / f"{stem}.mdf{sfx}") for sfx in suffixes]
            params = int(sum(np.prod(w.shape) for w in model.weights))
            r = ConvertResult(src, True, outs, len(mdf_graph(mdf)["nodes"]), params,
                              time.perf_counter() - t0)
        except GpuMdfError as e:
            r = ConvertResult(src, False, [], error=str(e).removeprefix(f"{src}: "))
        except Exception as e:  # a translator bug must not stop the batch either
            r = ConvertResult(src, False, [], error=f"internal error {type(e).__name__}: {e}")
        results.append(r)
        if on_result:
            on_result(r)
    return results
