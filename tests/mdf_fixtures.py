"""MDF written by other tools, for the interop tests.

* ONNX models built with ``onnx.helper`` (every node named, random non-zero weights);
* :func:`import_onnx`: modeci_mdf's own ONNX importer (``onnx_to_mdf``), which writes
  the weights as unconnected input ports (their values go to ``initializer=`` /
  ``constants=``);
* :func:`pytorch_style`: the same graphs in the conventions of modeci_mdf's PyTorch
  exporter (``pytorch_to_mdf``, which cannot run with the PyTorch builds installable
  here): node ids ``Conv_3``, op calls ``onnx_Conv_1`` as parameters, ONNX attributes
  as node parameters, constants as parameters named by their port, ``op[0]`` output
  selectors for ops whose (opset 15) schema has several outputs, variadic inputs as a
  string list, ``onnx::Constant`` nodes carrying a ``value`` parameter, and a declared
  ``onnx_opset_version`` (9) older than the signatures used.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import onnx.defs
from onnx import TensorProto, helper, numpy_helper

R = np.random.default_rng(7)


def w(*shape, scale=0.3):
    return (R.standard_normal(shape) * scale).astype(np.float32)


class Builder:
    """A small ONNX graph builder: every node gets a name in PyTorch-export style."""

    def __init__(self):
        self.nodes, self.inits, self.k = [], [], 0

    def init(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const(self, value, name=None):
        self.k += 1
        name = name or f"const_{self.k}"
        self.nodes.append(helper.make_node("Constant", [], [name], name=f"/Constant_{self.k}",
                                           value=numpy_helper.from_array(np.asarray(value))))
        return name

    def op(self, op, inputs, n_out=1, **attrs):
        self.k += 1
        outs = [f"/{op.lower()}_{self.k}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"/{op.lower()}_{self.k}/{op}", **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, x_name, x_shape, outputs, opset=15):
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)],
                              [onnx.ValueInfoProto(name=o) for o in outputs], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)     # output types and shapes
        onnx.checker.check_model(m)
        return m


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
def cnn_pool(batch=2):
    """Conv, BN, pooling (ceil_mode, count_include_pad), global pool, Gemm transB=1, Softmax."""
    b = Builder()
    y = b.op("Conv", ["x", b.init("c1_w", w(6, 3, 3, 3)), b.init("c1_b", w(6))], pads=[1, 1, 1, 1])
    y = b.op("Relu", [y])
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    y = b.op("Conv", [y, b.init("c2_w", w(8, 6, 3, 3))], strides=[1, 1])
    y = b.op("BatchNormalization", [y, b.init("bn_s", w(8) + 1), b.init("bn_b", w(8)), b.init("bn_m", w(8)),
                                    b.init("bn_v", np.abs(w(8)) + 0.5)], epsilon=1e-3, training_mode=0)
    y = b.op("Relu", [y])
    y = b.op("AveragePool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    y = b.op("Gemm", [y, b.init("fc_w", w(10, 8)), b.init("fc_b", w(10))], transB=1)
    y = b.op("Softmax", [y], axis=-1)
    return b.model("x", [batch, 3, 11, 11], [y])


def residual_concat(batch=2):
    """Residual adds, two branches concatenated (one twice), a global max pool; PyTorch's dotted
    weight names (``r0.w``), which modeci_mdf's importer keeps as port ids."""
    b = Builder()
    h = b.op("Relu", [b.op("Conv", ["x", b.init("c0.w", w(4, 3, 3, 3)), b.init("c0.b", w(4))], pads=[1, 1, 1, 1])])
    for i in range(2):
        y = b.op("Conv", [h, b.init(f"r{i}.w", w(4, 4, 3, 3))], pads=[1, 1, 1, 1])
        h = b.op("Relu", [b.op("Add", [h, y])])
    a = b.op("Conv", [h, b.init("a.w", w(3, 4, 1, 1))])
    c = b.op("Conv", [h, b.init("c.w", w(5, 4, 3, 3))], pads=[1, 1, 1, 1])
    y = b.op("Concat", [a, c, a], axis=1)
    y = b.op("Flatten", [b.op("GlobalMaxPool", [y])])
    return b.model("x", [batch, 3, 8, 8], [y])


