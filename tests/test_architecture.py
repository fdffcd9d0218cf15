"""The shape of the package stays what the README says: its layout, where to add things,
no import cycle, no function over 80 lines, the inference path free of TensorFlow."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import architecture  # noqa: E402

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_layout_is_the_tree():
    block = README.split("<!-- layout:start -->\n", 1)[1].split("\n<!-- layout:end -->", 1)[0]
    assert block == architecture.layout(), "README's Layout list is stale: python scripts/architecture.py --layout"


def test_no_import_cycle():
    assert architecture.cycles(architecture.imports()) == []


def test_cycles_are_found_and_named():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}, "p.e": {"p.e"}}
    found = architecture.cycles(graph)
    assert sorted(sorted(set(c)) for c in found) == [["p.a", "p.b", "p.c"], ["p.e"]]


def test_no_function_over_80_lines():
    long = [row for row in architecture.longest_functions(n=5) if row[0] > 80]
    assert not long, long


@pytest.mark.parametrize("entry", [e for e in _section("Where to add things").split("\n* ")[1:]])
def test_where_to_add_things_names_places_that_exist(entry):
    """Each entry names a folder, files in it, and the decorator or table one adds to: the
    files exist and the decorator (or table) is used in the folder's modules."""
    names = re.findall(r"`([^`]+)`", entry)
    folder = next(ROOT / n for n in names if n.startswith("gpu_mdf/") and n.endswith("/"))
    assert folder.is_dir(), folder
    files = [ROOT / n if "/" in n else folder / n for n in names if n.endswith(".py")]
    assert all(f.is_file() for f in files), [f for f in files if not f.is_file()]
    marks = [n for n in names if n.startswith("@") or re.fullmatch(r"[A-Z][A-Za-z_]+", n)]
    assert marks, entry
    text = "\n".join(p.read_text() for p in [*folder.rglob("*.py"), *files])
    for m in marks:
        assert re.search(rf"^\s*{re.escape(m)}\b|^\s*(class|def) {re.escape(m)}\b|^{re.escape(m)} = ", text, re.M), m


# the ONNX front door: an .onnx given to infer is converted on the fly (onnx, never Keras)
ONNX_DOOR = ("gpu_mdf.convert.sources", "gpu_mdf.convert.onnx")


def test_the_inference_path_imports_no_tensorflow_or_keras():
    """mdf, engine, data and batch are the inference path: none of them imports TensorFlow or
    Keras, at module level or lazily, nor any converter module but the ONNX front door's."""
    graph = architecture.imports()
    path = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in ("mdf", "engine", "data", "batch")]
    assert path
    for m in path + list(ONNX_DOOR):
        text = architecture.modules()[m].read_text()
        assert not re.search(r"^\s*(import|from) (tensorflow|keras)\b", text, re.M), m
        assert not any(t.startswith(("gpu_mdf.convert", "gpu_mdf.train", "gpu_mdf.tfquiet")) and t not in ONNX_DOOR
                       and not (m in ONNX_DOOR and t == "gpu_mdf.convert") for t in graph[m]), (m, graph[m])


def test_inference_on_an_onnx_file_loads_no_tensorflow(tmp_path):
    """At run time too: infer on an ONNX model (through the converter package's front door)
    leaves TensorFlow and Keras unimported."""
    import subprocess
    import sys
    code = ("import sys, numpy as np, onnx\n"
            "sys.path.insert(0, 'tests')\n"
            "import mdf_fixtures as F\n"
            f"onnx.save(F.mlp_gemm(), {str(tmp_path / 'm.onnx')!r})\n"
            "from gpu_mdf.batch import run_inference\n"
            "from gpu_mdf.convert.sources import resolve_model\n"
            "from gpu_mdf.engine import compile\n"
            f"p = compile(resolve_model({str(tmp_path / 'm.onnx')!r}, 'none', need_normalize=True), device='cpu')\n"
            "p.run(np.ones((2, 3, 4, 4), np.float32))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "GPU_MDF_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
