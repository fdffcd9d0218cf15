"""ONNX as a front door: gpu-mdf's own importer and ``gpu-mdf convert model.onnx``.

Models built with onnx.helper (every weight random and non-zero), compared with ONNX
Runtime on the original file, and where it can run them with modeci_mdf's EvaluableGraph
on the written MDF file.
"""

import json

import mdf_fixtures as F
import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from gpu_mdf.cli import main  # noqa: E402
from gpu_mdf.convert.onnx import load_onnx, onnx_to_mdf_doc  # noqa: E402
from gpu_mdf.engine import compile  # noqa: E402
from gpu_mdf.errors import GpuMdfError, ModelFileError  # noqa: E402
from gpu_mdf.mdf import GraphMeta, mdf_graph, safe_id  # noqa: E402


def _x(model, batch=None):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if batch:
        shape[0] = batch
    return F.R.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", list(F.MODELS))
def test_converted_file_is_self_contained_and_matches_onnxruntime(name, tmp_path):
    model = F.MODELS[name]()
    onnx.save(model, tmp_path / f"{name}.onnx")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / f"{name}.onnx"), "--out", str(tmp_path / "o"),
                                  "--normalize", "none"])
    assert r.exit_code == 0, r.output
    path = tmp_path / "o" / f"{name}.mdf.json"
    x = _x(model)
    np.testing.assert_allclose(compile(path, device="cpu").run({"x": x}), F.run_ort(model, x), rtol=1e-5, atol=1e-6)
    doc = json.loads(path.read_text())
    graph = mdf_graph(doc)
    meta = GraphMeta.of(graph)
    assert meta.inputs == ["x"] and meta.opset == 15 and meta.normalize == "none"
    ids = set(graph["nodes"])
    assert {safe_id(n.name) for n in model.graph.node if n.op_type != "Constant"} <= ids, ids


def test_names_strings_multi_outputs_and_dynamic_batch(tmp_path):
    """ONNX input and output names survive, string attributes are strings, a multi-output
    op's ports read op[i], a free batch dimension is the batch axis."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4, 6])
    nodes = [helper.make_node("Split", ["image"], ["a", "b"], name="halves", axis=2, num_outputs=2),
             helper.make_node("Pad", ["b", "pads"], ["padded"], name="pad", mode="reflect"),
             helper.make_node("TopK", ["a", "k"], ["values", "indices"], name="top", axis=-1)]
    inits = [onnx.numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 1], np.int64), "pads"),
             onnx.numpy_helper.from_array(np.array([2], np.int64), "k")]
    outs = [helper.make_tensor_value_info(n, t, s) for n, t, s in
            (("padded", TensorProto.FLOAT, ["batch", 4, 5]), ("indices", TensorProto.INT64, ["batch", 4, 2]),
             ("values", TensorProto.FLOAT, ["batch", 4, 2]))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    doc = onnx_to_mdf_doc(model, normalize="none")
    graph = mdf_graph(doc)
    meta = GraphMeta.of(graph)
    assert meta.inputs == ["image"] and meta.outputs == ["padded", "indices", "values"] and meta.batch_axis == 0
    assert graph["nodes"]["pad"]["functions"]["Pad"]["args"]["mode"] == "reflect"
    assert {p["value"] for p in graph["nodes"]["top"]["output_ports"].values()} == {"TopK[0]", "TopK[1]"}
    prog = compile(doc, device="cpu")
    xv = F.R.standard_normal((5, 4, 6)).astype(np.float32)
    got = prog.run(xv)
    want = F.run_ort_all(model, {"image": xv})
    for k, name in enumerate(meta.outputs):
        np.testing.assert_array_equal(got[name], want[k])
        assert got[name].dtype == want[k].dtype


def test_float64_and_integer_weights_keep_their_type(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])
    w = onnx.numpy_helper.from_array(F.R.standard_normal((3, 3)) * 1e200, "w")      # past float32's range
    i = onnx.numpy_helper.from_array(np.array([[1, -7, 3]], np.int32), "i")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Cast", ["i"], ["i64"], name="cast", to=TensorProto.INT64),
             helper.make_node("Div", ["i64", "three"], ["q"], name="div")]
    three = onnx.numpy_helper.from_array(np.array([3], np.int64), "three")
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", 11, [2, 3]),
                                                                  helper.make_tensor_value_info("q", 7, [1, 3])],
                                                [w, i, three]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.mdf.json"
    from gpu_mdf.mdf import save_mdf
    save_mdf(onnx_to_mdf_doc(model, normalize="none"), path)
    out = compile(path, device="cpu").run({"x": np.ones((2, 3))})
    assert out["y"].dtype == np.float64 and np.isfinite(out["y"]).all() and np.abs(out["y"]).max() > 1e199
    np.testing.assert_array_equal(out["q"], [[0, -2, 1]])       # truncated toward zero, int64


def test_external_data_is_read_inside_the_folder_and_refused_outside(tmp_path):
    model = F.cnn_pool()
    x = _x(model)
    want = F.run_ort(model, x)
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 1000
    np.testing.assert_allclose(compile(onnx_to_mdf_doc(load_onnx(folder / "m.onnx")), device="cpu").run(x),
                               want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelFileError, match="not accepted here"):
        load_onnx(folder / "m.onnx", allow_external_data=False)
    evil = onnx.load(folder / "m.onnx", load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((folder / "weights.bin").read_bytes())
    onnx.save(evil, folder / "evil.onnx")
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        load_onnx(folder / "evil.onnx")


@pytest.mark.parametrize("node,match", [
    (helper.make_node("LabelEncoder", ["x"], ["y"], domain="ai.onnx.ml", name="enc"), "ai.onnx.ml.LabelEncoder"),
    (helper.make_node("NonMaxSuppression", ["x", "x"], ["y"], name="nms"), "NonMaxSuppression is not in"),
])
def test_other_domains_and_unclaimed_ops_are_refused_by_name(node, match):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    with pytest.raises(GpuMdfError, match=match):
        onnx_to_mdf_doc(model)


def test_control_flow_is_refused_with_its_reason():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then, name="branch")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(GpuMdfError, match="control flow"):
        onnx_to_mdf_doc(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_malformed_and_mislabelled_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12garbage that is not a protobuf message at all" * 3)
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        load_onnx(bad)
    r = CliRunner().invoke(main, ["convert", str(bad), "--out", str(tmp_path / "o"), "--normalize", "none"])
    assert r.exit_code == 1 and "FAIL" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("name", ["mlp_gemm", "mobilenet_block"])
def test_modeci_evaluable_graph_runs_the_converted_file(name, tmp_path):
    """The file is plain MDF that modeci_mdf's own engine runs (with ONNX Runtime per op)."""
    pytest.importorskip("modeci_mdf")
    from gpu_mdf.mdf import save_mdf
    model = F.MODELS[name]()
    path = save_mdf(onnx_to_mdf_doc(model, normalize="none"), tmp_path / "m.json")
    from modeci_mdf.utils import load_mdf
    meta = GraphMeta.of(mdf_graph(json.loads(path.read_text())))
    x = _x(model)
    got = F.run_eg(load_mdf(str(path)), {meta.inputs[0]: x}, *_output_node_port(path, meta.outputs[0]))
    np.testing.assert_allclose(np.asarray(got, np.float32), F.run_ort(model, x), rtol=1e-5, atol=1e-6)