def channel_shuffle(batch=2):
    """A ShuffleNet unit as exporters write it: the shuffle's shapes come from Shape ->
    Gather -> Div -> Unsqueeze -> Concat -> Reshape (host-side shape arithmetic)."""
    b = Builder()
    x = b.op("Conv", ["x", b.init("g_w", w(8, 2, 1, 1))], group=2)
    s = b.op("Shape", [x])
    n, c, h, wd = (b.op("Gather", [s, b.const(np.array(i, np.int64))], axis=0) for i in range(4))
    cg = b.op("Div", [c, b.const(np.array(2, np.int64))])
    unsq = [b.op("Unsqueeze", [v, b.const(np.array([0], np.int64))]) for v in (n, cg, h, wd)]
    shape5 = b.op("Concat", [unsq[0], b.const(np.array([2], np.int64)), unsq[1], unsq[2], unsq[3]], axis=0)
    y = b.op("Reshape", [x, shape5])
    y = b.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    back = b.op("Concat", [unsq[0], b.op("Unsqueeze", [c, b.const(np.array([0], np.int64))]), unsq[2], unsq[3]],
                axis=0)
    y = b.op("Reshape", [y, back])
    y = b.op("Conv", [y, b.init("dw_w", w(8, 1, 3, 3))], group=8, pads=[1, 1, 1, 1])
    y = b.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
    return b.model("x", [batch, 4, 6, 6], [y])


def mobilenet_block(batch=2):
    """Inverted residual blocks: 1x1 expand, depthwise 3x3 with Clip (ReLU6), 1x1 project."""
    b = Builder()
    lo, hi = b.init("clip_lo", np.array(0, np.float32)), b.init("clip_hi", np.array(6, np.float32))
    h = b.op("Clip", [b.op("Conv", ["x", b.init("stem_w", w(8, 3, 3, 3)), b.init("stem_b", w(8))],
                           strides=[2, 2], pads=[1, 1, 1, 1]), lo, hi])
    for i, stride in enumerate((1, 2)):
        e = b.op("Clip", [b.op("Conv", [h, b.init(f"e{i}_w", w(16, 8, 1, 1)), b.init(f"e{i}_b", w(16))]), lo, hi])
        d = b.op("Clip", [b.op("Conv", [e, b.init(f"d{i}_w", w(16, 1, 3, 3)), b.init(f"d{i}_b", w(16))], group=16,
                               strides=[stride, stride], pads=[1, 1, 1, 1]), lo, hi])
        p = b.op("Conv", [d, b.init(f"p{i}_w", w(8, 16, 1, 1)), b.init(f"p{i}_b", w(8))])
        h = b.op("Add", [h, p]) if stride == 1 else p
    y = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    y = b.op("Gemm", [y, b.init("fc_w", w(10, 8)), b.init("fc_b", w(10))], transB=1)
    return b.model("x", [batch, 3, 16, 16], [y])


def mlp_gemm(batch=2):
    b = Builder()
    y = b.op("Flatten", ["x"], axis=1)
    y = b.op("Relu", [b.op("Gemm", [y, b.init("l1_w", w(32, 48)), b.init("l1_b", w(32))], transB=1)])
    y = b.op("Gemm", [y, b.init("l2_w", w(10, 32)), b.init("l2_b", w(10))], transB=1, alpha=0.5)
    y = b.op("LogSoftmax", [y], axis=1)
    return b.model("x", [batch, 3, 4, 4], [y])


MODELS = {"cnn_pool": cnn_pool, "residual_concat": residual_concat, "channel_shuffle": channel_shuffle,
          "mobilenet_block": mobilenet_block, "mlp_gemm": mlp_gemm}


