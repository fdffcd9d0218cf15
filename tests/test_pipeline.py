import json
import shutil

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
                 "confusion_matrix.png", "report.md", "report.html", "inference/predictions.csv",
                 "inference/probabilities.npy", "inference/metrics.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "MDF test accuracy" in report and "![Confusion matrix](confusion_matrix.png)" in report
    assert "Total params" in report or "Trainable params" in report
    if shutil.which("dot"):
        assert (out / "mdf_graph_level1.png").exists() and (out / "mdf_graph_level3.png").exists()
        assert "mdf_graph_level3.png" in report
    else:
        assert "Skipped pictures" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2


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
