"""MDF that other tools and people write: it runs, with EvaluableGraph's numbers.

* ONNX graphs imported by modeci_mdf's ``onnx_to_mdf`` (weights as input ports, bound
  with ``constants=``) and the same graphs in modeci_mdf's PyTorch-exporter
  conventions, against ONNX Runtime on the original ONNX and, where it can run them,
  against modeci_mdf's ``EvaluableGraph`` with ``initializer=``;
* Keras models exported by tf2onnx, then imported;
* hand-written MDF in the style of the MDF specification's examples: closed graphs,
  standard functions, arrays, edge weights, unfed ports, ids that are not identifiers.

Random non-zero weights and inputs everywhere.
"""

import json

import fake_cupy
import mdf_fixtures as F
import numpy as np
import pytest

from gpu_mdf.engine import compile
from gpu_mdf.errors import CompileError, DataError

pytest.importorskip("onnx")
pytest.importorskip("modeci_mdf")


def _x(model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return F.R.standard_normal(shape).astype(np.float32)


def _mdf_object(d, tmp_path):
    from modeci_mdf.utils import load_mdf
    p = tmp_path / "m.json"
    p.write_text(json.dumps(d))
    return load_mdf(str(p))


# which (model, convention) pairs EvaluableGraph itself can evaluate; the others stop
# it: MaxPool's (Y, Indices) tuple reaching the next op in onnx_to_mdf files, dotted
# weight names read as attribute access, a Concat input repeated, skl2onnx shape
# inference on Shape/Gather chains
EG_RUNS = {("cnn_pool", "pytorch"), ("mobilenet_block", "onnx"), ("mobilenet_block", "pytorch"),
           ("mlp_gemm", "onnx"), ("mlp_gemm", "pytorch")}


@pytest.mark.parametrize("convention", ["onnx", "pytorch"])
@pytest.mark.parametrize("name", list(F.MODELS))
def test_imported_graph_matches_onnxruntime_and_evaluable_graph(name, convention, tmp_path):
    model = F.MODELS[name]()
    x = _x(model)
    want = F.run_ort(model, x)
    if convention == "onnx":
        mdf, weights = F.import_onnx(model)
        d, (data_port,) = mdf.to_dict(), ["x"]
    else:
        d, weights, _ = F.pytorch_style(model)
        data_port = "input1"
    prog = compile(d, device="cpu", constants=weights)
    assert [p.name for p in prog.inputs] == [data_port]          # weights are constants, not inputs
    assert prog.dtype == np.float32
    got = prog.run(x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if (name, convention) in EG_RUNS:
        o = prog.outputs[0]
        theirs = F.run_eg(_mdf_object(d, tmp_path), {**weights, data_port: x}, o.node, o.port)
        np.testing.assert_allclose(got, np.asarray(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("convention", ["onnx", "pytorch"])
@pytest.mark.parametrize("name", list(F.MODELS))
def test_imported_graph_on_the_strict_cupy_standin(name, convention, strict_gpu):
    model = F.MODELS[name]()
    x = _x(model)
    d, weights = (F.import_onnx(model)[0].to_dict(), F.import_onnx(model)[1]) if convention == "onnx" \
        else F.pytorch_style(model)[:2]
    gpu = compile(d, device=strict_gpu, constants=weights)
    np.testing.assert_allclose(gpu.run(x), F.run_ort(model, x), atol=1e-5, rtol=1e-5)
    gpu.run(x)
    fake_cupy.COUNT.reset()
    gpu.run(x)
    assert (fake_cupy.COUNT.d2h_syncs, fake_cupy.COUNT.h2d_copies) == (1, 1), fake_cupy.COUNT.log


def test_channel_shuffle_shapes_are_host_arithmetic():
    """Shape -> Gather -> Div -> Concat -> Reshape runs on host integers, per batch size."""
    model = F.channel_shuffle(batch=2)
    mdf, weights = F.import_onnx(model)
    prog = compile(mdf.to_dict(), device="cpu", constants=weights)
    host = [st for st in prog.plan.steps if st.place == "host"]
    assert {st.spec.name for st in host} >= {"onnx::Shape", "onnx::Gather", "onnx::Div", "onnx::Concat"}
    assert not prog.plan.syncs and not prog.plan.uploads
    x = F.R.standard_normal((5, 4, 6, 6)).astype(np.float32)     # another batch size than declared
    big = F.channel_shuffle(batch=5)
    big.graph.ClearField("initializer")
    big.graph.initializer.extend(model.graph.initializer)
    np.testing.assert_allclose(prog.run(x), F.run_ort(big, x), atol=1e-5)


def test_weights_bound_by_node_and_port_and_refusals():
    model = F.mlp_gemm()
    mdf, weights = F.import_onnx(model)
    d = mdf.to_dict()
    # "node.port" keys bind one port
    nodes = {n: spec for n, spec in next(iter(d.values()))["graphs"]["g"]["nodes"].items()}
    by_node = {}
    for nid, n in nodes.items():
        for pid in n.get("input_ports", {}):
            if pid in weights:
                by_node[f"{nid}.{pid}"] = weights[pid]
    x = _x(model)
    np.testing.assert_allclose(compile(d, device="cpu", constants=by_node).run(x), F.run_ort(model, x), atol=1e-5)
    with pytest.raises(CompileError, match="no unconnected input port 'nope'"):
        compile(d, device="cpu", constants={"nope": np.zeros(3)})
    connected = next(e["receiver_port"] for e in next(iter(d.values()))["graphs"]["g"]["edges"].values())
    with pytest.raises(CompileError, match="receives an edge"):
        compile(d, device="cpu", constants={connected: np.zeros(3)})
    # without the weights every free port is an input: one array is ambiguous
    bare = compile(d, device="cpu")
    assert len(bare.inputs) == 1 + len(weights)
    with pytest.raises(DataError, match="pass a dict.*constants="):
        bare.run(x)
    # ...but a dict feeds them all, as EvaluableGraph's initializer does
    np.testing.assert_allclose(bare.run({"x": x, **weights}), F.run_ort(model, x), atol=1e-5)


def test_constants_cli(tmp_path):
    """gpu-mdf infer MODEL --constants weights.npz on an imported graph and a .npy input."""
    import subprocess
    import sys
    model = F.mobilenet_block(batch=1)
    mdf, weights = F.import_onnx(model)
    (tmp_path / "m.json").write_text(json.dumps(mdf.to_dict()))
    np.savez(tmp_path / "w.npz", **weights)
    x = F.R.standard_normal((40, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "gpu_mdf", "infer", str(tmp_path / "m.json"), "--constants",
                        str(tmp_path / "w.npz"), "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"),
                        "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())["outputs"][0]["file"]
    np.testing.assert_allclose(np.load(tmp_path / "o" / written),
                               compile(mdf.to_dict(), device="cpu", constants=weights).run(x), atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "gpu_mdf", "infer", str(tmp_path / "m.json"), "--constants",
                          str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o2")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "missing.npz" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- #
# tf2onnx exports of Keras models
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tf2onnx():
    return pytest.importorskip("tf2onnx")


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_tf2onnx_export_imported(kind, tf2onnx, tmp_path):
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    L = keras.layers
    if kind == "cnn":
        model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(6, 3, activation="relu", padding="same"),
                                  L.MaxPooling2D(), L.Conv2D(8, 3, strides=2), L.BatchNormalization(),
                                  L.Flatten(), L.Dense(10, activation="softmax")])
    else:
        model = keras.Sequential([keras.Input((28, 28)), L.Flatten(), L.Dense(32, activation="relu"),
                                  L.Dense(10, activation="softmax")])
    for v in model.weights:
        a = F.R.standard_normal(v.shape).astype("float32") * 0.3
        v.assign(np.abs(a) + 0.5 if "variance" in v.path else a)
    spec = (tf.TensorSpec((None,) + model.input_shape[1:], tf.float32, name="x"),)
    onnx_model, _ = tf2onnx.convert.from_function(tf.function(lambda t: model(t, training=False)),
                                                   input_signature=spec, opset=15)
    mdf, weights = F.import_onnx(onnx_model)
    prog = compile(mdf.to_dict(), device="cpu", constants=weights)
    x = F.R.standard_normal((7,) + model.input_shape[1:]).astype("float32")
    np.testing.assert_allclose(prog.run(x), model.predict(x, verbose=0), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Hand-written MDF
# --------------------------------------------------------------------------- #
def model_of(nodes, edges=None, **extra):
    g = {"nodes": nodes}
    if edges:
        g["edges"] = edges
    return {"hand": {"format": "ModECI MDF v0.4", "graphs": {"g": g}, **extra}}


def _v04(d):
    """MDF v0.1 spellings (plain parameter values, shapes as strings) in v0.4 form."""
    import ast
    import copy
    d = copy.deepcopy(d)
    for g in next(iter(d.values()))["graphs"].values():
        for n in g["nodes"].values():
            n["parameters"] = {k: v if isinstance(v, dict) else {"value": v}
                               for k, v in n.get("parameters", {}).items()}
            for p in n.get("input_ports", {}).values():
                if isinstance(p.get("shape"), str):
                    p["shape"] = list(ast.literal_eval(p["shape"]))
    return d


def eg_value(d, tmp_path, node, port, initializer=None):
    return np.asarray(F.run_eg(_mdf_object(d, tmp_path), initializer or {}, node, port))


SIMPLE = model_of(
    {"input_node": {"parameters": {"input_level": {"value": 0.5}},
                    "output_ports": {"out_port": {"value": "input_level"}}},
     "processing_node": {
         "input_ports": {"input_port1": {}},
         "parameters": {
             "lin_slope": {"value": 0.5}, "lin_intercept": {"value": 0}, "log_gain": {"value": 3},
             "linear_1": {"function": "linear", "args": {"variable0": "input_port1", "slope": "lin_slope",
                                                          "intercept": "lin_intercept"}},
             "logistic_1": {"function": "logistic", "args": {"variable0": "linear_1", "gain": "log_gain",
                                                              "bias": 0, "offset": 0}}},
         "output_ports": {"output_1": {"value": "logistic_1"}}}},
    {"input_edge": {"sender": "input_node", "receiver": "processing_node", "sender_port": "out_port",
                    "receiver_port": "input_port1", "parameters": {"weight": 0.55}}})

ARRAYS = model_of(
    {"input_node": {"parameters": {"input_level": {"value": [[1, 2.0], [3, 4]]}},
                    "output_ports": {"out_port": {"value": "input_level"}}},
     "middle_node": {
         "input_ports": {"input_port1": {}},
         "parameters": {"slope": {"value": 0.5}, "intercept": {"value": [[0.0, 1.0], [2.0, 2.0]]},
                        "linear_1": {"function": "linear", "args": {"variable0": "input_port1", "slope": "slope",
                                                                     "intercept": "intercept"}}},
         "output_ports": {"output_1": {"value": "linear_1"}}}},
    {"input_edge": {"sender": "input_node", "receiver": "middle_node", "sender_port": "out_port",
                    "receiver_port": "input_port1", "parameters": {"weight": [[1, 0], [0.5, 1]]}}})

ABCD_V01 = model_of(   # MDF v0.1 style: plain parameter values, shapes as strings
    {"input0": {"parameters": {"input_level": 0.3}, "output_ports": {"out_port": {"value": "input_level"}}},
     "A": {"parameters": {"slope": 2.1, "intercept": 2.2}, "input_ports": {"input_port1": {"shape": "(1,)"}},
           "functions": {"linear_func": {"function": "linear", "args": {"variable0": "input_port1", "slope": "slope",
                                                                         "intercept": "intercept"}}},
           "output_ports": {"output_1": {"value": "linear_func"}}},
     "B": {"parameters": {"gain": 1.5, "bias": 0.1, "offset": -0.2}, "input_ports": {"input_port1": {"shape": "(1,)"}},
           "functions": {"logistic_func": {"function": "logistic", "args": {"variable0": "input_port1", "gain": "gain",
                                                                             "bias": "bias", "offset": "offset"}}},
           "output_ports": {"output_1": {"value": "logistic_func"}}},
     "C": {"parameters": {"scale": 1.2, "rate": 0.7, "bias": 0.0, "offset": 0.3},
           "input_ports": {"input_port1": {"shape": "(1,)"}},
           "functions": {"exponential_func": {"function": "exponential", "args": {
               "variable0": "input_port1", "scale": "scale", "rate": "rate", "bias": "bias", "offset": "offset"}}},
           "output_ports": {"output_1": {"value": "exponential_func"}}},
     "D": {"parameters": {"scale": 0.9}, "input_ports": {"input_port1": {"shape": "(1,)"}},
           "functions": {"sin_func": {"function": "sin", "args": {"variable0": "input_port1", "scale": "scale"}}},
           "output_ports": {"output_1": {"value": "sin_func"}}}},
    {f"e{i}": {"sender": s, "receiver": r, "sender_port": sp, "receiver_port": "input_port1"}
     for i, (s, sp, r) in enumerate([("input0", "out_port", "A"), ("A", "output_1", "B"), ("B", "output_1", "C"),
                                     ("C", "output_1", "D")])})

PARAMS_FUNCS = model_of(
    {"node0": {"functions": {"function_inbuilt_with_args": {"function": "linear", "args": {
        "variable0": 1, "slope": 2, "intercept": 3}},
        "function_with_value_args": {"args": {"A": 1, "B": 2, "C": 3}, "value": "A + B * C"}},
        "parameters": {"param_fixed_int": {"value": 1}, "param_fixed_float": {"value": 2.0},
                       "param_array_list": {"value": [3, 4.0]},
                       "param_expression": {"value": "param_fixed_int + param_fixed_float * param_array_list"},
                       "param_function": {"function": "linear", "args": {"variable0": 1, "slope": 2, "intercept": 3}}},
        "output_ports": {"out_expr": {"value": "param_expression"},
                         "out_fn": {"value": "function_with_value_args + function_inbuilt_with_args"}}}})


@pytest.mark.parametrize("name,d,node,port", [
    ("Simple", SIMPLE, "processing_node", "output_1"),
    ("Arrays", ARRAYS, "middle_node", "output_1"),
    ("ABCD-v0.1", ABCD_V01, "D", "output_1"),
    ("ParametersFunctions", PARAMS_FUNCS, "node0", "out_expr"),
    ("ParametersFunctions-fn", PARAMS_FUNCS, "node0", "out_fn"),
])
def test_closed_hand_written_graphs_evaluate_once_like_evaluable_graph(name, d, node, port, tmp_path, strict_gpu):
    prog = compile(d, device="cpu")
    assert prog.inputs == [] and prog.dtype == np.float64          # expressions compute in float64
    out = prog.run()
    got = out[port] if isinstance(out, dict) else out
    # modeci_mdf 0.4 no longer reads v0.1 files: it evaluates their v0.4 spelling
    np.testing.assert_allclose(got, eg_value(_v04(d), tmp_path, node, port), rtol=1e-12)
    gpu = compile(d, device=strict_gpu)
    out = gpu.run()
    np.testing.assert_allclose(out[port] if isinstance(out, dict) else out, got, rtol=1e-12)


def test_unfed_ports_take_default_value_or_zeros(tmp_path):
    nodes = {"n": {"input_ports": {"a": {"shape": [2, 3], "type": "float"},
                                   "b": {"shape": [3], "default_value": [0.5, -1.0, 2.0]},
                                   "c": {"shape": [1, 3], "type": "int64"}},
                   "functions": {"f": {"value": "a * 2 + b + c"}},
                   "output_ports": {"y": {"value": "f"}}}}
    d = model_of(nodes)
    prog = compile(d, device="cpu")
    assert [p.name for p in prog.inputs] == ["a", "b", "c"] and all(p.default is not None for p in prog.inputs)
    np.testing.assert_allclose(prog.run(), eg_value(d, tmp_path, "n", "y"))     # nothing fed: like EvaluableGraph
    a = F.R.standard_normal((2, 3))
    np.testing.assert_allclose(prog.run({"a": a}), eg_value(d, tmp_path, "n", "y", {"a": a}))
    c = np.array([[1, 2, 3]], np.int64)
    np.testing.assert_allclose(prog.run({"a": a, "c": c}), eg_value(d, tmp_path, "n", "y", {"a": a, "c": c}))
    with pytest.raises(DataError, match="unknown graph input"):
        prog.run({"z": a})


def test_ids_that_are_not_identifiers_are_references(tmp_path):
    nodes = {"/A/Add": {"input_ports": {"onnx::x_0": {"shape": [2, 2]}},
                        "parameters": {"/A/w": {"value": [[1.5, -2.0], [0.25, 3.0]]},
                                       "/A/Add": {"function": "onnx::Add", "args": {"A": "onnx::x_0", "B": "/A/w"}},
                                       "/A/MaxPool": {"function": "onnx::MaxPool",
                                                      "args": {"X": "/A/Add:4d"}, },
                                       "/A/Add:4d": {"function": "onnx::Unsqueeze", "args": {"data": "/A/Add"}},
                                       "axes": {"value": [0, 1]}, "kernel_shape": {"value": [1, 2]}},
                        "output_ports": {"onnx::y_0": {"value": "/A/MaxPool[0]"}, "plain": {"value": "/A/MaxPool"},
                                         "idx": {"value": "/A/MaxPool[1]"}}}}
    prog = compile(model_of(nodes), device="cpu")
    x = F.R.standard_normal((2, 2)).astype(np.float32)
    out = prog.run(x)
    s = (x + np.array([[1.5, -2.0], [0.25, 3.0]], np.float32))[None, None]
    np.testing.assert_allclose(out["onnx::y_0"], s.max(axis=3, keepdims=True))
    np.testing.assert_allclose(out["plain"], out["onnx::y_0"])          # a plain reference: the first output
    np.testing.assert_array_equal(out["idx"], s.argmax(axis=3)[..., None] + np.array([[0], [2]]))


def test_pytorch_style_selectors_lists_constants_and_old_declared_opset():
    model = F.cnn_pool()
    d, weights, (onode, oport) = F.pytorch_style(model, declared_opset=9)
    text = json.dumps(d)
    assert '"onnx_opset_version": 9' in text and "onnx_MaxPool_1[0]" in text and "onnx_Constant_1" not in text
    model = F.channel_shuffle()
    d, weights, _ = F.pytorch_style(model)
    text = json.dumps(d)
    assert "onnx_Constant_1" in text and "\"['_" in text                    # Constant nodes, string lists
    x = _x(model)
    np.testing.assert_allclose(compile(d, device="cpu", constants=weights).run(x), F.run_ort(model, x), atol=1e-5)


@pytest.mark.parametrize("function, args", [
    ("logistic", {"gain": 3, "bias": 0, "offset": 0}), ("logistic", {"gain": 1.5, "bias": 0.25, "offset": -1}),
    ("linear", {"slope": 2, "intercept": 1}), ("exponential", {"scale": 2, "rate": 1, "bias": 0, "offset": 1}),
    ("sin", {"scale": 2}), ("tanh", {"scale": 1}), ("Relu", {})])
@pytest.mark.parametrize("expr", [None, "{v} * 2.5 + 1", "exp(-1 * {v}) + 0.5"])
def test_scalar_graphs_keep_a_forced_float32_on_any_numpy(function, args, expr):
    """A standard function or an expression on a 0-d value with integer and float
    literals. Before, on NumPy 1.x (value-based casting): logistic's ``1 / (1 + ...)`` and
    ``-1 * gain`` made a forced float32 program float64 (make test-lowest runs this on
    NumPy 1.23; NumPy 2 kept float32)."""
    arg = "A" if function == "Relu" else "variable0"
    params = {"f": {"function": function, "args": {arg: "x", **args}}}
    if expr:
        params["g"] = {"value": expr.format(v="f")}
    d = model_of(
        {"a": {"parameters": {"level": {"value": 0.75}}, "output_ports": {"out": {"value": "level"}}},
         "b": {"input_ports": {"x": {}}, "parameters": params,
               "output_ports": {"y_out": {"value": "g" if expr else "f"}}}},
        {"e": {"sender": "a", "receiver": "b", "sender_port": "out", "receiver_port": "x",
               "parameters": {"weight": 0.5}}})
    got = compile(d, device="cpu", dtype="float32").run()
    assert got.dtype == np.float32, (function, expr, got.dtype)
    want = compile(d, device="cpu").run()                  # float64, as modeci_mdf computes
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_numerics_follow_the_file_and_dtype_forces():
    prog = compile(SIMPLE, device="cpu")
    assert prog.dtype == np.float64 and prog.run().dtype == np.float64
    prog32 = compile(SIMPLE, device="cpu", dtype="float32")
    assert prog32.run().dtype == np.float32
    np.testing.assert_allclose(prog32.run(), prog.run(), rtol=1e-6)
    mdf, weights = F.import_onnx(F.mlp_gemm())
    assert compile(mdf.to_dict(), device="cpu", constants=weights).dtype == np.float32
    assert compile(mdf.to_dict(), device="cpu", constants=weights, dtype="float64").dtype == np.float64


@pytest.mark.parametrize("nodes,match", [
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"p": {"function": "onnx::Reshape", "args": {"data": "x", "shape": [2, 2]}},
                           "q": {"function": "onnx::Relu", "args": {"X": "p", "alpha": 1}}},
            "output_ports": {"y": {"value": "q"}}}}, "no argument 'alpha'"),
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"p": {"function": "onnx::Softmax", "args": {"input": "x", "axis": "x"}}},
            "output_ports": {"y": {"value": "p"}}}}, "attribute axis .* depends on the input"),
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"p": {"function": "onnx::LSTM", "args": {"X": "x"}}},
            "output_ports": {"y": {"value": "p"}}}}, "not in the batch engine's table"),
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"p": {"function": "onnx::TopK", "args": {"X": "x", "K": [2]}}},
            "output_ports": {"y": {"value": "p[2]"}}}}, "output 2 is read"),
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"mode": {"value": "reflect"}, "p": {"function": "onnx::Relu", "args": {"X": "mode"}}},
            "output_ports": {"y": {"value": "p"}}}}, "string 'reflect', not a tensor"),
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"big": {"function": "onnx::ConstantOfShape", "args": {"input": [100000, 100000]}}},
            "output_ports": {"y": {"value": "big"}}}}, "exceeds the compile-time limit"),
    ({"n": {"input_ports": {"x": {"shape": [1, 4]}},
            "parameters": {"p": {"value": "[0] * 30000000"}},
            "output_ports": {"y": {"value": "p"}}}}, "arithmetic on a list literal"),
])
def test_refusals_are_one_clear_line(nodes, match):
    with pytest.raises(CompileError, match=match):
        compile(model_of(nodes), device="cpu")


