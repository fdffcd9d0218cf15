"""The routes from the big frameworks, run as their users would: PyTorch, TensorFlow and
scikit-learn models through ONNX into gpu-mdf (examples/), and torchvision's
classification models against ONNX Runtime (scripts/check_torchvision.py; a subset here,
the full table is the script's). Each framework is installed only for these tests."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "scripts")]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_pytorch_model_to_predictions_in_two_commands(tmp_path):
    pytest.importorskip("torch")
    import pytorch_mnist
    assert pytorch_mnist.main(["--out", str(tmp_path), "--train-limit", "5000"]) == 0
    s = _summary(tmp_path)
    assert s["agreeing_predictions"] == s["images"] == 10000 and s["gpu_mdf_accuracy"] == s["pytorch_accuracy"] > 0.8


def test_tensorflow_model_through_tf2onnx(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import tensorflow_mnist
    assert tensorflow_mnist.main(["--out", str(tmp_path), "--train-limit", "5000"]) == 0
    s = _summary(tmp_path)
    assert s["agreeing_predictions"] == s["images"] and s["gpu_mdf_accuracy"] == s["keras_accuracy"] > 0.5


def test_sklearn_classifier_through_skl2onnx_and_the_refusal_by_op(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    import sklearn_mnist
    assert sklearn_mnist.main(["--out", str(tmp_path), "--train-limit", "3000", "--iterations", "10"]) == 0
    s = _summary(tmp_path)
    assert s["agreeing_predictions"] == s["images"] and s["gpu_mdf_accuracy"] == s["sklearn_accuracy"] > 0.8
    assert "ai.onnx.ml.LinearClassifier" in s["logistic_regression"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0"])
def test_torchvision_model_matches_onnxruntime_and_runs_on_the_standin(name):
    """Every parameter random, eval mode, exported at opset 17 with a dynamic batch."""
    pytest.importorskip("torch")
    import check_torchvision as T

    from gpu_mdf.engine import standin
    row = T.check(name, size=64, batch=2, repeats=1, standin=standin.c_compiler() is not None)
    assert row.status == "pass", (row.status, row.max_abs_diff, row.max_abs_ort)
    assert row.standin_syncs in (0, None)          # None: no C compiler for the stand-in's kernels