def _output_node_port(path, port):
    graph = mdf_graph(json.loads(path.read_text()))
    node = next(n for n, v in graph["nodes"].items() if port in v.get("output_ports", {}))
    return node, port


def test_convert_never_guesses_the_normalisation(tmp_path):
    """Without --normalize a model that does not state its preprocessing is refused with the
    reason; a Keras model that rescales its input itself, or one gpu-mdf trained (its
    train_metrics.json beside it), states it."""
    keras = pytest.importorskip("keras")
    onnx.save(F.mlp_gemm(), tmp_path / "mlp.onnx")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "mlp.onnx"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not say how its input was normalised" in r.output and "--normalize" in r.output
    rescaled = keras.Sequential([keras.Input((28, 28)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                 keras.layers.Dense(10)])
    rescaled.save(tmp_path / "rescaled.keras")
    plain = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(10)])
    (tmp_path / "run").mkdir()
    plain.save(tmp_path / "run" / "model.keras")
    (tmp_path / "run" / "train_metrics.json").write_text(json.dumps({"config": {"data": {"normalize": "scale"}}}))
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "rescaled.keras"), str(tmp_path / "run" / "model.keras"),
                                  "--out", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
    assert "normalize=none: its first layer (Rescaling" in r.output
    assert "normalize=scale: train_metrics.json" in r.output
    recorded = {p.name: GraphMeta.of(mdf_graph(json.loads(p.read_text()))).normalize
                for p in (tmp_path / "o2").iterdir()}
    assert recorded == {"rescaled.mdf.json": "none", "model.mdf.json": "scale"}


def test_a_folder_mixing_onnx_and_keras_and_a_keras_file_named_h5(tmp_path):
    keras = pytest.importorskip("keras")
    (tmp_path / "models").mkdir()
    onnx.save(F.mlp_gemm(), tmp_path / "models" / "a.onnx")
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(tmp_path / "models" / "b.keras")
    (tmp_path / "models" / "b.keras").rename(tmp_path / "models" / "c.h5")        # a zip archive named .h5
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "models"), "--out", str(tmp_path / "o"),
                                  "--normalize", "none"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.mdf.json", "c.mdf.json"]


