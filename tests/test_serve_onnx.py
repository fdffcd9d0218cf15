"""Issue 20's server side: ONNX in a model repository and through /v2/convert, told by
content, converted once per content (a cache bounded in bytes), and treated as hostile:
parsed in the sandboxed worker, no external data, malformed protobuf a 4xx."""

import json
import secrets

import numpy as np
import pytest
from serve_helpers import call, infer_doc, one_line_no_path

from gpu_mdf.serve.conversion import Cache, upload_kind
from gpu_mdf.serve.launch import launched

onnx = pytest.importorskip("onnx")
pytest.importorskip("httptools")


def small_onnx(path, external=False, seed=0):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(784, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["pixels", "w"], ["mm"]),
                           helper.make_node("Add", ["mm", "b"], ["logits"]),
                           helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "g",
                          [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 784])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if external:
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                  size_threshold=0)
    else:
        onnx.save(m, path)
    return rng, w


def expected(path, x):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / "fromonnx" / "1").mkdir(parents=True)
    small_onnx(d / "fromonnx" / "1" / "model.onnx")
    token = secrets.token_urlsafe(16)
    (d.parent / "token.txt").write_text(token)
    with launched(d, "--token-file", str(d.parent / "token.txt"), "--no-access-log") as srv:
        yield srv, d, {"Authorization": f"Bearer {token}"}


def counters(srv, h) -> dict:
    text = call(srv.url + "/metrics", headers=h)[2].decode()
    return {ln.split('"')[1]: float(ln.split()[-1]) for ln in text.splitlines()
            if ln.startswith("gpu_mdf_conversions_total{")}


def test_a_repository_version_may_hold_model_onnx(served):
    pytest.importorskip("onnxruntime")
    srv, d, h = served
    x = np.random.default_rng(1).random((3, 784), dtype=np.float32)
    status, _, body = call(f"{srv.url}/v2/models/fromonnx/infer", infer_doc(x, datatype="FP32"), h)
    assert status == 200, body
    out = json.loads(body)["outputs"][0]
    assert out["name"] == "probabilities"
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), expected(d / "fromonnx" / "1" / "model.onnx", x),
                               atol=1e-5)
    before = counters(srv, h).get("cached", 0)
    assert call(f"{srv.url}/v2/repository/models/fromonnx/load", b"{}", h)[0] == 200       # converted once
    assert counters(srv, h)["cached"] == before + 1


def test_convert_takes_onnx_by_content_and_converts_it_once(served, tmp_path):
    pytest.importorskip("onnxruntime")
    srv, d, h = served
    small_onnx(tmp_path / "weights.bin.keras")                        # the name says nothing
    upload = (tmp_path / "weights.bin.keras").read_bytes()
    assert upload_kind(upload) == "onnx"
    status, _, body = call(f"{srv.url}/v2/convert", upload, h)
    assert status == 200 and json.loads(body), body
    seen = counters(srv, h)
    status, _, again = call(f"{srv.url}/v2/convert", upload, h)
    assert status == 200 and again == body and counters(srv, h)["cached"] == seen.get("cached", 0) + 1
    status, _, body = call(f"{srv.url}/v2/convert?name=uploaded_onnx", upload, h)
    assert status == 201 and json.loads(body)["state"] == "READY", body
    x = np.random.default_rng(2).random((2, 784), dtype=np.float32)
    status, _, body = call(f"{srv.url}/v2/models/uploaded_onnx/infer", infer_doc(x, datatype="FP32"), h)
    np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(2, 10),
                               expected(tmp_path / "weights.bin.keras", x), atol=1e-5)


def test_hostile_onnx_uploads_are_4xx(served, tmp_path):
    srv, d, h = served
    small_onnx(tmp_path / "ext.onnx", external=True)
    status, _, body = call(f"{srv.url}/v2/convert", (tmp_path / "ext.onnx").read_bytes(), h)
    assert status == 422 and "external data" in one_line_no_path(body, tmp_path, "/tmp/")
    good = (tmp_path / "ext.onnx").read_bytes()
    for bad in (b"\x08\x08" + b"\xff" * 64, b"\x08\x07:\x05\n\x03abc", good[:len(good) // 2]):
        status, _, body = call(f"{srv.url}/v2/convert", bad, h)
        assert status in (415, 422), (bad[:16], status, body)
        one_line_no_path(body, "/tmp/")
    assert call(srv.url + "/v2/health/ready")[0] == 200


def test_the_conversion_cache_is_bounded_in_bytes():
    c = Cache(100)
    for i in range(5):
        c.put(str(i), bytes(30))
    assert c.size <= 100 and c.get("0") is None and c.get("4") == bytes(30)
    c.put("big", bytes(101))
    assert c.get("big") is None and c.size <= 100
