"""Protocol conformance: schemathesis runs all its checks, with bounded examples, against a
live `gpu-mdf serve` from the Open Inference Protocol's own REST spec (kept in
gpu_mdf/serve/spec/ with its licence). No server error; every other deviation is one of
SPEC_GAPS, each documented in the README."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import ROOT, model_repo

from gpu_mdf.serve.launch import launched

pytest.importorskip("httptools")
SPEC = ROOT / "gpu_mdf" / "serve" / "spec" / "open_inference_rest.yaml"
# failure type -> why it is the spec's gap, not the server's
SPEC_GAPS = {
    "RejectedPositiveData": "the spec's request schema takes any input names, datatypes and shapes; a server "
                            "can only take its model's (anything else is a 400)",
    "UndefinedStatusCode": "the spec lists 200 and 400 only; a model or version that does not exist is a 404, "
                           "as Triton and KServe answer (also 401, 405, 413, 503 where they apply)",
}


def schemathesis_run(url: str, config, tmp, extra=()) -> dict:
    beside = Path(sys.executable).parent / "schemathesis"       # the venv's, when it is not on PATH
    exe = str(beside) if beside.exists() else shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed")
    report = tmp / "report.json"
    cmd = [exe, *(["--config-file", str(config)] if config else []), "run", str(SPEC), "--url", url,
           "--checks", "all", "--max-examples", "25", "--seed", "22", "--no-color", "--generation-database", "none",
           "--request-timeout", "30", "--report", "json", "--report-json-path", str(report), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp)
    assert report.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(report.read_text()) | {"output": r.stdout[-6000:]}


@pytest.mark.parametrize("pinned", [True, False], ids=["served-model", "any-name"])
def test_schemathesis_all_checks_no_server_error(tmp_path, pinned):
    repo = model_repo(tmp_path / "models", softmax=None)
    config = None
    if pinned:           # path parameters set to the served model, so that requests reach it
        config = tmp_path / "schemathesis.toml"
        config.write_text('[parameters]\n"path.MODEL_NAME" = "softmax"\n"path.MODEL_VERSION" = "1"\n')
    with launched(repo, "--no-access-log") as srv:
        run = schemathesis_run(srv.url, config, tmp_path)
        assert srv.proc.poll() is None, "the server died"
        internal = [line for line in srv.lines if "internal error" in line]
    assert run["errors"] == [], run["output"]
    assert run["test_cases"]["generated"] > 40, run["output"]
    types = {f["type"] for f in run["failures"]}
    assert "ServerError" not in types and not internal, run["output"] + "\n".join(internal[:5])
    assert types <= set(SPEC_GAPS), run["output"]