def test_bare_word_string_attributes_and_list_of_names():
    nodes = {"n": {"input_ports": {"x": {"shape": [1, 2, 3]}, "y": {"shape": [1, 2, 3]}},
                   "parameters": {"mode": {"value": "reflect"}, "pads": {"value": [0, 0, 1, 0, 0, 1]},
                                  "p": {"function": "onnx::Pad", "args": {"data": "x"}},
                                  "cat": {"function": "onnx::Concat", "args": {"inputs": "['p', 'p2']", "axis": 0}},
                                  "p2": {"function": "onnx::Pad", "args": {"data": "y", "mode": "edge"}}},
                   "output_ports": {"o": {"value": "cat"}}}}
    prog = compile(model_of(nodes), device="cpu")
    x, y = F.R.standard_normal((2, 1, 2, 3)).astype(np.float32)
    out = prog.run({"x": x, "y": y})
    np.testing.assert_allclose(out, np.concatenate([np.pad(x, [(0, 0), (0, 0), (1, 1)], mode="reflect"),
                                                    np.pad(y, [(0, 0), (0, 0), (1, 1)], mode="edge")]))


def test_squeezenet_at_opset_9_follows_its_opset():
    """SqueezeNet 1.0 (the model zoo's opset-9 architecture, random weights): its Softmax on a
    (1, 1000, 1, 1) tensor flattens from axis 1 before opset 13. Read at opset 17 (what a file
    that does not say its opset gets), every class would have probability 1; with --opset 9
    (onnx_to_mdf drops it) and through gpu-mdf's importer (which records it) it matches ONNX Runtime."""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    model = F.squeezenet(opset=9)
    x = F.R.standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = F.run_ort(model, x)
    # a distribution over the classes (sums to 1), not 1000 ones
    assert want.shape == (1, 1000, 1, 1) and want.max() < 0.99 and abs(want.sum() - 1) < 1e-4
    mdf, weights = F.import_onnx(model)
    d = mdf.to_dict()
    np.testing.assert_allclose(compile(d, device="cpu", constants=weights, opset=9).run({"x": x}), want,
                               rtol=1e-4, atol=1e-7)
    assert np.allclose(compile(d, device="cpu", constants=weights).run({"x": x}), 1.0)   # opset 17's meaning
    ours = compile(onnx_to_mdf_doc(model), device="cpu")
    np.testing.assert_allclose(ours.run(x), want, rtol=1e-4, atol=1e-7)


def test_vgg19_at_224_compiles_with_its_weights_and_matches_onnxruntime():
    """102.8M weights in one layer: bound data of the caller, never a hostile expansion."""
    model = F.vgg19()
    x = F.R.standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = F.run_ort(model, x)
    mdf, weights = F.import_onnx(model)
    del model
    got = compile(mdf.to_dict(), device="cpu", constants=weights).run({"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
