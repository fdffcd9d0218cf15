"""gpu-mdf bench and plot on every model infer accepts: several outputs (with the
TensorFlow rows), --constants, graphs imported by modeci_mdf's onnx_to_mdf (a symbolic
batch size) and in PyTorch-exporter conventions."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gpu_mdf import extras
from gpu_mdf.cli import main

pytest.importorskip("modeci_mdf", reason="imported graphs are made with modeci_mdf's onnx_to_mdf ([mdf])")
F = pytest.importorskip("mdf_fixtures", reason="the ONNX fixtures need onnx ([mdf])")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def bench(*args):
    r = invoke("bench", *args, "--repeats", "2")
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """onnx_to_mdf's import of an MLP whose batch size is the symbolic "n" (modeci_mdf
    writes it into the port's shape and cannot read it back), its weights as a .npz."""
    folder = tmp_path_factory.mktemp("imported")
    model = F.mlp_gemm()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "n"
    mdf, weights = F.import_onnx(model)
    (folder / "m.json").write_text(mdf.to_json())
    np.savez(folder / "w.npz", **weights)
    d, w, _ = F.pytorch_style(F.mlp_gemm())
    (folder / "torch.json").write_text(json.dumps(d))
    np.savez(folder / "torch.npz", **w)
    return folder


def test_bench_compares_every_output_of_a_two_output_keras_model(tmp_path):
    """Before: ValueError: inhomogeneous shape (Keras's list of outputs made one array)."""
    pytest.importorskip("tensorflow", reason="the TensorFlow rows need TensorFlow")
    import keras

    from gpu_mdf.convert import keras_to_mdf, save_mdf
    x = keras.Input((28, 28), name="pixels")
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(x))
    model = keras.Model(x, [keras.layers.Dense(1, activation="sigmoid", name="is_even")(h),
                            keras.layers.Dense(10, activation="softmax", name="digit")(h)])
    model.save(tmp_path / "two.keras")
    save_mdf(keras_to_mdf(model, normalize="l2"), tmp_path / "two.mdf.json")
    bench(tmp_path / "two.mdf.json", "--keras-model", tmp_path / "two.keras", "--batch", "256", "--skip",
          "evaluablegraph", "--json-out", tmp_path / "b.json")
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    tf_rows = [r for r in rows if "TensorFlow" in r["engine"]]
    assert len(tf_rows) == 2 and all(r["max_abs_diff_vs_gpu_mdf"] < 1e-5 for r in rows), rows


def test_bench_with_constants_on_an_imported_graph_with_a_symbolic_size(imported, tmp_path):
    """Before: invalid literal for int() with base 10: 'n' (modeci_mdf reading its own import)."""
    out = bench(imported / "m.json", "--constants", imported / "w.npz", "--stream", "3000", "--skip", "tensorflow",
                "--json-out", tmp_path / "b.json")
    result = json.loads((tmp_path / "b.json").read_text())
    engines = [r["engine"] for r in result["rows"]]
    assert "modeci_mdf EvaluableGraph" in engines, out
    assert all(r["max_abs_diff_vs_gpu_mdf"] < 1e-5 for r in result["rows"])
    assert result["stream"]["images"] == 3000


def test_bench_on_a_pytorch_style_import(imported):
    out = bench(imported / "torch.json", "--constants", imported / "torch.npz", "--skip", "tensorflow")
    assert "gpu-mdf (NumPy, CPU)" in out and "modeci_mdf EvaluableGraph" in out


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")
def test_plot_draws_an_imported_graph(imported, tmp_path):
    """Before: a traceback (modeci_mdf cannot read the symbolic size its importer wrote)."""
    r = invoke("plot", imported / "m.json", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert all((tmp_path / f"mdf_graph_level{k}.png").read_bytes()[:4] == b"\x89PNG" for k in (1, 3))


def test_plot_names_the_missing_extra_before_graphviz(imported, tmp_path, monkeypatch):
    """A slim install (no modeci_mdf) on a machine without Graphviz: the [mdf] hint, the
    fix it needs first (before: "Graphviz's 'dot' is not on PATH")."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    real = extras.installed
    monkeypatch.setattr(extras, "installed", lambda m: m != "modeci_mdf" and real(m))
    monkeypatch.setattr("gpu_mdf.viz.installed", extras.installed)
    r = invoke("plot", imported / "m.json", "--out", tmp_path)
    assert r.exit_code == 2 and "pip install 'gpu-mdf[mdf]'" in r.output and r.output.count("\n") == 1
