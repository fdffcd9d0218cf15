"""The Keras graph walker: a built Sequential or functional model as one MDF graph.

Each model input is an identity node whose input port is the graph input (named after
the Keras input; shape ``(1, ...)`` with ``metadata.batch_axis = 0``: the batch axis is
free); no data lives in the file.

A layer call is usually one MDF node: an input port per input tensor, an output port
per output, and inside it the chain of MDF functions its translator writes (the
translators, one per layer class, are the family modules beside this one). A
:class:`~.registry.Stack` result (a recurrent layer's ``return_sequences``) leaves the
node through one port per step and gets a joining Concat node of its own
(``<node>_join``). A keras.ops operation called on tensors (``x + 3.0``) is a node too,
its constants as parameters. A model used as a layer is walked in place, its layers'
node ids prefixed with its path (``base/block/conv``), once per call (``tower``,
``tower_2``).
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedLayerError
from ...mdf import MDF_FORMAT, GraphMeta, safe_id, unique_id
from .loading import keras_module
from .registry import KERAS_OPSET, OP_TRANSLATORS, REFUSED_LAYERS, TRANSLATORS, NodeBuilder, Stack, supported_layers

Source = tuple[str, str]   # the (node id, output port id) that gives a tensor


def keras_to_mdf(model, normalize: str | None = None, model_id: str | None = None) -> dict:
    """Translate a built Keras Sequential/functional model into an MDF model, as the
    plain document ``{model_id: {...}}`` that ``modeci_mdf.utils.load_mdf`` reads and
    :func:`gpu_mdf.engine.compile` takes (no modeci_mdf needed to write it).

    The graph takes each model input through an input port named after the
    Keras input; ``normalize`` records the pixel normalisation the model expects
    (``l2``, ``scale`` or ``none``) in the graph metadata for the engine to apply.
    """
    from ... import __version__
    walker = KerasGraphWalker(model)
    graph = walker.graph(normalize)
    mid = safe_id(model_id or model.name)
    return {mid: {"format": MDF_FORMAT, "generating_application": f"gpu-mdf {__version__}",
                  "metadata": {"generator": "gpu-mdf", "keras_version": walker.keras.__version__},
                  "graphs": {f"{mid}_graph": graph}}}


def functional_graph(keras, model):
    """The functional graph of a built Sequential or functional model (refused otherwise)."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise UnsupportedLayerError(f"model {model.name!r} is not built: call it on data or "
                                        f"model.build(input_shape) first")
        return graph
    if not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedLayerError(f"model {model.name!r} ({type(model).__name__}) is a subclassed "
                                    f"model; only Sequential and functional models convert")
    return model


def _port_shape(t) -> tuple[int, ...]:
    """A Keras tensor's shape as an MDF port shape: the free batch axis written as 1."""
    return tuple(1 if d is None else int(d) for d in t.shape)


def _input_ports(pid: str, n: int) -> list[str]:
    return [f"{pid}_in{i}" if n > 1 else f"{pid}_in" for i in range(n)]


def _refuse_layers(graph) -> None:
    """Refuse a graph holding a layer of REFUSED_LAYERS before translating any of it."""
    for calls in graph._nodes_by_depth.values():
        for call in calls:
            name = type(call.operation).__name__
            if name in REFUSED_LAYERS:
                raise UnsupportedLayerError(f"layer {call.operation.name!r} ({name}): "
                                            f"{REFUSED_LAYERS[name]} is not supported")


