"""A compiled program as an ONNX model: the same graph, the same folded constants.

Used by the benchmark as the ONNX Runtime baseline for MDF graphs that have no
original ONNX file (gpu-mdf's own converter output, hand-written op graphs). Every
step writes its own nodes (:meth:`gpu_mdf.engine.steps.Step.export`) through the
:class:`Exporter`; constants become initializers; attributes written the older way
(``axes`` of Squeeze, Clip's bounds...) become inputs; ops with no node of their own
at the export opset are rewritten by the table :data:`REWRITES`. MDF expressions have
no ONNX form: a graph with one is refused (``ValueError``). Needs the ``onnx`` package.
"""

from __future__ import annotations

import numpy as np

from .steps import CONST, OpStep, Ref

EXPORT_OPSET = 18          # raised to 20 for a graph with Gelu
_ATTR_AS_INPUT = {"value": "constant_value"}   # Pad's opset-2 attribute and its opset-11 input
_INT_INPUTS = {"shape", "axes", "pads", "starts", "ends", "steps", "repeats", "split", "sizes", "K"}


class Exporter:
    """Collects the nodes and initializers of one ONNX graph; names the plan's values."""

    def __init__(self, plan, opset: int):
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.plan, self.opset, self.dtype = plan, opset, plan.dtype
        self.names: dict = {("input", p.name): p.name for p in plan.inputs}
        self.nodes: list = []
        self.inits: list = []
        self._counter = 0

    def fresh(self, prefix: str = "v") -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def const(self, value, integer: bool = False) -> str:
        name = self.fresh("c")
        a = np.asarray(value)
        if integer or a.size == 0:
            a = a.astype(np.int64)              # shape-like values (a file may write them as floats)
        elif a.dtype.kind == "f":
            a = a.astype(self.dtype)
        self.inits.append(self.numpy_helper.from_array(a, name))
        return name

    def ref(self, r: Ref | None, integer: bool = False) -> str:
        if r is None:
            return ""
        if r.place == CONST:
            return self.const(r.host_value(), integer)
        base = self.names[r.val.key]
        return base[r.index or 0] if r.val.multi else base

    def node(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        """Append a node; its output name (a list of names for ``n_out > 1``)."""
        outs = [self.fresh() for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, **attrs))
        return outs if n_out > 1 else outs[0]

    def op_step(self, st: OpStep) -> None:
        """An op step as one node of the same ONNX op at the export opset."""
        import onnx
        spec = st.spec
        if not spec.name.startswith("onnx::"):
            raise ValueError(f"{st.what}: MDF standard function {spec.name} has no ONNX form")
        op_type = spec.name.split("::")[-1]
        if op_type in REWRITES:
            self.names[st.key] = REWRITES[op_type](self, st)
            return
        schema = onnx.defs.get_schema(op_type, self.opset)
        schema_inputs = [i.name for i in schema.inputs]
        names_in = spec.tensor_names if not spec.variadic else ()
        inputs = [self.ref(r, i < len(names_in) and names_in[i] in _INT_INPUTS) for i, r in enumerate(st.args)]
        attrs = {}
        for k, v in st.attrs.items():
            if k in ("n_outputs", "inplace") or v is None:
                continue
            as_input = _ATTR_AS_INPUT.get(k, k)
            if as_input in schema_inputs and not spec.variadic and k not in schema.attributes:
                i = schema_inputs.index(as_input)
                inputs += [""] * (i + 1 - len(inputs))
                if not inputs[i]:
                    inputs[i] = self.const(np.asarray(v, np.int64 if spec.attrs[k].type == "INTS" else self.dtype))
                continue
            if k not in schema.attributes:
                continue                     # an old-opset attribute whose default the kernel checked
            if isinstance(v, np.ndarray):
                v = self.numpy_helper.from_array(v.astype(self.dtype) if v.dtype.kind == "f" else v)
            attrs[k] = list(v) if isinstance(v, tuple) else v
        while inputs and inputs[-1] == "":
            inputs.pop()
        n_out = max(st.n_outputs, 1) if spec.multi else 1
        if op_type == "Split" and "num_outputs" not in attrs and len(inputs) < 2:
            attrs["num_outputs"] = n_out
        outs = self.node(op_type, inputs, n_out, **attrs)
        self.names[st.key] = (outs if n_out > 1 else [outs]) if spec.multi else outs


def _upsample(e: Exporter, st: OpStep) -> str:
    """Upsample (deprecated since opset 10) is Resize with asymmetric coordinates, floor."""
    scales = e.ref(st.args[1]) if len(st.args) > 1 and st.args[1] is not None \
        else e.const(np.asarray(st.attrs["scales"], np.float32))
    return e.node("Resize", [e.ref(st.args[0]), "", scales], mode=st.attrs["mode"],
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")


REWRITES = {"Upsample": _upsample}


def to_onnx(program, batch_dim: str = "N"):
    """An ``onnx.ModelProto`` computing ``program``'s graph with its constants."""
    import onnx
    from onnx import helper

    plan = program.plan
    gelu = any(isinstance(st, OpStep) and st.spec.name == "onnx::Gelu" for st in plan.steps)
    e = Exporter(plan, 20 if gelu else EXPORT_OPSET)
    for st in plan.steps:
        st.export(e)
    out_infos = []
    for o in plan.outputs:
        e.nodes.append(helper.make_node("Identity", [e.ref(o.ref)], [o.name]))
        out_infos.append(onnx.ValueInfoProto(name=o.name))
    in_infos = []
    for p in plan.inputs:
        shape = None if p.shape is None else [batch_dim if d == -1 else d for d in p.shape]
        in_infos.append(helper.make_tensor_value_info(p.name, helper.np_dtype_to_tensor_dtype(np.dtype(p.dtype)),
                                                      shape))
    graph = helper.make_graph(e.nodes, program.graph_id, in_infos, out_infos, e.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", e.opset)])
    model.ir_version = 8
    return model
