"""A compiled program as an ONNX model: the same graph, the same folded constants.

Used by the benchmark as the ONNX Runtime baseline for MDF graphs that have no
original ONNX file (gpu-mdf's own converter output, hand-written op graphs). Every
op step becomes one ONNX node at opset :data:`EXPORT_OPSET`; constants become
initializers; attributes written the older way (``axes`` of Squeeze, Clip's bounds...)
become inputs. MDF expressions have no ONNX form: a graph with one is refused
(``ValueError``). Needs the ``onnx`` package.
"""

from __future__ import annotations

import numpy as np

from .plan import CONST, Ref

EXPORT_OPSET = 18          # raised to 20 for a graph with Gelu
_ATTR_AS_INPUT = {"value": "constant_value"}   # Pad's opset-2 attribute and its opset-11 input
_INT_INPUTS = {"shape", "axes", "pads", "starts", "ends", "steps", "repeats", "split", "sizes", "K"}


def to_onnx(program, batch_dim: str = "N"):
    """An ``onnx.ModelProto`` computing ``program``'s graph with its constants."""
    import onnx
    from onnx import helper, numpy_helper

    plan = program.plan
    opset = 20 if any(st.spec is not None and st.spec.name == "onnx::Gelu" for st in plan.steps) else EXPORT_OPSET
    names: dict = {}
    nodes, inits = [], []
    counter = [0]

    def fresh(prefix="v"):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def const(value, integer=False) -> str:
        name = fresh("c")
        a = np.asarray(value)
        if integer or a.size == 0:
            a = a.astype(np.int64)              # shape-like values (a file may write them as floats)
        elif a.dtype.kind == "f":
            a = a.astype(plan.dtype)
        inits.append(numpy_helper.from_array(a, name))
        return name

    def ref(r: Ref | None, integer=False) -> str:
        if r is None:
            return ""
        if r.place == CONST:
            return const(r.host_value(), integer)
        base = names[r.val.key]
        if r.val.multi:
            return base[r.index or 0]
        return base

    for p in plan.inputs:
        names[("input", p.name)] = p.name
    for st in plan.steps:
        if st.kind == "expr":
            raise ValueError(f"{st.what}: an MDF expression ({st.expr[0]!r}) has no ONNX form")
        if st.kind == "move":
            out = fresh()
            nodes.append(helper.make_node("Identity", [ref(st.args[0])], [out]))
            names[st.key] = out
            continue
        if st.kind == "edge":
            acc = None
            for r, w in zip(st.args, st.weights):
                v = ref(r)
                if w is not None:
                    prod = fresh()
                    nodes.append(helper.make_node("Mul", [v, const(np.asarray(w, plan.dtype))], [prod]))
                    v = prod
                if acc is not None:
                    nxt = fresh()
                    nodes.append(helper.make_node("Mul" if st.reduce == "multiply" else "Add", [acc, v], [nxt]))
                    v = nxt
                acc = v
            names[st.key] = acc
            continue
        spec = st.spec
        op_type = spec.name.split("::")[-1]
        if not spec.name.startswith("onnx::"):
            raise ValueError(f"{st.what}: MDF standard function {spec.name} has no ONNX form")
        if op_type == "Upsample":        # deprecated since opset 10: the same resampling as Resize
            scales = ref(st.args[1]) if len(st.args) > 1 and st.args[1] is not None \
                else const(np.asarray(st.attrs["scales"], np.float32))
            out = fresh()
            nodes.append(helper.make_node("Resize", [ref(st.args[0]), "", scales], [out], mode=st.attrs["mode"],
                                          coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
            names[st.key] = out
            continue
        schema = onnx.defs.get_schema(op_type, opset)
        schema_inputs = [i.name for i in schema.inputs]
        names_in = spec.tensor_names if not spec.variadic else ()
        inputs = [ref(r, i < len(names_in) and names_in[i] in _INT_INPUTS) for i, r in enumerate(st.args)]
        attrs = {}
        for k, v in st.attrs.items():
            if k in ("n_outputs", "inplace") or v is None:
                continue
            as_input = _ATTR_AS_INPUT.get(k, k)
            if as_input in schema_inputs and not spec.variadic and k not in schema.attributes:
                i = schema_inputs.index(as_input)
                inputs += [""] * (i + 1 - len(inputs))
                if not inputs[i]:
                    inputs[i] = const(np.asarray(v, np.int64 if spec.attrs[k].type == "INTS" else plan.dtype))
                continue
            if k not in schema.attributes:
                continue                     # an old-opset attribute whose default the kernel checked
            if isinstance(v, np.ndarray):
                v = numpy_helper.from_array(v.astype(plan.dtype) if v.dtype.kind == "f" else v)
            attrs[k] = list(v) if isinstance(v, tuple) else v
        while inputs and inputs[-1] == "":
            inputs.pop()
        n_out = max(st.n_outputs, 1) if spec.multi else 1
        outs = [fresh() for _ in range(n_out)]
        if op_type == "Split" and "num_outputs" not in attrs and len(inputs) < 2:
            attrs["num_outputs"] = n_out
        nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        names[st.key] = outs if spec.multi else outs[0]
    out_infos = []
    for o in plan.outputs:
        src = ref(o.ref)
        nodes.append(helper.make_node("Identity", [src], [o.name]))
        out_infos.append(onnx.ValueInfoProto(name=o.name))
    in_infos = []
    for p in plan.inputs:
        shape = None if p.shape is None else [batch_dim if d == -1 else d for d in p.shape]
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(p.dtype))
        in_infos.append(helper.make_tensor_value_info(p.name, elem, shape))
    graph = helper.make_graph(nodes, program.graph_id, in_infos, out_infos, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model
