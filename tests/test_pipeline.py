import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpu_mdf.cli import main


@pytest.mark.slow
def test_run_produces_the_whole_run_folder(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--out", str(out), "--epochs", "1", "--train-limit", "5000",
                                  "--device", "cpu", "--no-progress", "--format", "both"])
    assert r.exit_code == 0, r.output
    for line in ("Keras test accuracy", "MDF test accuracy", "max |MDF - Keras|", "argmax agreement",
                 "images/s on cpu", "run folder"):
        assert line in r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["mdf_test_accuracy"] == pytest.approx(s["keras_test_accuracy"], abs=1e-4)
    assert s["max_abs_diff"] < 1e-5 and s["argmax_agreement"] == 1.0
    for name in ("model.keras", "model.h5", "model.mdf.json", "model.mdf.yaml", "summary.txt", "digit.png",
                 "confusion_matrix.png", "training_curves.png", "misclassified.png", "report.md", "report.html",
                 "inference/predictions.csv", "inference/probabilities.npy", "inference/metrics.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "MDF test accuracy" in report and "(confusion_matrix.png)" in report
    assert "Total params" in report or "Trainable params" in report
    if shutil.which("dot"):
        assert (out / "mdf_graph_level1.png").exists() and (out / "mdf_graph_level3.png").exists()
        assert "mdf_graph_level3.png" in report
    else:
        assert "Skipped pictures" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    # the page, as a browser shows it: every picture loads, with alt text; nothing errs
    from browser import page_report
    page = page_report(out / "report.html")
    assert len(page["images"]) >= 3 and all(i["loaded"] and i["alt"] for i in page["images"]), page["images"]
    assert page["errors"] == []
    for part in ("MDF test accuracy", "Per class", "precision", "Keras model", "Files", "Training curves",
                 "Misclassified digits"):
        assert part in page["text"], part
    from urllib.parse import unquote
    linked = {str(Path(unquote(link["href"][len("file://"):])).relative_to(out)) for link in page["links"]}
    assert {"inference/predictions.csv", "inference/metrics.json", "history.json", "model.mdf.json"} <= linked
    assert all((out / f).is_file() for f in linked), linked


def _fake_run(tmp_path):
    """A run folder as the pipeline leaves it, without training: pictures, files, results."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from gpu_mdf import viz
    from gpu_mdf.pipeline import RunSummary
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digit.png")
    (tmp_path / "summary.txt").write_text("Total params: 10")
    (tmp_path / "model.keras").write_bytes(b"PK")
    viz.plot_history({"loss": [0.9, 0.5, 0.3], "accuracy": [0.7, 0.85, 0.9], "val_loss": [0.8, 0.6, 0.5],
                      "val_accuracy": [0.75, 0.8, 0.82]}, tmp_path / "training_curves.png")
    digits = np.random.default_rng(0).integers(0, 255, (5, 28, 28)).astype(np.uint8)
    viz.plot_gallery(digits, np.array([1, 2, 3, 4, 5]), np.array([7, 7, 8, 9, 6]), np.full(5, 0.5),
                     tmp_path / "misclassified.png", "5 misclassified")
    mdf = tmp_path / "model.mdf.json"
    mdf.write_text("{}")
    (tmp_path / "inference" / "outputs").mkdir(parents=True)
    files = {"predictions": tmp_path / "inference" / "predictions.csv",
             "output:digit out": tmp_path / "inference" / "outputs" / "digit out.npy"}
    for f in files.values():
        f.write_text("x")
    per_class = {str(k): {"precision": 0.5, "recall": None if k == 3 else 0.25, "support": k} for k in range(10)}
    res = SimpleNamespace(device="cpu", metrics={"device_reason": "CPU requested", "per_class": per_class},
                          files=files)
    tr = SimpleNamespace(device="CPU", seconds=1.0, skipped=[("Keras model plot", "Graphviz's dot is missing")])
    summary = RunSummary(tmp_path, 0.9, 0.9, 1e-7, 1.0, 1000.0, "cpu", 2.0)
    return SimpleNamespace(name="t"), tr, res, summary, [mdf]


def test_html_report_has_everything_the_markdown_has(tmp_path):
    """Skipped-picture notes, the per-class table, the training curves, the gallery of
    misclassified digits and links to the files are on the page too."""
    from gpu_mdf.report import write_report
    cfg, tr, res, summary, mdf_paths = _fake_run(tmp_path)
    write_report(tmp_path, cfg, tr, res, summary, mdf_paths, [])
    md, html = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for part in ("Skipped pictures", "Keras model plot: Graphviz's dot is missing", "Per class",
                 "| 3 | 0.5000 | - | 3 |", "(training_curves.png)", "(misclassified.png)",
                 "[inference/predictions.csv](inference/predictions.csv)",
                 "(inference/outputs/digit%20out.npy)", "[model.keras](model.keras)"):
        assert part in md, part
    for part in ("Skipped pictures", "Keras model plot: Graphviz&#x27;s dot is missing", "Per class",
                 "<td>3</td><td>0.5000</td><td>-</td><td>3</td>", 'alt="The first test image',
                 'alt="Loss and accuracy per epoch', 'alt="Misclassified test images',
                 '<a href="inference/predictions.csv">'):
        assert part in html, part
    from browser import page_report
    page = page_report(tmp_path / "report.html")
    assert [i["loaded"] for i in page["images"]] == [True] * 3 and page["errors"] == []
    for part in ("Training curves", "Misclassified digits", "Files"):
        assert part in page["text"], part
    targets = [link["href"] for link in page["links"]]
    assert len(targets) == 5 and all(t.startswith("file://") for t in targets), targets
    from urllib.parse import unquote
    assert all(Path(unquote(t[len("file://"):])).is_file() for t in targets), targets


@pytest.mark.slow
def test_run_with_job_items(tmp_path, mnist):
    import numpy as np
    (_, _), (xte, _) = mnist
    np.save(tmp_path / "few.npy", xte[:100])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: withjobs
train: {{epochs: 1}}
data: {{train_limit: 2000}}
jobs:
  - {{data: {tmp_path / 'few.npy'}, name: few}}
  - {{data: {tmp_path / 'missing.npy'}, name: missing}}
""")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--config", str(cfg), "--out", str(out), "--device", "cpu",
                                  "--no-progress"])
    assert r.exit_code == 1, r.output          # one item failed
    assert "ok   few: 100 images" in r.output and "FAIL missing" in r.output
    assert (out / "jobs" / "few" / "predictions.csv").exists()
    assert "some job items failed" in r.output


@pytest.mark.slow
def test_autoencoder_config_runs_end_to_end_with_reconstruction_error(tmp_path):
    """configs/mnist_autoencoder.yaml (Conv2D down, Conv2DTranspose up): trained on its own
    input, converted, run as MDF; the summary and report give reconstruction error and
    input/reconstruction pairs instead of accuracy."""
    out = tmp_path / "ae"
    r = CliRunner().invoke(main, ["run", "--config", "configs/mnist_autoencoder.yaml", "--out", str(out),
                                  "--train-limit", "3000", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "MDF reconstruction MSE" in r.output and "accuracy" not in r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["max_abs_diff"] < 1e-5 and s["argmax_agreement"] is None and s["mdf_test_accuracy"] is None
    assert s["mdf_reconstruction_mse"] == pytest.approx(s["keras_reconstruction_mse"], rel=1e-4)
    assert 0 < s["mdf_reconstruction_mse"] < 0.06          # better than predicting the mean image
    assert (out / "reconstructions.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "reconstruction MSE" in report and "reconstructions.png" in report