def test_bson_refuses_a_document_past_2_gib_with_the_reason(tmp_path, monkeypatch):
    from gpu_mdf.mdf import bson, save_mdf
    monkeypatch.setattr(bson, "MAX_DOCUMENT", 10_000)
    doc = onnx_to_mdf_doc(F.cnn_pool(), normalize="none")
    with pytest.raises(GpuMdfError, match="over BSON's limit .* write JSON instead"):
        save_mdf(doc, tmp_path / "m.mdf.bson")
    assert not (tmp_path / "m.mdf.bson").exists()


def test_info_describes_an_onnx_or_mdf_model(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_MDF_CACHE", str(tmp_path / "cache"))
    onnx.save(F.mlp_gemm(), tmp_path / "mlp.onnx")
    r = CliRunner().invoke(main, ["info", str(tmp_path / "mlp.onnx")])
    assert r.exit_code == 0, r.output
    assert "onnx model" in r.output and "opset 15" in r.output and "inputs:  x (2, 3, 4, 4) float32" in r.output
    assert "normalisation of integer pixels: not recorded" in r.output and "Gemm" in r.output
    cached = list((tmp_path / "cache" / "onnx").glob("*.mdf.bson"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    r = CliRunner().invoke(main, ["info", str(tmp_path / "mlp.onnx"), "--json"])        # converted once
    assert json.loads(r.output)["kind"] == "onnx" and list((tmp_path / "cache" / "onnx").iterdir()) == cached
    assert cached[0].stat().st_mtime_ns >= mtime


def test_the_onnx_cache_stays_within_its_bytes(tmp_path, monkeypatch):
    from gpu_mdf.convert import sources
    monkeypatch.setenv("GPU_MDF_CACHE", str(tmp_path / "cache"))
    paths = []
    for i, name in enumerate(["mlp_gemm", "cnn_pool", "mobilenet_block"]):
        onnx.save(F.MODELS[name](), tmp_path / f"{i}.onnx")
        paths.append(sources.mdf_for(tmp_path / f"{i}.onnx", "none"))
    sizes = [p.stat().st_size for p in paths]
    monkeypatch.setattr(sources, "CACHE_LIMIT_BYTES", sizes[-1] + sizes[-2])
    again = sources.mdf_for(tmp_path / "1.onnx", "scale")            # another normalisation: another entry
    kept = sorted((tmp_path / "cache" / "onnx").glob("*.mdf.bson"))
    assert again in kept and sum(p.stat().st_size for p in kept) <= sizes[-1] + sizes[-2] + again.stat().st_size
    assert paths[0] not in kept                                         # the least recently used went first


def _mnist_onnx(path):
    """A random-weight MNIST classifier as ONNX: (N, 1, 28, 28) float pixels -> 10 probabilities."""
    b = F.Builder()
    h = b.op("Relu", [b.op("Gemm", [b.op("Flatten", ["x"], axis=1), b.init("w1", F.w(784, 32, scale=0.05)),
                                     b.init("b1", F.w(32))])])
    y = b.op("Softmax", [b.op("Gemm", [h, b.init("w2", F.w(32, 10)), b.init("b2", F.w(10))])], axis=-1)
    model = b.model("x", ["N", 1, 28, 28], [y], opset=17)
    onnx.save(model, path)
    return model


def test_infer_takes_an_onnx_model_and_asks_for_its_normalisation(tmp_path, monkeypatch):
    import onnxruntime as ort

    from gpu_mdf.data import load_mnist
    monkeypatch.setenv("GPU_MDF_CACHE", str(tmp_path / "cache"))
    model = _mnist_onnx(tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "a"), "--no-progress"])
    assert r.exit_code != 0 and "does not record how its pixels were normalised" in r.output
    assert "--normalize" in r.output and not (tmp_path / "a").exists()
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "m.onnx"), "--normalize", "scale", "--out",
                                  str(tmp_path / "b"), "--no-progress"])
    assert r.exit_code == 0, r.output
    (_, _), (xte, _) = load_mnist()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": (xte / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)})[0].argmax(1)
    import csv
    with open(tmp_path / "b" / "predictions.csv") as f:
        got = np.array([int(row["predicted"]) for row in csv.DictReader(f)])
    assert len(got) == len(want) == 10000 and (got == want).all()


