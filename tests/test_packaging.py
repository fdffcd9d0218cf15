"""Packaging: the slim core install, the built sdist and wheel, and the one-line hints of
missing extras. The installs are real: fresh virtual environments, pip from the index
(its wheel cache allowed), the package from this checkout."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpu_mdf import __version__, extras, tfquiet
from gpu_mdf.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist_softmax.mdf.json"
HEAVY = ("tensorflow", "keras", "modeci_mdf", "jax", "onnxruntime", "matplotlib", "pydot")
pytestmark = pytest.mark.slow


def _run(cmd, cwd, check=True, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", path], cwd=path.parent)
    return path / "bin"


def _checkout_copy(dest: Path) -> Path:
    """The checkout's files without the developer's venv, build output and caches, so
    that the install sees what a clean clone has and writes nothing into the checkout."""
    skip = {".venv", ".git", "build", "dist", "runs", ".pytest_cache", ".ruff_cache", "__pycache__",
            "gpu_check_bundle", ".venv-lowest"}
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info")])
    return dest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from gpu_mdf.data import load_mnist
    (_, _), (x, y) = load_mnist()
    d = tmp_path_factory.mktemp("digits")
    np.save(d / "x.npy", x[:500])
    np.save(d / "y.npy", y[:500])
    return d / "x.npy", d / "y.npy"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``python -m build``: the sdist, then the wheel built from it."""
    tmp = tmp_path_factory.mktemp("dist")
    src = _checkout_copy(tmp / "src")
    _run([sys.executable, "-m", "build", "--outdir", tmp / "dist", src], cwd=tmp)
    return tmp / "dist"


def _infer_and_check(bin_dir: Path, digits, out: Path):
    """`gpu-mdf infer` on the committed example: the accuracy a softmax regression has, and
    the same probabilities as the engine in this (full) environment."""
    x, y = digits
    r = _run([bin_dir / "gpu-mdf", "infer", EXAMPLE, "--data", x, "--labels", y, "--out", out,
              "--device", "cpu", "--no-progress"], cwd=out.parent)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 500 and 0.88 < metrics["accuracy"] < 0.99, r.stdout
    from gpu_mdf.engine import compile
    expected = compile(EXAMPLE, device="cpu").run(np.load(x))
    np.testing.assert_allclose(np.load(out / "probabilities.npy"), expected, atol=1e-6)


def _absent(bin_dir: Path, cwd: Path) -> list[str]:
    code = f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"
    return json.loads(_run([bin_dir / "python", "-c", code], cwd=cwd).stdout.replace("'", '"'))


def test_slim_core_install_runs_inference_without_tensorflow_keras_or_modeci(tmp_path, digits):
    bin_dir = _venv(tmp_path / "venv")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", _checkout_copy(tmp_path / "src")], cwd=tmp_path)
    assert _absent(bin_dir, tmp_path) == [], "the core install pulled in an optional dependency"
    _infer_and_check(bin_dir, digits, tmp_path / "out")

    # commands that need an extra say which one, in one line, and exit 2
    x, _ = digits
    for cmd, extra in ([["convert", EXAMPLE, "--out", tmp_path / "c"], "convert"],
                       [["train", "--out", tmp_path / "t"], "train"],
                       [["plot", EXAMPLE, "--out", tmp_path / "p"], "mdf"]):
        r = _run([bin_dir / "gpu-mdf", *cmd], cwd=tmp_path, check=False)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and f"pip install 'gpu-mdf[{extra}]'" in r.stderr, r.stderr
    # the benchmark runs its own rows and names the extras of the baselines it skips
    r = _run([bin_dir / "gpu-mdf", "bench", EXAMPLE, "--repeats", "3"], cwd=tmp_path)
    assert "gpu-mdf (NumPy, CPU)" in r.stdout and "pip install 'gpu-mdf[mdf]'" in r.stdout, r.stdout


