import json
import os
import shutil

import pytest
from click.testing import CliRunner

from gpu_mdf import extras
from gpu_mdf.cli import main


def test_info_says_why_no_gpu_is_used():
    r = CliRunner().invoke(main, ["info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["versions"]["numpy"]
    if extras.installed("tensorflow"):
        assert info["versions"]["tensorflow"]
        assert "tensorflow" in info and isinstance(info["tensorflow"].get("gpus"), list)
    else:   # a core or [convert] install: no TensorFlow view, and no error either
        assert info["versions"]["tensorflow"] is None and "tensorflow" not in info
    if not info["cupy"]["usable"]:
        assert info["inference_device"] == "cpu"
        assert info["why"] and ("CuPy" in info["why"] or "CUDA" in info["why"] or "GPU" in info["why"])
    text = CliRunner().invoke(main, ["info", "--no-tensorflow"]).output
    assert "Inference runs on:" in text and info["why"] in text


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "gpu-mdf" in r.output
    r = CliRunner().invoke(main, ["--help"])
    for cmd in ("run", "train", "convert", "infer", "plot", "bench", "info"):
        assert cmd in r.output


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_plot_renders_both_levels(reference_mdf, tmp_path):
    r = CliRunner().invoke(main, ["plot", str(reference_mdf), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for level in (1, 3):
        png = tmp_path / f"mdf_graph_level{level}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_graphviz_is_a_clear_error(reference_mdf, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    r = CliRunner().invoke(main, ["plot", str(reference_mdf), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "apt-get install graphviz" in r.output


def test_plot_of_a_broken_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = CliRunner().invoke(main, ["plot", str(bad)])
    assert r.exit_code == 2 and "not a readable MDF file" in r.output


def test_tensorflow_start_up_noise_is_silenced_but_errors_show(tmp_path):
    """The oneDNN notice, "Could not find cuda drivers", absl's pre-init line: gone from
    gpu-mdf's output; --verbose brings them back; a real error still shows."""
    pytest.importorskip("tensorflow", reason="TensorFlow's start-up noise needs TensorFlow")
    import subprocess
    import sys

    import keras
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(tmp_path / "m.keras")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GPU_MDF_VERBOSE")}
    base = [sys.executable, "-m", "gpu_mdf"]
    quiet = subprocess.run(base + ["convert", str(tmp_path / "m.keras"), "--out", str(tmp_path / "o"), "--normalize",
                                   "none"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    noises = ("oneDNN", "absl::InitializeLog", "cuda drivers", "cpu_feature_guard", "cuInit")
    for noise in noises:
        assert noise not in quiet.stderr + quiet.stdout, noise
    loud = subprocess.run(base + ["--verbose", "convert", str(tmp_path / "m.keras"), "--out", str(tmp_path / "p"),
                                  "--normalize", "none"],
                          capture_output=True, text=True, env=env, timeout=120)
    # which notices TensorFlow prints depends on the machine (oneDNN's needs certain CPUs)
    assert loud.returncode == 0 and any(noise in loud.stderr for noise in noises), loud.stderr
    bad = subprocess.run(base + ["convert", str(tmp_path / "nope.keras"), "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "no such model file" in bad.stdout