class KerasGraphWalker:
    """Walks one built Keras model's layer calls in order, collecting the MDF graph.

    ``nodes`` and ``edges`` are the graph's, in the order written; ``tensor_sources``
    maps id(KerasTensor) of the model's own tensors to the :data:`Source` giving it;
    ``used_ids`` are the node ids taken, ``model_paths`` the paths of the models walked
    as layers, ``inputs`` the graph's input port ids. :meth:`graph` is called once.
    """

    def __init__(self, model):
        self.keras = keras_module()
        self.model = functional_graph(self.keras, model)
        self.nodes: dict[str, dict] = {}
        self.edges: dict[str, dict] = {}
        self.tensor_sources: dict[int, Source] = {}
        self.used_ids: set[str] = set()
        self.model_paths: set[str] = set()
        self.inputs: list[str] = []

    def graph(self, normalize: str | None = None) -> dict:
        """The MDF graph: the input nodes, every layer call's node(s), the edges and
        gpu-mdf's metadata (inputs, outputs in the model's order, normalisation, batch axis)."""
        for t in self.model.inputs:
            self.add_input(t)
        self.walk(self.model, self.tensor_sources, "")
        outputs = [self.tensor_sources[id(t)][1] for t in self.model.outputs]
        meta = GraphMeta(inputs=self.inputs, outputs=outputs, normalize=normalize, batch_axis=0, opset=KERAS_OPSET)
        return {"metadata": {GraphMeta.KEY: meta.to_dict()}, "nodes": self.nodes, "edges": self.edges}

    def fresh_id(self, name: str, scoped: bool = False) -> str:
        """A node id not yet used, from a Keras name; ``scoped`` keeps the ``/`` of a path."""
        base = "/".join(safe_id(part) for part in name.split("/")) if scoped else safe_id(name)
        return unique_id(base, self.used_ids)

    def add_input(self, t) -> None:
        """A model input: an identity node whose input port is the graph input."""
        nid = self.fresh_id(t._keras_history.operation.name)
        port = nid                         # the initializer key in EvaluableGraph
        self.nodes[f"{nid}_input"] = {
            "metadata": {"keras_class": "InputLayer"},
            "input_ports": {port: {"metadata": {"batch_axis": 0}, "shape": list(_port_shape(t)),
                                   "type": str(t.dtype)}},
            "output_ports": {f"{nid}_out": {"value": port}}}
        self.tensor_sources[id(t)] = (f"{nid}_input", f"{nid}_out")
        self.inputs.append(port)

    def walk(self, graph, sources: dict[int, Source], prefix: str) -> None:
        """Translate ``graph``'s layer calls, in order; ``sources`` maps id(KerasTensor) of
        its tensors to the :data:`Source` giving it; node ids start with ``prefix``."""
        _refuse_layers(graph)
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for call in graph._nodes_by_depth[depth]:
                layer = call.operation
                if call.is_input or layer is None:
                    continue
                ins, outs = list(call.input_tensors), list(call.output_tensors)
                if isinstance(layer, self.keras.Model):
                    self.walk_nested(layer, ins, outs, sources, prefix)
                    continue
                if isinstance(layer, self.keras.layers.Layer):
                    results = self.translate_layer(call, layer, ins, outs, sources, prefix)
                else:                                   # a keras.ops operation, not a layer
                    results = [self.translate_op(call, layer, outs, sources, prefix)]
                for t, source in zip(outs, results):
                    sources[id(t)] = source

    def walk_nested(self, model, ins, outs, sources: dict[int, Source], prefix: str) -> None:
        """A model used as a layer, walked in place under its path (``base``, ``base_2``...)."""
        inner = functional_graph(self.keras, model)
        if len(inner.inputs) != len(ins):
            raise UnsupportedLayerError(f"model {model.name!r} used as a layer with {len(ins)} inputs; "
                                        f"it takes {len(inner.inputs)}")
        scope = {id(it): sources[id(t)] for it, t in zip(inner.inputs, ins)}
        self.walk(inner, scope, unique_id(prefix + model.name, self.model_paths) + "/")
        for t, it in zip(outs, inner.outputs):
            sources[id(t)] = scope[id(it)]

    def translate_layer(self, call, layer, ins, outs, sources: dict[int, Source], prefix: str) -> list[Source]:
        """One layer call as a node (and, for a Stack result, a joining node); returns the
        source of each of its outputs."""
        cls = type(layer).__name__
        translate = TRANSLATORS.get(cls)
        if translate is None:
            raise UnsupportedLayerError(
                f"layer {layer.name!r} of kind {cls} is not supported; supported kinds: "
                f"{', '.join(supported_layers())}")
        if getattr(layer, "stateful", False):
            raise UnsupportedLayerError(f"layer {layer.name!r} ({cls}) is stateful")
        nid = self.fresh_id(prefix + layer.name, scoped=True)
        pid = safe_id(nid)
        ports = _input_ports(pid, len(ins))
        builder = NodeBuilder(layer, [tuple(t.shape) for t in ins], reserved=set(ports),
                              call_kwargs=dict(getattr(getattr(call, "arguments", None), "kwargs", None) or {}))
        results = translate(layer, builder, ports)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        if len(results) != len(outs):
            raise UnsupportedLayerError(f"layer {layer.name!r} ({cls}) has {len(outs)} outputs; "
                                        f"the translator gives {len(results)}")
        meta = {"keras_class": cls}
        if nid != layer.name:
            meta["keras_name"] = layer.name
        output_ports = self.add_node(nid, builder, meta, ports, ins, sources)
        output_sources = []
        for k, result in enumerate(results):
            suffix = "" if len(results) == 1 else str(k)
            if isinstance(result, Stack):
                output_sources.append(self.join_steps(nid, layer, result, suffix))
            else:
                output_ports[f"{pid}_out{suffix}"] = {"value": result}
                output_sources.append((nid, f"{pid}_out{suffix}"))
        return output_sources

    def join_steps(self, nid: str, layer, stack: Stack, suffix: str) -> Source:
        """The per-step values of node ``nid`` leave through ports of their own and meet in
        a node that holds only their Concat; returns the joined value's source."""
        pid = safe_id(nid)
        jid = self.fresh_id(f"{nid}_join{suffix}", scoped=True)
        jp = safe_id(jid)
        jports = [f"{jp}_in{i}" for i in range(len(stack.values))]
        self.nodes[jid] = {"metadata": {"keras_class": type(layer).__name__, "keras_name": layer.name, "joins": nid},
                           "input_ports": {p: {} for p in jports},
                           "functions": {"joined": {"function": "onnx::Concat",
                                                    "args": {"axis": stack.axis, **{p: p for p in jports}}}},
                           "output_ports": {f"{jp}_out": {"value": "joined"}}}
        for i, (value, jport) in enumerate(zip(stack.values, jports)):
            self.nodes[nid]["output_ports"][f"{pid}_step{suffix}_{i}"] = {"value": value}
            self.add_edge((nid, f"{pid}_step{suffix}_{i}"), (jid, jport))
        return jid, f"{jp}_out"

    def translate_op(self, call, op, outs, sources: dict[int, Source], prefix: str) -> Source:
        """A keras.ops operation node: its arguments in order, tensors through input ports,
        numbers and arrays as parameters."""
        cls = type(op).__name__
        translate = OP_TRANSLATORS.get(cls)
        if translate is None:
            raise UnsupportedLayerError(f"operation {op.name!r} ({cls}, a keras.ops call in the model) is not "
                                        f"supported; supported operations: {', '.join(sorted(OP_TRANSLATORS))}")
        args = list(getattr(call.arguments, "args", ()) or ())
        if getattr(call.arguments, "kwargs", None) or len(outs) != 1:
            raise UnsupportedLayerError(f"operation {op.name!r} ({cls}) with keyword arguments or several outputs")
        nid = self.fresh_id(prefix + op.name, scoped=True)
        pid = safe_id(nid)
        tensors = [a for a in args if hasattr(a, "_keras_history")]
        ports = _input_ports(pid, len(tensors))
        builder = NodeBuilder(op, [tuple(t.shape) for t in tensors], reserved=set(ports))
        result = translate(op, builder, _operands(op, builder, args, ports, str(outs[0].dtype)))
        output_ports = self.add_node(nid, builder, {"keras_class": f"ops.{cls}"}, ports, tensors, sources)
        output_ports[f"{pid}_out"] = {"value": result}
        return nid, f"{pid}_out"

    def add_node(self, nid: str, builder: NodeBuilder, meta: dict, ports: list[str], tensors,
                 sources: dict[int, Source]) -> dict:
        """Node ``nid`` from what ``builder`` collected, its input ports fed by ``tensors``;
        returns its output ports, for the caller to fill."""
        node: dict = {"metadata": meta,
                      "input_ports": {p: {"shape": list(_port_shape(t)), "type": str(t.dtype)}
                                      for p, t in zip(ports, tensors)}}
        functions = {fid: ({"function": f, "args": a} if f is not None else {"value": v})
                     for fid, f, a, v in builder.functions}
        if functions:
            node["functions"] = functions
        if builder.parameters:
            node["parameters"] = {p: {"value": value} for p, value in builder.parameters}
        node["output_ports"] = {}
        self.nodes[nid] = node
        for p, t in zip(ports, tensors):
            self.add_edge(sources[id(t)], (nid, p))
        return node["output_ports"]

    def add_edge(self, sender: Source, receiver: Source) -> None:
        self.edges[f"e{len(self.edges) + 1}_{safe_id(sender[0])}_{safe_id(receiver[0])}"] = {
            "sender": sender[0], "receiver": receiver[0], "sender_port": sender[1], "receiver_port": receiver[1]}


def _operands(op, builder: NodeBuilder, args, ports: list[str], out_dtype: str) -> list[str]:
    """A keras.ops call's arguments as value names: its tensors' input ports, in order, and
    its numbers and arrays as parameters (of the result's float type)."""
    dtype = np.dtype(out_dtype) if out_dtype in ("float32", "float64") else np.float32
    operands, port = [], iter(ports)
    for a in args:
        if hasattr(a, "_keras_history"):
            operands.append(next(port))
        elif isinstance(a, (int, float, np.ndarray, np.generic)) and not isinstance(a, bool):
            operands.append(builder.param("const", np.asarray(a, dtype)))
        else:
            raise UnsupportedLayerError(f"operation {op.name!r} ({type(op).__name__}): argument {a!r} is not "
                                        f"a tensor or number")
    return operands