def test_runtime_install_serves_without_tensorflow(tmp_path, digits):
    """What the runtime image holds (core + [serve]): the server runs, infers, and says that
    conversion needs [convert]."""
    import urllib.error
    import urllib.request

    from gpu_mdf.serve.launch import launched
    bin_dir = _venv(tmp_path / "venv")
    src = _checkout_copy(tmp_path / "src")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", f"{src}[serve]"], cwd=tmp_path)
    assert _absent(bin_dir, tmp_path) == []
    repo = tmp_path / "models" / "softmax" / "1"
    repo.mkdir(parents=True)
    shutil.copy(EXAMPLE, repo / "model.mdf.json")
    env = {k: "" for k in ("PYTHONPATH",)}
    x = np.load(digits[0])[:4]
    with launched(tmp_path / "models", "--no-access-log", python=str(bin_dir / "python"), cwd=str(tmp_path),
                  env=env) as srv:
        body = json.dumps({"inputs": [{"name": "pixels", "shape": [4, 28, 28], "datatype": "UINT8",
                                       "data": x.ravel().tolist()}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{srv.url}/v2/models/softmax/infer", body),
                                    timeout=60) as r:
            out = json.loads(r.read())["outputs"][0]
        from gpu_mdf.engine import compile
        np.testing.assert_allclose(np.array(out["data"]).reshape(4, 10), compile(EXAMPLE, device="cpu").run(x),
                                   atol=1e-6)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{srv.url}/v2/convert", b"PK\x03\x04" + b"0" * 64),
                                   timeout=60)
        assert e.value.code == 501 and "pip install 'gpu-mdf[convert]'" in json.loads(e.value.read())["error"]


def test_sdist_and_wheel_carry_mnist_and_its_licence_and_pass_twine(dist):
    wheel, = dist.glob("gpu_mdf-*.whl")
    sdist, = dist.glob("gpu_mdf-*.tar.gz")
    assert wheel.name.startswith(f"gpu_mdf-{__version__}-") and sdist.name == f"gpu_mdf-{__version__}.tar.gz"
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("gpu_mdf/_data/mnist.npz", "gpu_mdf/_data/README.md"):
        assert must in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert any(n.endswith("licenses/gpu_mdf/_data/README.md") for n in names)   # CC BY-SA attribution
    assert not any(n.startswith("tests/") for n in names)
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for must in ("gpu_mdf/_data/mnist.npz", "gpu_mdf/_data/README.md", "LICENSE", "tests/conftest.py",
                 "examples/mnist_softmax.mdf.json", "configs/mnist_dense.yaml", "Makefile"):
        assert must in members, must
    r = _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], cwd=dist)
    assert r.stdout.count("PASSED") == 2, r.stdout


def test_wheel_installs_and_runs(tmp_path, dist, digits):
    wheel, = dist.glob("gpu_mdf-*.whl")
    bin_dir = _venv(tmp_path / "venv")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp_path)
    r = _run([bin_dir / "gpu-mdf", "--version"], cwd=tmp_path)
    assert r.stdout.strip() == f"gpu-mdf, version {__version__}"
    _infer_and_check(bin_dir, digits, tmp_path / "out")


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and '\nversion = "' not in text.split("[project.optional")[0]
    import importlib.metadata as md
    assert md.version("gpu-mdf") == __version__


def test_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    """In this full environment, pretend Keras is not installed: convert says which extra."""
    monkeypatch.setattr(tfquiet, "_loaded", {})
    real = extras.installed
    monkeypatch.setattr(extras, "installed", lambda m: m != "keras" and real(m))
    r = CliRunner().invoke(main, ["convert", str(EXAMPLE), "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.strip() == ("error: converting Keras models needs Keras, which is not installed here: "
                                "pip install 'gpu-mdf[convert]'")
    with pytest.raises(extras.MissingExtra, match=r"gpu-mdf\[mdf\]"):
        monkeypatch.setattr(extras, "installed", lambda m: False)
        extras.require("modeci_mdf.utils", "reading MDF with modeci_mdf")


def test_keras_without_tensorflow_runs_on_jax(monkeypatch):
    """Where TensorFlow is absent gpu-mdf picks JAX for Keras (the [convert] extra); a
    user's KERAS_BACKEND is kept; with neither backend the hint names [convert]."""
    real = extras.installed
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setattr(extras, "installed", lambda m: m != "tensorflow" and real(m))
    assert tfquiet.keras_backend() == "jax" and os.environ["KERAS_BACKEND"] == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert tfquiet.keras_backend() == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setattr(extras, "installed", lambda m: m not in ("tensorflow", "jax"))
    with pytest.raises(extras.MissingExtra, match=r"neither is installed here: pip install 'gpu-mdf\[convert\]'"):
        tfquiet.keras_backend("converting")