def mobilenet_style_cnn(batch=64, width=32, blocks=((16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (64, 2), (64, 1)),
                        size=32, classes=10):
    """A MobileNetV2-shaped CNN (stem, inverted residual blocks, head) for the benchmark."""
    b = Builder()
    lo, hi = b.init("clip_lo", np.array(0, np.float32)), b.init("clip_hi", np.array(6, np.float32))
    h = b.op("Clip", [b.op("Conv", ["x", b.init("stem_w", w(width, 3, 3, 3)), b.init("stem_b", w(width))],
                           strides=[2, 2], pads=[1, 1, 1, 1]), lo, hi])
    c = width
    for i, (out, stride) in enumerate(blocks):
        e = 6 * c
        x = b.op("Clip", [b.op("Conv", [h, b.init(f"e{i}_w", w(e, c, 1, 1)), b.init(f"e{i}_b", w(e))]), lo, hi])
        x = b.op("Clip", [b.op("Conv", [x, b.init(f"d{i}_w", w(e, 1, 3, 3)), b.init(f"d{i}_b", w(e))], group=e,
                               strides=[stride, stride], pads=[1, 1, 1, 1]), lo, hi])
        x = b.op("Conv", [x, b.init(f"p{i}_w", w(out, e, 1, 1, scale=0.1)), b.init(f"p{i}_b", w(out))])
        h = b.op("Add", [h, x]) if stride == 1 and out == c else x
        c = out
    h = b.op("Clip", [b.op("Conv", [h, b.init("head_w", w(256, c, 1, 1)), b.init("head_b", w(256))]), lo, hi])
    y = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    y = b.op("Gemm", [y, b.init("fc_w", w(classes, 256)), b.init("fc_b", w(classes))], transB=1)
    return b.model("x", [batch, 3, size, size], [y])


def he(*shape):
    """Random weights that keep activations in range through deep stacks (He's scaling)."""
    fan_in = int(np.prod(shape[1:]))
    return (R.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def squeezenet(opset=9, size=224, classes=1000):
    """SqueezeNet 1.0 as the ONNX model zoo has it (opset 9): fire modules (squeeze 1x1, expand
    1x1 and 3x3, concatenated), dropout, a 1x1 classifier, average pooling and a Softmax on the
    (N, 1000, 1, 1) output, which before opset 13 flattens from axis 1."""
    b = Builder()

    def conv(x, cin, cout, k, name, **attrs):
        return b.op("Relu", [b.op("Conv", [x, b.init(f"{name}_w", he(cout, cin, k, k)), b.init(f"{name}_b", w(cout))],
                                  kernel_shape=[k, k], **attrs)])

    def fire(x, cin, s, e, name):
        sq = conv(x, cin, s, 1, f"{name}_s")
        return b.op("Concat", [conv(sq, s, e, 1, f"{name}_e1"), conv(sq, s, e, 3, f"{name}_e3", pads=[1, 1, 1, 1])],
                    axis=1)

    y = conv("x", 3, 96, 7, "conv1", strides=[2, 2])
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    y = fire(fire(fire(y, 96, 16, 64, "f2"), 128, 16, 64, "f3"), 128, 32, 128, "f4")
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    y = fire(fire(fire(fire(y, 256, 32, 128, "f5"), 256, 48, 192, "f6"), 384, 48, 192, "f7"), 384, 64, 256, "f8")
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    y = fire(y, 512, 64, 256, "f9")
    y = b.op("Dropout", [y], ratio=0.5)
    y = conv(y, 512, classes, 1, "conv10")
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Softmax", [y])
    return b.model("x", [1, 3, size, size], [y], opset=opset)


def vgg19(size=224, classes=1000):
    """VGG19 (143.7M weights, 102.8M of them in the first fully connected layer at 224x224)."""
    b = Builder()
    y, cin = "x", 3
    for i, (cout, n) in enumerate(((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))):
        for j in range(n):
            y = b.op("Relu", [b.op("Conv", [y, b.init(f"c{i}{j}_w", he(cout, cin, 3, 3)),
                                            b.init(f"c{i}{j}_b", w(cout, scale=0.01))], pads=[1, 1, 1, 1])])
            cin = cout
        y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Flatten", [y])
    feat = cin * (size // 32) ** 2
    for k, (fin, fout) in enumerate(((feat, 4096), (4096, 4096), (4096, classes))):
        y = b.op("Gemm", [y, b.init(f"fc{k}_w", he(fout, fin)), b.init(f"fc{k}_b", w(fout, scale=0.01))], transB=1)
        if k < 2:
            y = b.op("Dropout", [b.op("Relu", [y])], ratio=0.5)
    y = b.op("Softmax", [y], axis=1)
    return b.model("x", [1, 3, size, size], [y], opset=11)


# --------------------------------------------------------------------------- #
# Importers
# --------------------------------------------------------------------------- #
def import_onnx(model):
    """modeci_mdf's onnx_to_mdf: (MDF dict, weights keyed by the port ids it gives them)."""
    from modeci_mdf.interfaces.onnx.importer import id_to_port, onnx_to_mdf
    with contextlib.redirect_stdout(io.StringIO()):
        mdf = onnx_to_mdf(model)
    weights = {id_to_port(t.name): numpy_helper.to_array(t) for t in model.graph.initializer}
    return mdf, weights


def run_ort(model, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def run_ort_all(model, feeds: dict) -> list:
    """Every output of ONNX Runtime on ``model``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_eg(mdf_model, initializer, node, port):
    """modeci_mdf's EvaluableGraph (quietly: it prints)."""
    from modeci_mdf.execution_engine import EvaluableGraph
    with contextlib.redirect_stdout(io.StringIO()):
        eg = EvaluableGraph(mdf_model.graphs[0], verbose=False)
        eg.evaluate(initializer=initializer)
    return eg.enodes[node].evaluable_outputs[port].curr_value


_MULTI_15 = {}


def _n_outputs_15(op):
    if op not in _MULTI_15:
        _MULTI_15[op] = len(onnx.defs.get_schema(op, 15).outputs)
    return _MULTI_15[op]


def pytorch_style(model, declared_opset=9):
    """The graph in modeci_mdf PyTorch-exporter conventions: (MDF dict, weights by port id)."""
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    names: dict[str, str] = {}
    for i, inp in enumerate(g.input):
        names[inp.name] = f"input{i + 1}"
    counter = iter(range(10, 100000))

    def port(v):
        if v not in names:
            names[v] = v.replace(".", "_") if v in inits else f"_{next(counter)}"
        return names[v]

    producer: dict[str, tuple[str, str]] = {}
    nodes, edges = {}, {}
    weights = {}
    for k, n in enumerate(g.node):
        schema = onnx.defs.get_schema(n.op_type, 15)
        nid = f"{n.op_type}_{k + 1}"
        fid = f"onnx_{n.op_type}_1"
        params, ports = {}, {}
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            params[a.name] = {"value": numpy_helper.to_array(v).tolist() if isinstance(v, onnx.TensorProto)
                              else (v.decode() if isinstance(v, bytes) else (list(v) if isinstance(v, list)
                                                                            or hasattr(v, "__len__") else v))}
        in_ports = []
        for v in n.input:
            pid = port(v)
            in_ports.append(pid)
            if v in inits and inits[v].dtype.kind in "iu":            # shape-like constants: parameters
                params[pid] = {"value": inits[v].tolist()}
            elif v in inits:                                          # weights: unconnected input ports
                ports[pid] = {"shape": list(inits[v].shape), "type": "float32"}
                weights[pid] = inits[v]
            else:
                ports[pid] = {"shape": [], "type": "float32"}
                if v in producer:
                    snode, sport = producer[v]
                    edges[f"{snode}_{nid}_{pid}"] = {"sender": snode, "sender_port": sport, "receiver": nid,
                                                     "receiver_port": pid}
                else:                                                  # the graph input
                    shape = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
                    ports[pid] = {"shape": shape, "type": "float32"}
        if schema.inputs and schema.inputs[0].option.name == "Variadic":
            args = {schema.inputs[0].name: str(in_ports)}
        else:
            args = {schema.inputs[j].name: pid for j, pid in enumerate(in_ports)}
        params[fid] = {"function": f"onnx::{n.op_type}", "args": args}
        outs = {}
        for j, o in enumerate(n.output):
            pid = port(o)
            outs[pid] = {"value": fid + (f"[{j}]" if _n_outputs_15(n.op_type) > 1 else "")}
            producer[o] = (nid, pid)
        nodes[nid] = {"input_ports": ports, "parameters": params, "output_ports": outs}
    mdf = {"TorchModel": {"format": "ModECI MDF v0.4", "onnx_opset_version": declared_opset,
                          "graphs": {"TorchModelGraph": {"nodes": nodes, "edges": edges}}}}
    out_port = port(g.output[0].name)
    out_node = producer[g.output[0].name][0]
    return mdf, weights, (out_node, out_port)