def test_bench_runs_onnx_runtime_on_the_onnx_file_itself_and_counts_on_the_standin(tmp_path, monkeypatch):
    from gpu_mdf.engine import standin
    monkeypatch.setenv("GPU_MDF_CACHE", str(tmp_path / "cache"))
    _mnist_onnx(tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "m.onnx"), "--batch", "256", "--repeats", "2", "--skip",
                                  "evaluablegraph", "--standin", "--json-out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = {row["engine"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    ort_row = next(k for k in rows if k.startswith("ONNX Runtime"))
    assert "the original ONNX file" in ort_row and rows[ort_row]["max_abs_diff_vs_gpu_mdf"] < 1e-4
    assert "gpu-mdf (NumPy, CPU, as written: optimize=False)" in rows
    if standin.c_compiler() is None:
        assert "no C compiler" in r.output
        return
    counts = json.loads((tmp_path / "b.json").read_text())["standin"]
    # Gemm, then bias + Relu; Gemm, then bias + softmax as one row kernel
    assert counts["optimised"]["launches"] == 4 < counts["as written"]["launches"]
    assert counts["optimised"]["new_bytes"] == 0 and "kernel launches 4 optimised" in r.output
    # a replay: the input copied in, the graph, the output copied out (the float input needs no normalising)
    assert counts["CUDA graphs"]["launches"] == 3 and counts["CUDA graphs"]["new_bytes"] == 0


def test_plot_draws_an_onnx_model(tmp_path, monkeypatch):
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz)")
    pytest.importorskip("modeci_mdf")
    monkeypatch.setenv("GPU_MDF_CACHE", str(tmp_path / "cache"))
    _mnist_onnx(tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "m.onnx"), "--level", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mdf_graph_level1.png").read_bytes()[:4] == b"\x89PNG"


def test_infer_says_which_normalisation_and_who_said_so(tmp_path, monkeypatch):
    """A file that records none is fed as it is, and infer says so; --normalize is named."""
    from gpu_mdf.mdf import load_mdf, save_mdf
    monkeypatch.setenv("GPU_MDF_CACHE", str(tmp_path / "cache"))
    _mnist_onnx(tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "m.onnx"), "--normalize", "scale", "--out",
                                  str(tmp_path / "a"), "--no-progress"])
    assert r.exit_code == 0 and "pixel normalisation: scale (--normalize)" in r.output, r.output
    doc = load_mdf(next((tmp_path / "cache").rglob("*.mdf.bson")))
    graph = next(iter(doc.values()))["graphs"]
    gid = next(iter(graph))
    graph[gid]["metadata"]["gpu_mdf"].pop("normalize", None)
    save_mdf(doc, tmp_path / "plain.json")
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "plain.json"), "--out", str(tmp_path / "b"), "--no-progress"])
    assert r.exit_code == 0 and "the model records none, so integer pixels are fed as they are" in r.output, r.output
    save_mdf(load_mdf(next((tmp_path / "cache").rglob("*.mdf.bson"))), tmp_path / "scaled.json")
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "scaled.json"), "--out", str(tmp_path / "c"),
                                  "--no-progress"])
    assert r.exit_code == 0 and "pixel normalisation: scale (recorded in the model)" in r.output, r.output


def test_infer_opset_for_a_file_that_does_not_say_it(tmp_path, monkeypatch):
    """SqueezeNet's softmax on (N, 1000, 1, 1) at opset 9 flattens from axis 1: read at opset
    17 (what a file without its opset gets) every class would be 1.0; --opset 9 says it."""
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    from gpu_mdf.mdf import save_mdf
    model = F.squeezenet(opset=9, size=64, classes=10)
    doc = onnx_to_mdf_doc(model)
    graph = next(iter(doc.values()))["graphs"]
    next(iter(graph.values()))["metadata"]["gpu_mdf"].pop("opset")          # as onnx_to_mdf would write it
    save_mdf(doc, tmp_path / "sq.json")
    x = F.R.standard_normal((1, 3, 64, 64)).astype(np.float32)         # the zoo's model takes one image
    np.save(tmp_path / "x.npy", x)
    want = F.run_ort(model, x).reshape(1, 10)
    for opset, expect in ((None, np.ones_like(want)), ("9", want)):
        args = ["infer", str(tmp_path / "sq.json"), "--data", str(tmp_path / "x.npy"), "--out",
                str(tmp_path / f"o{opset}"), "--no-progress", "--softmax", "no"]
        r = CliRunner().invoke(main, args + (["--opset", opset] if opset else []))
        assert r.exit_code == 0, r.output
        got = np.load(tmp_path / f"o{opset}" / "outputs" / next(
            p.name for p in (tmp_path / f"o{opset}" / "outputs").iterdir())).reshape(1, 10)
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "o9" / "job.json").read_text())["opset"] == 9
