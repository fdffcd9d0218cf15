"""Clients of every kind against one live `gpu-mdf serve` (REST and gRPC, token required):
the same inference, answered the same, by tritonclient.http, tritonclient.grpc, the KServe
SDK (REST JSON, REST binary and gRPC; in a process of its own) and curl."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import call, make_token, model_repo

from gpu_mdf.engine import compile
from gpu_mdf.serve.launch import launch

pytest.importorskip("httptools")
pytest.importorskip("grpc")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    return make_token(tmp_path_factory.mktemp("secret"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reference_mdf):
    d = model_repo(tmp_path_factory.mktemp("models"), mnist=reference_mdf, spare=None)
    (d / "mnist" / "config.yaml").write_text("outputs: [probabilities]\nmax_queue_delay_ms: 2\n")
    return d


@pytest.fixture(scope="module")
def server(repo, token):
    srv = launch(repo, "--token-file", str(token[1]), "--grpc-port", "0", "--no-access-log")
    assert srv.grpc_address, srv.lines
    yield srv
    assert srv.stop() == 0, "\n".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def digits(mnist):
    (_, _), (x, y) = mnist
    return x[:64], y[:64]


@pytest.fixture(scope="module")
def expected(reference_mdf, digits):
    return compile(reference_mdf, device="cpu").run(digits[0])


def auth(token):
    return {"Authorization": f"Bearer {token[0]}"}


def triton_http(server, token, x):
    import tritonclient.http as th
    c = th.InferenceServerClient(server.address, network_timeout=60)
    inp = th.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return c.infer("mnist", [inp], headers=auth(token)).as_numpy("probabilities")


def triton_grpc(server, token, x):
    import tritonclient.grpc as tg
    c = tg.InferenceServerClient(server.grpc_address)
    inp = tg.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    r = c.infer("mnist", [inp], headers={"authorization": f"Bearer {token[0]}"}, request_id="g-1")
    assert r.get_response().id == "g-1" and r.get_response().model_version == "1"
    return r.as_numpy("probabilities")


def curl(server, token, x):
    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    doc = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                  "data": x.ravel().tolist()}]})
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {token[0]}",
                          "-H", "Content-Type: application/json", "--data-binary", "@-",
                          f"{server.url}/v2/models/mnist/infer"], input=doc.encode(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    o = json.loads(out.stdout)["outputs"][0]
    return np.asarray(o["data"], np.float32).reshape(o["shape"])


@pytest.mark.parametrize("client", [triton_http, triton_grpc, curl])
def test_every_client_gets_the_engines_answer(server, token, digits, expected, client):
    np.testing.assert_allclose(client(server, token, digits[0]), expected, atol=1e-6)


def test_kserve_sdk_rest_json_binary_and_grpc(server, token, digits, expected, tmp_path):
    if importlib.util.find_spec("kserve") is None:     # not imported here: see serve_clients/kserve_sdk.py
        pytest.skip("the KServe SDK is not installed")
    np.save(tmp_path / "x.npy", digits[0])
    r = subprocess.run([sys.executable, str(HERE / "serve_clients" / "kserve_sdk.py"), server.url,
                        server.grpc_address, token[0], "mnist", str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = np.load(tmp_path / "out.npz")
    assert sorted(got.files) == ["grpc", "rest_binary", "rest_json"]
    for route in got.files:
        np.testing.assert_allclose(got[route], expected, atol=1e-6, err_msg=route)


def test_grpc_metadata_repository_and_refusals(server, token, digits):
    import grpc
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException
    c = tg.InferenceServerClient(server.grpc_address)
    h = {"authorization": f"Bearer {token[0]}"}
    assert c.is_server_live() and c.is_server_ready()              # health: no token, as REST
    meta = c.get_model_metadata("mnist", headers=h)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "FP32", [-1, 28, 28])]
    assert c.is_model_ready("mnist", headers=h) and not c.is_model_ready("nope", headers=h)
    assert {(m.name, m.state) for m in c.get_model_repository_index(headers=h).models} >= {("mnist", "READY")}
    c.unload_model("spare", headers=h)
    assert not c.is_model_ready("spare", headers=h)
    c.load_model("spare", headers=h)
    assert c.is_model_ready("spare", headers=h)
    inp = tg.InferInput("pixels", [1, 784], "UINT8")
    inp.set_data_from_numpy(digits[0][:1].reshape(1, 784))
    for model, headers, code in (("mnist", {}, grpc.StatusCode.UNAUTHENTICATED),
                                 ("nope", h, grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, [inp], headers=headers)
        assert str(code.name) in str(e.value.status()), e.value
    bad = tg.InferInput("pixels", [1, 783], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 783), np.uint8))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        c.infer("mnist", [bad], headers=h)
    assert call(server.url + "/v2/health/ready")[0] == 200
